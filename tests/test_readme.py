"""The README, run as printed: every fenced code block is checked, so none can drift.

How each kind of block is checked:

- ```sh blocks run with bash, in order, one *session* at a time: a session is
  the README's sections a reader follows in one sitting, in a temporary folder
  holding a copy of aibutler.py alone (the working directory), with HOME a
  fresh temporary directory (so ~/.aibutler is new). The blocks of a session
  share one shell, as in a terminal: each block starts with the variables the
  earlier ones set (SECRET=...), and runs with `set -eo pipefail`, so a
  failing command fails the test. Every session starts with the README's
  first command and its Quick start.
- A block whose last line runs `python3 aibutler.py run` (or `python3
  NAME.py`) holds the terminal: the test starts it in the background, waits
  until it prints "listening on", and stops it with SIGINT, as Ctrl-C does,
  when a later block starts the same program (the README says to press Ctrl-C
  first) or when the session ends. aibutler must then exit 0 with nothing
  over a warning in its log and no request answered 4xx or 5xx.
- A ```json block right after a ```sh block shows that block's answer: the last
  JSON object it printed must have the same keys, at every level, as the one
  shown (values differ: ids, times, the model's words). After a block that
  holds the terminal it is what that program prints, checked when the session
  ends. Every other ```json block must parse.
- ```python blocks run with python3 in the session (after the blocks before
  them), with a stand-in for MicroPython's `urequests` (built on urllib) on
  PYTHONPATH. One whose first line is a comment `# NAME.py: ...` is a file the
  reader saves: it is written into the folder instead, for a later block to run.
- ```ini blocks are each a valid config fragment: load_config reads each one
  alone without an error or a warning.
- ```cpp (Arduino) blocks cannot be compiled here: they must use the same URL
  as the MicroPython example, header names the shell examples send, and a
  body that is a valid message.
- ```nginx blocks must proxy the webhook's path to aibutler's default address.
- Blocks marked `<!-- tested by .ci/systemd-install -->` need a real systemd
  and root (install, systemctl, journalctl); only those may carry the mark,
  and every block that needs one must. They are not run here: each must be
  valid bash and each aibutler command in them must parse.
- Blocks with `.venv/bin/pip install` are not run (they download): their
  packages must be pyproject.toml's, and the test command's also what CI's pip
  stage installs.

What cannot run as printed in a test, and what stands in for it:

- PATH shims: `python3` is the interpreter running these tests; `sudo` runs
  the rest of its line as is (environment assignments kept); `apt`/`apt-get`
  check that the Python modules of the named python3-* packages import (and
  that other packages' commands exist) instead of installing; `systemctl` and
  `journalctl` fail, naming the mark above. curl and openssl are the real ones.
- SUBSTITUTIONS (below), the only changes made to a block's text: the ports
  aibutler (3377) and the example receiver (8099) listen on become free ones,
  so that the sessions can run side by side (the daemon gets AIBUTLER_PORT);
  the LAN address of the device examples becomes loopback; Ollama's base URL
  becomes a loopback fake model server (conftest's Recorder) that answers
  every request with a short text; and the device examples' placeholder for
  the secret becomes the session's secret.
- What a reader would type at a prompt (`vault set NAME` in a terminal) comes
  from stdin: STDIN below.
"""


import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import aibutler
from conftest import ROOT, ok, openai_text

README = ROOT / "README.md"
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
MARK = "<!-- tested by .ci/systemd-install -->"
KNOWN_LANGUAGES = {"sh", "json", "ini", "python", "js", "cpp", "nginx", "html", "text"}

