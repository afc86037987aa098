"""Shared helpers: real loopback HTTP servers (callback receivers, fake model
servers) and a real daemon started from aibutler.py copied alone into a
temporary folder."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import aibutler

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECRET = "s3cret-for-tests-0123456789abcdef"


def make_config(**sections):
    """A Config from the defaults, with overrides: make_config(server={"port": "0"})."""
    values = {}
    for section, keys in aibutler.CONFIG_SCHEMA.items():
        given = sections.get(section.split(".")[-1], {})
        values[section] = {key: parse(given.get(key, default))
                           for key, (default, parse) in keys.items()}
    return aibutler.Config(values)


class Recorder(ThreadingHTTPServer):
    """A loopback HTTP server that records every request and answers from a
    script: a list of (status, headers, body, delay) used in order, the last
    one repeated."""

    daemon_threads = True
    POLL = 0.02

    def __init__(self, script=None):
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.requests = []
        self.script = list(script or [(200, {}, b"{}", 0)])
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        # accept() must never block the loop (a connection may vanish between the
        # poll and the accept), or shutdown() waits forever
        self.socket.settimeout(self.POLL)
        # a short poll: shutdown() waits for the loop to notice, 0.5 s by default
        threading.Thread(target=self.serve_forever, args=(self.POLL,), daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_answer(self, request):
        with self.lock:
            index = min(len(self.requests), len(self.script) - 1)
            self.requests.append(request)
            self.arrived.notify_all()
            answer = self.script[index]
        return answer(request) if callable(answer) else answer

    def wait_for(self, count, timeout=15):
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} requests, got {len(self.requests)}")
                self.arrived.wait(left)
            return list(self.requests)

    def close(self):
        self.shutdown()
        self.server_close()


class RecordingHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        request = {"path": self.path, "headers": self.headers, "body": body,
                   "at": time.time()}
        try:
            request["json"] = json.loads(body)
        except ValueError:
            request["json"] = None
        status, headers, answer, delay = self.server.next_answer(request)
        if delay:
            time.sleep(delay)
        if isinstance(answer, (dict, list)):
            answer = json.dumps(answer).encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST  # a GET is recorded and answered the same way, with an empty body


@pytest.fixture
def receiver():
    """Start a Recorder (receiver(script)) or one of its kinds (receiver(kind=Cls,
    **options)); each is closed after the test."""
    servers = []

    def start(script=None, kind=None, **options):
        server = Recorder(script) if kind is None else kind(**options)
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.close()


def until(check, timeout=15.0):
    """Wait for something observable, polling briefly."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.02)


