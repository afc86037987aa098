"""The command line and the daemon, run for real: aibutler.py copied alone into a
temporary folder, subprocesses, HTTP on loopback."""

import base64
import concurrent.futures
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys

import pytest

import aibutler
from conftest import SECRET


def test_help_version_and_usage_exit_codes(daemon):
    d = daemon(secret=None)
    result = d.cli("--help")
    assert result.returncode == 0 and "run" in result.stdout and "vault" in result.stdout
    assert d.cli("--version").stdout.strip() == f"aibutler {aibutler.__version__}"
    assert d.cli("frobnicate", check=False).returncode == 2
    assert d.cli("vault", check=False).returncode == 2
    assert d.cli("vault", "set", "Bad-Name", "x", check=False).returncode == 2
    assert d.cli("vault", "set", "port", "x", check=False).returncode == 2  # AIBUTLER_PORT
    assert d.cli("vault", "rotate", "openai_api_key", check=False).returncode == 2


def test_vault_set_get_list_delete(daemon):
    d = daemon(secret=None)
    result = d.cli("vault", "set", "openai_api_key", input="sk-test-123\n")
    assert result.stderr.startswith("aibutler: stored")  # a pipe's newline is no news
    assert d.cli("vault", "get", "openai_api_key").stdout == "sk-test-123\n"
    result = d.cli("vault", "set", "openai_api_key", input="  sk-test-123 \n\n")
    assert "removed spaces or blank lines around the value" in result.stderr
    assert d.cli("vault", "get", "openai_api_key").stdout == "sk-test-123\n"
    vault_file = d.data / "vault.json"
    assert stat.S_IMODE(vault_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.data.stat().st_mode) == 0o700
    listing = d.cli("vault", "list").stdout
    assert "openai_api_key" in listing and "sk-test-123" not in listing
    result = d.cli("vault", "set", "other", "on-argv")
    assert "visible in `ps`" in result.stderr
    assert d.cli("vault", "get", "other").stdout.strip() == "on-argv"
    assert d.cli("vault", "delete", "other").returncode == 0
    assert d.cli("vault", "get", "other", check=False).returncode == 1
    assert d.cli("vault", "delete", "other", check=False).returncode == 1
    assert d.cli("vault", "set", "empty", input="  \n", check=False).returncode == 1
    pasted = d.cli("vault", "set", "openai_api_key", input="sk-one\nsk-two\n", check=False)
    assert pasted.returncode == 1 and "control characters" in pasted.stderr
    assert "sk-one" not in pasted.stderr  # the value is never echoed
    assert d.cli("vault", "get", "openai_api_key").stdout == "sk-test-123\n"  # kept


def test_vault_lookup_order_env_then_credential_then_file(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    vault = aibutler.Vault(str(tmp_path / "vault.json"), env={})
    vault.set("api_key", "from-file")
    assert vault.get("api_key") == "from-file"
    (creds / "api_key").write_text("from-credential\n")
    vault.env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert vault.get("api_key") == "from-credential"
    vault.env["AIBUTLER_API_KEY"] = "from-env"
    assert vault.get("api_key") == "from-env"


def test_concurrent_vault_sets_lose_nothing(daemon):
    d = daemon(secret=None)

    def set_one(i):
        return d.cli("vault", "set", f"key_{i}", input=f"value-{i}").returncode
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(set_one, range(16))) == {0}
    stored = json.loads((d.data / "vault.json").read_text())
    assert {k: v for k, v in stored.items() if k.startswith("key_")} == {
        f"key_{i}": f"value-{i}" for i in range(16)}


def test_bad_or_missing_config_exits_78_naming_the_file(daemon):
    d = daemon()
    result = d.cli("run", "--config", str(d.folder / "missing.ini"), check=False)
    assert result.returncode == 78 and "missing.ini" in result.stderr
    d.config.write_text("[server]\nport = lots\n")
    result = d.cli("run", "--config", str(d.config), check=False)
    assert result.returncode == 78 and "config.ini" in result.stderr and "port" in result.stderr
    d.config.write_text("this is not ini\n")
    assert d.cli("run", "--config", str(d.config), check=False).returncode == 78
    d.env["AIBUTLER_WEBHOOK_AUTH_TYPE"] = "digest"
    d.config.write_text("")
    result = d.cli("run", "--config", str(d.config), check=False)
    assert result.returncode == 78 and "AIBUTLER_WEBHOOK_AUTH_TYPE" in result.stderr


def test_unknown_config_keys_are_warned_about(daemon):
    d = daemon("[server]\nprot = 1\n[sever]\nhost = x\n")
    d.start()
    d.wait_log(r"unknown key 'prot' in \[server\]")
    d.wait_log(r"unknown section \[sever\]")
    assert d.stop() == 0


def test_first_run_generates_a_secret_without_logging_it(daemon):
    d = daemon(secret=None)
    d.start()
    d.wait_log("generated")
    secret = d.cli("vault", "get", "webhook_auth_secret").stdout.strip()
    assert len(secret) == 64
    assert secret not in d.log
    d.secret = secret
    status, _, body = d.post({"user_id": "u", "message": "hello"})
    assert status == 200 and body["reply"].startswith("Hello")
    status, _, _ = d.post({"user_id": "u", "message": "hello"}, secret=False)
    assert status == 401
    assert d.stop() == 0
    assert secret not in d.log