# The sections a reader follows in one sitting ("" is the text before the first
# section: the install-and-run command). Each session is one test, in a folder
# and a HOME of its own, so xdist can run them side by side.
SESSIONS = {
    "first_steps": ("", "Quick start", "Connect a model", "Your senders",
                    "Async mode and callbacks"),
    "operations": ("", "Quick start", "Run it on a Raspberry Pi", "Reference",
                   "Troubleshooting"),
}
STDIN = "sk-typed-at-the-prompt-0123456789\n"  # what the reader types or pastes
MODEL_REPLY = "I'm AI Butler, here a fake model server of the README test."
SECRET_PLACEHOLDER = "paste webhook_auth_secret here"
MODEL_URL = r"http://localhost:11434\b"  # Ollama's, in "Connect a model"
# pattern -> what it becomes (a function of the session); see the docstring
SUBSTITUTIONS = (
    (r"\b(?:127\.0\.0\.1|192\.168\.1\.50):3377\b", lambda s: f"127.0.0.1:{s.port}"),
    (r"\b8099\b", lambda s: str(s.receiver_port)),
    (MODEL_URL, lambda s: s.model_url),
    (re.escape(SECRET_PLACEHOLDER), lambda s: s.secret()),
)
HOLDS_TERMINAL = re.compile(r"(?:^|[\s&;])python3 (aibutler\.py run\b[^|;&#]*|\w+\.py)\s*(#.*)?$")
PIP = re.compile(r"\.venv/bin/pip install ([^&|;\n]+)")
WAIT = 20  # seconds for anything to happen


# --- the README as blocks ---------------------------------------------------------

class Block:
    def __init__(self, lang, text, line, section, marked, follows):
        self.lang, self.text, self.line, self.section = lang, text, line, section
        self.marked = marked    # the systemd mark is on the line before it
        self.follows = follows  # the block right before it (only blank lines between)

    def __repr__(self):
        return f"README.md line {self.line} ({self.lang}, {self.section or 'top'})"

    @property
    def pip(self):
        return bool(PIP.search(self.text))

    @property
    def runs(self):
        """Run in a session: shell and Python, not the marked or pip ones."""
        return self.lang in ("sh", "python", "js") and not self.marked and not self.pip


def parse_blocks(text):
    lines = text.splitlines()
    blocks, section, previous_end, i = [], "", None, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^( *)```(.*)$", line)
        if fence:
            indent, lang = len(fence.group(1)), fence.group(2).strip()
            end = i + 1
            while not re.match(r"^ *```\s*$", lines[end]):
                end += 1
            body = "\n".join(row[indent:] for row in lines[i + 1:end]) + "\n"
            follows = blocks[-1] if blocks and previous_end is not None and all(
                not row.strip() for row in lines[previous_end + 1:i]) else None
            blocks.append(Block(lang, body, i + 1, section,
                                i > 0 and lines[i - 1].strip() == MARK, follows))
            previous_end = i = end
        i += 1
    return blocks


def prose(text):
    """The text outside code blocks."""
    return re.sub(r"^ *```.*?^ *```[ \t]*$", "", text, flags=re.S | re.M)


def inline_code(text):
    return [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose(text))]


TEXT = README.read_text()
BLOCKS = parse_blocks(TEXT)


# --- the static checks ------------------------------------------------------------

def test_every_block_has_a_known_language_and_every_runnable_one_a_session():
    assert BLOCKS, "no code blocks found"
    for block in BLOCKS:
        assert block.lang in KNOWN_LANGUAGES, f"{block}: add a check for {block.lang!r} blocks"
    in_sessions = {section for sections in SESSIONS.values() for section in sections}
    for block in BLOCKS:
        if block.runs:
            assert block.section in in_sessions, f"{block}: put its section in a SESSION"
    for pattern, _ in SUBSTITUTIONS:  # none outlives what it stands in for
        assert any(re.search(pattern, b.text) for b in BLOCKS if b.runs), pattern