def in_background(call):
    """Run call() in a thread: (the thread, a list that gets its result)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def gauge(d, name):
    """A gauge's value in a running daemon's /metrics."""
    text = d.get("/metrics", {"X-Aibutler-Secret": d.secret})[2]
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


def openai_text(text):
    return {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


def openai_tool_call(name, arguments, call_id="call_1"):
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": "chatcmpl-2", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": name, "arguments": args}}]}}]}


def anthropic_text(text):
    return {"id": "msg_1", "type": "message", "role": "assistant", "stop_reason": "end_turn",
            "content": [{"type": "text", "text": text}]}


def anthropic_tool_use(name, arguments, use_id="toolu_1"):
    return {"id": "msg_2", "type": "message", "role": "assistant", "stop_reason": "tool_use",
            "content": [{"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": use_id, "name": name, "input": arguments}]}


def ok(body, delay=0, headers=None):
    return (200, headers or {"Content-Type": "application/json"}, body, delay)


def held(answer, gate, timeout=30):
    """A script entry that answers only once gate (a threading.Event) is set: a
    model still thinking, or a receiver still busy, for exactly as long as the
    test needs, instead of a delay that hopes to be long enough."""
    def respond(request):
        gate.wait(timeout)
        return answer
    return respond


# How DaemonProcess runs the copied file: as the systemd unit does, a module
# whose byte code was compiled once (compiling 7,000 lines costs each process
# about 0.1 s of CPU: hundreds of daemons and CLI calls on two cores).
# tests/test_cli.py and others still run `python3 aibutler.py` as printed.
AIBUTLER = ("-m", "aibutler")
_BYTE_CODE = []


def copy_with_byte_code(folder):
    """aibutler.py alone in folder, with its byte code beside it (valid: the
    copy keeps the source's mtime and size)."""
    import importlib.util
    import py_compile
    target = pathlib.Path(folder) / "aibutler.py"
    shutil.copy2(ROOT / "aibutler.py", target)
    if not _BYTE_CODE:
        _BYTE_CODE.append(py_compile.compile(str(target), doraise=True))
        return
    cached = pathlib.Path(importlib.util.cache_from_source(str(target)))
    cached.parent.mkdir(exist_ok=True)
    shutil.copy2(_BYTE_CODE[0], cached)


class DaemonProcess:
    """aibutler.py copied alone into a temp folder and run as a subprocess."""

    def __init__(self, folder, config_text="", env=None, secret=SECRET):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        copy_with_byte_code(self.folder)
        self.data = self.folder / "data"
        self.config = self.folder / "config.ini"
        self.config.write_text(config_text)
        self.env = dict(os.environ, AIBUTLER_DATA=str(self.data), PYTHONUNBUFFERED="1")
        for name in [n for n in self.env if n.startswith(("AIBUTLER_WEBHOOK", "NOTIFY_SOCKET",
                                                           "WATCHDOG_"))]:
            del self.env[name]
        self.env.update(env or {})
        self.secret = secret
        if secret:  # in-process: the CLI path has its own tests in test_cli.py
            self.vault.set("webhook_auth_secret", secret)
        self.proc = None
        self.log_lines = []  # ends with None once the daemon's output has closed
        self.logged = threading.Condition()

    @property
    def vault(self):
        """The daemon's vault file, as `vault set` would write it (same lock and modes)."""
        return aibutler.Vault(str(self.data / "vault.json"), env={})

    def cli(self, *args, input=None, check=True):
        result = subprocess.run([sys.executable, *AIBUTLER, *args], cwd=self.folder,
                                env=self.env, input=input, capture_output=True, text=True,
                                timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}: {result.stderr}")
        return result

    def start(self, *extra, port=0):
        self.log_lines = []
        self.proc = subprocess.Popen(
            [sys.executable, *AIBUTLER, "run", "--config", str(self.config),
             "--port", str(port), *extra], cwd=self.folder, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pump = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self.pump.start()
        match = self.wait_log(r"listening on http://[\d.]+:(\d+)", timeout=15,
                              what="daemon did not start")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _pump(self, stdout):
        """Collect the daemon's log lines, waking whoever waits for one."""
        for line in stdout:
            with self.logged:
                self.log_lines.append(line)
                self.logged.notify_all()
        with self.logged:
            self.log_lines.append(None)  # end of output: the process has exited
            self.logged.notify_all()

    @property
    def log(self):
        return "".join(line for line in self.log_lines if line)

    def post(self, body, headers=None, path="/webhook/custom", secret=True, timeout=30):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"}
        if secret:
            all_headers["X-Aibutler-Secret"] = self.secret
        all_headers.update(headers or {})
        return http_request(self.url + path, data, all_headers, "POST", timeout)

    def get(self, path, headers=None):
        return http_request(self.url + path, None, headers or {}, "GET")

    def stop(self, sig=signal.SIGTERM, timeout=20):
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout=20):
        """The exit code, once the daemon has exited and all it wrote is in self.log."""
        code = self.proc.wait(timeout)
        self.pump.join(10)
        return code

    def wait_closed(self, timeout=15):
        """Wait until the daemon no longer accepts connections: its graceful stop
        has begun (it closes the listening socket first)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except ConnectionRefusedError:
                return
            assert time.monotonic() < deadline, "the daemon kept accepting connections"
            time.sleep(0.005)

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)
        self.pump.join(10)

    def wait_log(self, pattern, timeout=15, what=None):
        """The first match of pattern in the log, waiting up to timeout for it."""
        deadline = time.monotonic() + timeout
        with self.logged:
            while True:
                match = re.search(pattern, self.log)
                if match:
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.log_lines and self.log_lines[-1] is None):
                    ended = " (the daemon exited)" if self.log_lines[-1:] == [None] else ""
                    raise AssertionError(f"{what or repr(pattern) + ' not in log'}{ended}:\n"
                                         f"{self.log}")
                self.logged.wait(left)


def http_request(url, data, headers, method, timeout=30):
    """(status, headers, parsed JSON or text) for any status."""
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer_headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, answer_headers, body = exc.code, exc.headers, exc.read()
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = body.decode("utf-8", "replace")
    return status, answer_headers, parsed


@pytest.fixture
def daemon(tmp_path):
    started = []

    def make(config_text="", env=None, secret=SECRET, folder=None):
        d = DaemonProcess(folder or tmp_path / f"d{len(started)}", config_text, env, secret)
        started.append(d)
        return d
    yield make
    for d in started:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


@pytest.fixture
def vault(tmp_path):
    v = aibutler.Vault(str(tmp_path / "vault.json"), env={})
    v.set("webhook_auth_secret", SECRET)
    return v


@pytest.fixture
def store(tmp_path):
    s = aibutler.Store(str(tmp_path / "aibutler.db"))
    yield s
    s.close()


@pytest.fixture
def app_for(vault, store):
    """A falcon TestClient for a Butler built from config overrides."""
    from falcon import testing
    butlers = []

    def make(**sections):
        sections.setdefault("limits", {"rate": "0", "user_rate": "0"})
        butler = aibutler.Butler(make_config(**sections), vault, store)
        butlers.append(butler)
        client = testing.TestClient(butler.app())
        client.butler = butler
        return client
    yield make
    for butler in butlers:
        butler.stop(time.monotonic() + 5)


def auth(extra=None):
    headers = {"X-Aibutler-Secret": SECRET, "Content-Type": "application/json"}
    headers.update(extra or {})
    return headers