def test_sync_round_trip_logs_and_clean_stop(daemon):
    d = daemon()
    d.start()
    d.wait_log("provider builtin")
    d.wait_log("channels: webhook at /webhook/custom")
    status, _, body = d.post({"user_id": "u", "message": "remember that the code is 1234"})
    assert status == 200 and body["tool_calls"][0]["name"] == "remember"
    status, _, body = d.post({"user_id": "u", "message": "what do you remember about code?"})
    assert "1234" in body["reply"]
    d.wait_log(r"POST /webhook/custom 200 [\d.]+ms")
    assert "remember that the code" not in d.log  # message text is not logged at INFO
    assert SECRET not in d.log
    assert d.stop(signal.SIGINT) == 0
    assert "stopped" in d.log


def test_environment_overrides_host_and_port(daemon):
    d = daemon(env={"AIBUTLER_PORT": "70000"})
    result = d.cli("run", check=False)  # the variable is read, and checked like the file
    assert result.returncode == 78
    assert "environment variable AIBUTLER_PORT = '70000'" in result.stderr
    d.env["AIBUTLER_PORT"] = "3377"
    d.start("--host", "127.0.0.1")  # --port 0 (any free port) beats the variable
    status, _, body = d.get("/healthz")
    assert status == 200 and body["status"] == "ok"
    assert d.stop() == 0


@pytest.mark.parametrize("auth_type", ["bearer", "basic", "none"])
def test_async_callback_with_each_auth_type(daemon, receiver, auth_type):
    callbacks = receiver()
    d = daemon(f"[channels.webhook]\noutbound_url = {callbacks.url}/hook?token=abc\n",
               env={"AIBUTLER_WEBHOOK_AUTH_TYPE": auth_type})
    d.start()
    d.wait_log("webhook: tools registered")
    status, _, body = d.post({"user_id": "user-123", "message": "what is 2+3?"})
    assert status == 202
    assert body["status"] == "accepted" and body["session_id"].startswith("sess-")
    request = callbacks.wait_for(1)[0]
    assert request["path"] == "/hook?token=abc"
    assert request["json"] == {"session_id": body["session_id"], "reply": "2+3 = 5",
                               "in_reply_to": "user-123", "message_id": body["message_id"],
                               "tool_calls": [{"name": "calculate",
                                               "arguments": {"expression": "2+3"},
                                               "result": {"expression": "2+3", "value": 5}}]}
    expected = {"bearer": f"Bearer {SECRET}", "none": None,
                "basic": "Basic " + base64.b64encode(f"aibutler:{SECRET}".encode()).decode()}
    assert request["headers"].get("Authorization") == expected[auth_type]
    assert d.stop() == 0
    assert SECRET not in d.log and "token=abc" not in d.log


def test_pip_install_gives_the_aibutler_command(tmp_path):
    root = pathlib.Path(__file__).resolve().parent.parent
    source = tmp_path / "source"  # pip builds in the tree: keep build/ out of the checkout
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    venv = tmp_path / "venv"
    # without pip of its own (ensurepip takes seconds); this Python's pip installs into it
    made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                           "--without-pip", str(venv)], capture_output=True, timeout=120)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"],
                             capture_output=True).returncode == 0
    if made.returncode != 0 or not has_pip:
        pytest.skip("this Python has no venv or no pip (Debian: apt install python3-venv "
                    "python3-pip)")
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                          "install", "-q", "--no-deps", str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    result = subprocess.run([str(venv / "bin" / "aibutler"), "--version"],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.stdout.strip() == f"aibutler {aibutler.__version__}"
    # the first start's hint names the command the user has: `aibutler`, no paths
    env = dict(os.environ, AIBUTLER_DATA=str(tmp_path / "data"))
    daemon = subprocess.Popen([str(venv / "bin" / "aibutler"), "run", "--port", "0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=tmp_path)
    try:
        lines = []
        for line in daemon.stdout:
            lines.append(line)
            if "listening on" in line:
                break
    finally:
        daemon.terminate()
        daemon.wait(20)
    hint = next(line for line in lines if "Print it with:" in line)
    assert hint.rstrip().endswith(" aibutler vault get webhook_auth_secret"), hint
    assert "python" not in hint and "site-packages" not in hint, hint


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, like `sudo aibutler vault set`")
def test_vault_set_as_root_leaves_the_file_readable_by_the_service_user(tmp_path):
    data = tmp_path / "state"
    data.mkdir(mode=0o700)
    os.chown(data, 4242, 4242)  # the service's (dynamic) user owns its state directory
    vault = aibutler.Vault(str(data / "vault.json"), env={})
    vault.set("webhook_auth_secret", "abc")
    for name in ("vault.json", "vault.json.lock"):
        info = (data / name).stat()
        assert (info.st_uid, info.st_gid) == (4242, 4242)
        assert stat.S_IMODE(info.st_mode) == 0o600