def test_the_first_lines_install_and_run_it_then_the_tests():
    top = [b for b in BLOCKS if b.section == ""]
    assert TEXT.startswith("# aibutler\n") and len(top) == 2
    assert all(b.lang == "sh" and b.text.count("\n") == 1 for b in top)
    run, tests = (b.text.strip() for b in top)
    assert run == "sudo apt install python3-falcon python3-waitress && python3 aibutler.py run"
    assert tests.startswith("sudo apt install python3-venv && python3 -m venv .venv && ")
    pyproject = (ROOT / "pyproject.toml").read_text()
    needed = names(re.search(r"^dependencies = \[(.*?)\]", pyproject, re.M | re.S).group(1))
    for_tests = names(re.search(r"^test = \[(.*?)\]", pyproject, re.M | re.S).group(1))
    assert pip_packages(tests) == needed + for_tests
    ci = (ROOT / ".ci" / "run").read_text()
    ci_pip = re.search(r"^pip install ((?:-\S+ )*)(.*pytest.*)$", ci, re.M).group(2).split()
    assert pip_packages(tests) == ci_pip, "the README's test command and CI's pip stage differ"
    ci_pytest = re.search(r"^python -m pytest (.*)$", ci, re.M).group(1)
    assert tests.endswith(f".venv/bin/python3 -m pytest {ci_pytest}")
    assert tests in CONTRIBUTING.read_text()  # the same command there
    for block in BLOCKS:  # the daemon's own venv line installs what it needs
        if block.pip and block is not top[1]:
            assert pip_packages(block.text) == needed, block


def names(toml_list):
    return [re.split(r"[<>=!~;\[ ]", item)[0] for item in re.findall(r'"([^"]+)"', toml_list)]


def pip_packages(text):
    return [word for word in PIP.search(text).group(1).split() if not word.startswith("-")]


@pytest.mark.parametrize("path", [README, CONTRIBUTING], ids=lambda p: p.name)
def test_python3_everywhere_and_pip_only_in_a_venv(path):
    text = path.read_text()
    code = [b.text for b in parse_blocks(text)] + inline_code(text)
    for piece in code:
        assert not re.search(r"(^|[\s(|;&`$])(\S*/)?python(\s|$)", piece, re.M), \
            f"`python` is not on Debian: say python3 in {piece!r}"
        assert not re.search(r"(?<!\.venv/bin/)\bpip3? install", piece), \
            f"pip refuses to install system-wide on bookworm: use a venv in {piece!r}"
    assert "Ctrl-D" not in text  # on an SSH session it logs the reader out


def github_anchor(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_contents_list_every_section_and_every_link_reaches_a_heading():
    headings = re.findall(r"^#{2,4} (.+)$", prose(TEXT), re.M)
    anchors = {github_anchor(h) for h in headings}
    for target in re.findall(r"\]\(#([^)]+)\)", TEXT):
        assert target in anchors, f"#{target} is no heading's anchor"
    contents = TEXT.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\]\(#([^)]+)\)", contents))
    sections = [h for h in re.findall(r"^## (.+)$", prose(TEXT), re.M) if h != "Contents"]
    assert {github_anchor(h) for h in sections} <= listed
    assert TEXT.index("## Contents") < TEXT.index("\n## ", TEXT.index("## Contents") + 1)


def test_only_blocks_that_need_systemd_are_marked_and_all_of_them_are():
    stage = (ROOT / ".ci" / "systemd-install").read_text()
    stage = re.sub(r"[ \t]+", " ", re.sub(r"\\\n\s*", " ", stage))  # one line each
    stage = stage.replace("/root/aibutler.py", "aibutler.py")  # the copied file, there
    assert TEXT.count(MARK) == sum(b.marked for b in BLOCKS), "a mark not right before a block"
    for block in BLOCKS:
        if block.marked:
            assert re.search(r"install|systemctl|journalctl", block.text), block
            result = subprocess.run(["bash", "-n"], input=block.text, text=True,
                                    capture_output=True)
            assert result.returncode == 0, f"{block}: {result.stderr}"
            for line in block.text.splitlines():  # what the stage runs, as printed
                command = re.sub(r"^sudo ", "", line.split(" #")[0].strip())
                if re.search(r"aibutler\.py|systemctl|journalctl", command):
                    assert command in stage, f"{block}: .ci/systemd-install never runs {command!r}"
        elif block.lang == "sh":
            assert not re.search(r"\bsystemctl\b|\bjournalctl\b|aibutler\.py (un)?install\b",
                                 block.text), f"{block} needs systemd: mark it ({MARK})"


PLACEHOLDERS = {"NAME": "openai_api_key", "MESSAGE_ID": "msg-0123456789", "FILE": "config.ini"}


@pytest.mark.parametrize("path", [README, CONTRIBUTING], ids=lambda p: p.name)
def test_every_aibutler_command_shown_parses(path, capsys):
    text = path.read_text()
    pieces = [b.text for b in parse_blocks(text) if b.lang == "sh"] + inline_code(text)
    command = re.compile(r"python3 (?:\S*/)?aibutler\.py\s+([^|;&<>`\n#)]*)")
    commands = [match.group(1) for piece in pieces for match in command.finditer(piece)]
    assert commands or path is not README
    parser = aibutler.build_parser()
    for command in commands:
        argv = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            if argv[-1:] != ["--help"] or exc.code != 0:
                raise AssertionError(f"`aibutler.py {command}` does not parse: "
                                     f"{capsys.readouterr().err}") from None


def test_json_blocks_parse():
    for block in BLOCKS:
        if block.lang == "json":
            json.loads(block.text)


def test_ini_blocks_are_each_a_valid_config(tmp_path):
    ini = [b for b in BLOCKS if b.lang == "ini"]
    assert ini
    for number, block in enumerate(ini):
        path = tmp_path / f"{number}.ini"
        path.write_text(block.text)
        try:
            config = aibutler.load_config(str(path), env={}, data_dir=str(tmp_path))
        except aibutler.ConfigError as exc:
            raise AssertionError(f"{block}: {exc}") from None
        assert config.warnings == [], f"{block}: {config.warnings}"


def test_the_config_sections_listed_are_the_programs():
    listed = re.findall(r"^\| `\[([\w.]+)\]` \|", TEXT, re.M)
    assert listed == list(aibutler.CONFIG_SCHEMA)


def test_defaults_quoted_in_the_text_are_the_programs():
    text = re.sub(r"\s+", " ", prose(TEXT))  # a quote may wrap
    quoted = re.findall(r"`(?:\[([\w.]+)\] )?(\w+)` \((\d[^)\s]*(?: MiB)?)[)\s]", text)
    checked = 0
    for section, key, value in quoted:
        sections = [section] if section else [s for s, keys in aibutler.CONFIG_SCHEMA.items()
                                              if key in keys]
        if len(sections) != 1 or key not in aibutler.CONFIG_SCHEMA.get(sections[0], {}):
            continue
        default, parse = aibutler.CONFIG_SCHEMA[sections[0]][key]
        if value.endswith(" MiB"):
            value = str(int(value.split()[0]) << 20)
        said, meant = parse(value), parse(default)
        if isinstance(meant, list):  # a list quoted from its start ("1s, 5s, …")
            meant = meant[:len(said)]
        assert said == meant, f"[{sections[0]}] {key} defaults to {default}"
        checked += 1
    assert checked >= 20


def test_each_example_has_an_idempotency_key_of_its_own():
    keys = re.findall(r"Idempotency-Key: ([\w.-]+)", "".join(b.text for b in BLOCKS))
    assert keys and len(keys) == len(set(keys)), keys


def test_the_arduino_example_sends_what_the_others_do():
    python = next(b.text for b in BLOCKS if b.lang == "python" and "urequests" in b.text)
    shell = "".join(b.text for b in BLOCKS if b.lang == "sh")
    sent = set(re.findall(r"""-H ['"]([\w-]+):""", shell))
    for block in (b for b in BLOCKS if b.lang == "cpp"):
        urls = re.findall(r'"(https?://[^"]+)"', block.text)
        assert urls and all(f'"{url}"' in python for url in urls), block
        headers = re.findall(r'addHeader\("([\w-]+)"', block.text)
        assert headers and set(headers) <= sent, block
        assert f'"{SECRET_PLACEHOLDER}"' in block.text and SECRET_PLACEHOLDER in python
        body = json.loads(re.search(r'POST\("((?:[^"\\]|\\.)*)"\)', block.text).group(1)
                          .encode().decode("unicode_escape"))
        assert isinstance(body["user_id"], str) and isinstance(body["message"], str)


def test_the_nginx_example_proxies_the_webhook_to_aibutler():
    server = {key: default for key, (default, _) in aibutler.CONFIG_SCHEMA["server"].items()}
    path = aibutler.CONFIG_SCHEMA["channels.webhook"]["path"][0]
    for block in (b for b in BLOCKS if b.lang == "nginx"):
        location = re.search(r"location (\S+) \{", block.text).group(1)
        assert path.startswith(location), block
        assert f"proxy_pass http://{server['host']}:{server['port']};" in block.text
        assert "X-Forwarded-For $proxy_add_x_forwarded_for" in block.text


# --- the sessions: the blocks run as printed ----------------------------------------

PRELUDE = 'if [ -f "$README_STATE" ]; then . "$README_STATE"; fi\nset -eo pipefail\n'
EPILOGUE = """
set +eo pipefail
names=$(compgen -v | grep -vxF -f "$README_FRESH")
if [ -n "$names" ]; then declare -p $names | grep -v '^declare -[a-zA-Z]*r'; fi >"$README_STATE.new"
mv "$README_STATE.new" "$README_STATE"
"""
SHIMS = {
    "sudo": 'exec env "$@"\n',
    "apt": """for package in "$@"; do
    case $package in
        -*|install|update) ;;
        python3-*) module=$(printf %s "${package#python3-}" | tr - _)
                   python3 -c "import $module" \\
                       || { echo "apt shim: $package: no module $module" >&2; exit 100; } ;;
        *) command -v "$package" >/dev/null \\
               || { echo "apt shim: no command $package" >&2; exit 100; } ;;
    esac
done
""",
    "systemctl": f'echo "$0 is not run by tests/test_readme.py: mark the block {MARK}" >&2\n'
                 'exit 1\n',
}
SHIMS["apt-get"] = SHIMS["apt"]
SHIMS["journalctl"] = SHIMS["systemctl"]
FAKE_UREQUESTS = '''"""MicroPython's urequests for the README test, on urllib."""
import json as _json
import urllib.error
import urllib.request


class Response:
    def __init__(self, status_code, content):
        self.status_code, self.content = status_code, content

    @property
    def text(self):
        return self.content.decode()

    def json(self):
        return _json.loads(self.content)

    def close(self):
        pass


def request(method, url, data=None, json=None, headers=None):
    headers = dict(headers or {})
    if json is not None:  # as MicroPython's does: the body and its Content-Type
        data = _json.dumps(json)
        headers["Content-Type"] = "application/json"
    if isinstance(data, str):
        data = data.encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return Response(answer.status, answer.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read())


def post(url, **options):
    return request("POST", url, **options)


def get(url, **options):
    return request("GET", url, **options)
'''


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def last_json(text):
    """The last JSON object in what a command printed."""
    found, decoder, i = None, json.JSONDecoder(), 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return found
        try:
            found, end = decoder.raw_decode(text, i)
            i = end
        except ValueError:
            i += 1


def same_shape(shown, real, where="answer"):
    """The keys shown are the keys the daemon sends, at every level."""
    if isinstance(shown, dict):
        assert isinstance(real, dict), f"{where}: {real!r} is not an object"
        assert set(shown) == set(real), f"{where}: shown {sorted(shown)}, sent {sorted(real)}"
        for key in shown:
            same_shape(shown[key], real[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(real, list), f"{where}: {real!r} is not a list"
        if shown and real:
            same_shape(shown[0], real[0], f"{where}[0]")
    else:
        kind = lambda v: "number" if type(v) in (int, float) else type(v).__name__  # noqa: E731
        assert kind(shown) == kind(real), f"{where}: shown {shown!r}, sent {real!r}"


class Serving:
    def __init__(self, block, proc, log):
        self.block, self.proc, self.log = block, proc, log

    @property
    def output(self):
        return self.log.read_text(errors="replace")

    @property
    def is_aibutler(self):
        return "aibutler.py run" in self.block.text


class Session:
    """A reader's terminals: one folder holding aibutler.py alone, one HOME."""

    def __init__(self, tmp_path, model_url):
        self.folder, self.home, self.work = tmp_path / "folder", tmp_path / "home", tmp_path
        self.folder.mkdir()
        self.home.mkdir()
        shutil.copy(ROOT / "aibutler.py", self.folder / "aibutler.py")
        shims = tmp_path / "bin"
        shims.mkdir()
        for name, body in dict(SHIMS, python3=f'exec {shlex.quote(sys.executable)} "$@"\n').items():
            (shims / name).write_text("#!/bin/sh\n" + body)
            (shims / name).chmod(0o755)
        fakes = tmp_path / "fakes"
        fakes.mkdir()
        (fakes / "urequests.py").write_text(FAKE_UREQUESTS)
        self.port, self.receiver_port, self.model_url = free_port(), free_port(), model_url
        self.env = {name: value for name, value in os.environ.items()
                    if not name.startswith(("AIBUTLER_", "WATCHDOG_", "PYTHON"))
                    and name not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "CREDENTIALS_DIRECTORY")}
        self.env.update(HOME=str(self.home), PATH=f"{shims}:{os.environ['PATH']}",
                        PYTHONPATH=str(fakes), AIBUTLER_PORT=str(self.port),
                        README_STATE=str(tmp_path / "state.sh"),
                        README_FRESH=str(tmp_path / "fresh"))
        fresh = subprocess.run(["bash", "-c", "compgen -v"], env=self.env, capture_output=True,
                               text=True, check=True).stdout
        (tmp_path / "fresh").write_text(fresh)
        self.serving = {}   # program -> Serving
        self.expected = []  # (Serving, json block): what it prints, checked at the end

    def secret(self):
        vault = aibutler.Vault(str(self.home / ".aibutler" / "vault.json"), env={})
        return vault.get("webhook_auth_secret")

    def substitute(self, text):
        for pattern, replacement in SUBSTITUTIONS:
            if re.search(pattern, text):
                text = re.sub(pattern, lambda _, r=replacement: r(self), text)
        return text

    def run(self, block):
        if block.lang in ("python", "js"):
            return self.python(block)
        text = self.substitute(block.text)
        last = [line for line in text.splitlines() if line.strip()][-1]
        program = HOLDS_TERMINAL.search(last)
        if program:
            return self.serve(block, text, program.group(1).split()[0])
        result = subprocess.run(["bash", "-c", PRELUDE + text + EPILOGUE], cwd=self.folder,
                                env=self.env, input=STDIN, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, (f"{block} exited {result.returncode}:\n{text}\n"
                                        f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result.stdout

    def python(self, block):
        text = self.substitute(block.text)
        saved = re.match(r"(?:#|//) (\w+\.(?:py|js)): ", text)
        if saved:  # a file the reader saves, for a later block to run
            (self.folder / saved.group(1)).write_text(text)
            return None
        script = self.work / f"line-{block.line}.{block.lang[:2]}"
        script.write_text(text)
        runner = "python3" if block.lang == "python" else "node"
        result = subprocess.run([runner, str(script)], cwd=self.folder, env=self.env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, f"{block}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def serve(self, block, text, program):
        if program in self.serving:  # the reader pressed Ctrl-C there first
            self.stop(self.serving.pop(program))
        log = self.work / f"line-{block.line}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", PRELUDE + text], cwd=self.folder,
                                    env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        serving = self.serving[program] = Serving(block, proc, log)
        deadline = time.monotonic() + WAIT
        while "listening on" not in serving.output:
            assert proc.poll() is None, f"{block} exited {proc.returncode}:\n{serving.output}"
            assert time.monotonic() < deadline, f"{block} did not start:\n{serving.output}"
            time.sleep(0.02)
        return None

    def stop(self, serving):
        os.killpg(serving.proc.pid, signal.SIGINT)  # Ctrl-C, to its whole process group
        code = serving.proc.wait(WAIT)
        if serving.is_aibutler:
            log = serving.output
            assert code == 0, f"{serving.block}: exited {code}:\n{log}"
            assert not re.search(r" (ERROR|CRITICAL) |Traceback", log), f"{serving.block}:\n{log}"
            refused = re.findall(r"INFO aibutler: ([A-Z]+ \S+ [45]\d\d) ", log)
            assert not refused, f"{serving.block} answered {refused}:\n{log}"

    def finish(self):
        for serving, shown in self.expected:
            deadline = time.monotonic() + WAIT
            while last_json(serving.output) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            printed = last_json(serving.output)
            assert printed is not None, f"{serving.block} printed no JSON:\n{serving.output}"
            same_shape(json.loads(shown.text), printed, f"{shown}")
        while self.serving:
            self.stop(self.serving.pop(next(reversed(list(self.serving)))))

    def kill(self):
        """What is left after a failure goes, whatever it was doing."""
        for serving in self.serving.values():
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                os.killpg(serving.proc.pid, signal.SIGKILL)
                serving.proc.wait(WAIT)


@pytest.mark.skipif(not shutil.which("curl"), reason="the README's examples use curl")
@pytest.mark.parametrize("name", SESSIONS)
def test_the_readme_runs_as_printed(name, tmp_path, receiver):
    model = receiver([ok(openai_text(MODEL_REPLY))])
    session = Session(tmp_path, model.url)
    blocks = [b for b in BLOCKS if b.section in SESSIONS[name]]
    assert [b for b in blocks if b.runs], name
    try:
        for block in blocks:
            if block.runs:
                printed = session.run(block)
                for stream in (b for b in BLOCKS if b.follows is block and b.lang == "text"):
                    same_events(stream, printed)
                answers = [b for b in BLOCKS if b.follows is block and b.lang == "json"]
                for shown in answers:
                    if printed is None:  # it holds its terminal: what it prints, at the end
                        session.expected.append((next(s for s in session.serving.values()
                                                      if s.block is block), shown))
                    else:
                        real = last_json(printed)
                        assert real is not None, f"{block} printed no JSON: {printed!r}"
                        same_shape(json.loads(shown.text), real, f"{shown}")
        session.finish()
    finally:
        session.kill()
    if any(re.search(MODEL_URL, b.text) for b in blocks if b.runs):
        assert model.requests, "the README's model server was never asked"


def events(text):
    """(name, data) of each server-sent event in a text."""
    return re.findall(r"^event: (\w+)\ndata: (.*)$", text, re.M)


def same_events(shown, printed):
    """A ```text block shows a stream: its event names are the stream's (the
    deltas may be cut otherwise: the model's words), and done has the same keys."""
    real, said = events(printed or ""), events(shown.text)
    assert said and real, f"{shown}: no server-sent events shown or printed: {printed!r}"
    assert [n for n, _ in said if n != "delta"] == [n for n, _ in real if n != "delta"], shown
    assert "".join(json.loads(d)["text"] for n, d in real if n == "delta") == json.loads(
        real[-1][1])["reply"], f"{shown}: the deltas joined are not the reply"
    assert set(json.loads(real[-1][1])) == set(re.findall(r'"(\w+)":', said[-1][1])), shown


def test_the_browser_page_calls_the_webhook_with_a_token_and_reads_the_stream():
    pages = [b.text for b in BLOCKS if b.lang == "html"]
    assert pages
    for page in pages:
        for needed in ("fetch(", "/webhook/custom", "Bearer", "text/event-stream",
                       "getReader()", '"delta"', '"error"'):
            assert needed in page, needed


def test_the_code_tour_lists_the_parts_in_order():
    tour = CONTRIBUTING.read_text().split("## A tour of the code", 1)[1]
    listed = re.findall(r"^\| ([^|`]+?) \| ", tour, re.M)[1:]  # after the header row
    banners = re.findall(r"^# === (.+?) =+$", (ROOT / "aibutler.py").read_text(), re.M)
    assert len(listed) == len(banners), (listed, banners)
    for row, banner in zip(listed, banners):
        assert banner.startswith(row), f"CONTRIBUTING.md lists {row!r} where the part is {banner!r}"
