"""Safe under attack and faults, through the real server and the real CLI:
symlinks planted in the data directory, a full disk, a reverse proxy, broken
and dribbling receivers, hostile JSON, slow-header connections, forged log
lines, late config errors, systemd's journal."""

import concurrent.futures
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

import aibutler
from conftest import SECRET, held, http_request, ok, openai_text

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as CI has")
SERVICE_UID = 65534  # nobody: stands for the service's dynamic user


def strict_json(body):
    """What a strict receiver accepts: no NaN or Infinity tokens."""
    def refuse(name):
        raise ValueError(name)
    return json.loads(body, parse_constant=refuse)


def eventually(check, timeout=10.0, every=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(every)


# --- root, symlinks and files ---------------------------------------------------------

def service_owned_data_dir(d):
    d.data.mkdir(mode=0o700)
    os.chown(d.data, SERVICE_UID, SERVICE_UID)
    return d.data


@AS_ROOT
def test_root_never_follows_a_planted_lock_or_vault_link(daemon, tmp_path):
    d = daemon(secret=None)
    data = service_owned_data_dir(d)
    precious = tmp_path / "root-only"
    precious.write_text("root's own file\n")
    os.chmod(precious, 0o600)
    os.symlink(precious, data / "vault.json.lock")
    result = d.cli("vault", "set", "webhook_auth_secret", input="x" * 40, check=False)
    assert result.returncode == 1 and "symbolic link" in result.stderr
    assert "Traceback" not in result.stderr
    assert precious.stat().st_uid == 0 and precious.read_text() == "root's own file\n"
    os.unlink(data / "vault.json.lock")
    os.symlink(precious, data / "vault.json")
    result = d.cli("vault", "get", "webhook_auth_secret", check=False)
    assert result.returncode == 1 and "symbolic link" in result.stderr
    assert "root's own file" not in result.stdout + result.stderr
    result = d.cli("vault", "set", "other", input="value", check=False)
    assert result.returncode == 1 and "symbolic link" in result.stderr
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]


@AS_ROOT
def test_root_hands_new_files_to_the_directory_owner_on_the_descriptor(daemon):
    d = daemon(secret=None)
    data = service_owned_data_dir(d)
    d.cli("vault", "set", "webhook_auth_secret", input="y" * 40)
    d.cli("deliveries", "list")
    for name in ("vault.json", "vault.json.lock", "aibutler.db"):
        info = (data / name).stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (SERVICE_UID, 0o600), name


@AS_ROOT
@pytest.mark.parametrize("name", ["aibutler.db", "aibutler.db-wal", "aibutler.db-shm"])
def test_a_linked_database_file_is_refused_in_one_line(daemon, tmp_path, name):
    d = daemon(secret=None)
    data = service_owned_data_dir(d)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, data / name)
    result = d.cli("deliveries", "list", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "symbolic link" in result.stderr
    assert target.read_bytes() == b"" and target.stat().st_uid == 0


def test_database_files_are_0600_whatever_the_umask(daemon, receiver):
    d = daemon()
    old = os.umask(0o022)
    try:
        d.start()  # inherits umask 022
        assert d.post({"user_id": "u", "message": "hi"})[0] == 200
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.data.iterdir()
                 if p.name.startswith("aibutler.db")}
        assert set(modes) == {"aibutler.db", "aibutler.db-wal", "aibutler.db-shm"}
        assert set(modes.values()) == {0o600}, modes
        assert d.stop() == 0
    finally:
        os.umask(old)


def test_a_data_dir_others_can_write_or_read_gets_a_warning(daemon):
    d = daemon(secret=None)
    d.data.mkdir()
    os.chmod(d.data, 0o755)  # fresh install, readable by all
    d.start()
    d.wait_log(rf"can be read by other users; fix it with: chmod 700 {re.escape(str(d.data))}")
    assert d.stop() == 0
    os.chmod(d.data, 0o777)
    d.start()
    d.wait_log(rf"can be written by other users; fix it with: chmod 700 {re.escape(str(d.data))}")
    assert d.stop() == 0
    os.chmod(d.data, 0o700)
    d.start()
    assert "other users" not in d.log
    assert d.stop() == 0


# --- throttling behind a proxy ----------------------------------------------------------

def test_trusted_proxy_header_reaches_the_throttle_through_waitress(daemon):
    d = daemon("[server]\ntrusted_proxies = 127.0.0.1/32\n").start()
    wrong = {"X-Aibutler-Secret": "wrong"}
    for _ in range(10):
        assert d.post({"user_id": "u", "message": "hi"}, secret=False,
                      headers=dict(wrong, **{"X-Forwarded-For": "203.0.113.5"}))[0] == 401
    blocked = d.post({"user_id": "u", "message": "hi"}, secret=False,
                     headers=dict(wrong, **{"X-Forwarded-For": "203.0.113.5"}))
    assert blocked[0] == 429 and int(blocked[1]["Retry-After"]) > 0
    # another client behind the same proxy is not blocked
    assert d.post({"user_id": "u", "message": "hi"}, secret=False,
                  headers=dict(wrong, **{"X-Forwarded-For": "203.0.113.6"}))[0] == 401
    # and the blocked client's right secret is never refused
    assert d.post({"user_id": "u", "message": "hi"},
                  headers={"X-Forwarded-For": "203.0.113.5"})[0] == 200
    d.wait_log("10 failed attempts from 203.0.113.5")
    lines = d.log.count("203.0.113.5")
    for _ in range(5):  # blocked wrong ones: 429, and no more log lines about it
        d.post({"user_id": "u", "message": "hi"}, secret=False,
               headers=dict(wrong, **{"X-Forwarded-For": "203.0.113.5"}))
    assert d.stop() == 0
    assert d.log.count("203.0.113.5") == lines


def test_untrusted_forwarded_for_is_ignored_through_waitress(daemon):
    d = daemon().start()  # no trusted proxies: the peer address counts
    for i in range(10):
        d.post({"user_id": "u", "message": "hi"}, secret=False,
               headers={"X-Aibutler-Secret": "wrong", "X-Forwarded-For": f"198.51.100.{i}"})
    assert d.post({"user_id": "u", "message": "hi"}, secret=False,
                  headers={"X-Aibutler-Secret": "wrong"})[0] == 429
    assert d.stop() == 0


def test_the_blocked_address_table_stays_bounded(app_for):
    client = app_for(server={"metrics_public": "true"})
    auth = client.butler.auth
    auth.FAILURES_ALLOWED, auth.MAX_ADDRESSES = 1, 5  # every one blocked, all recent
    for i in range(200):
        assert client.simulate_post("/webhook/custom", remote_addr=f"192.0.2.{i}",
                                    headers={"X-Aibutler-Secret": "wrong"}).status_code == 401
    text = client.simulate_get("/metrics").text
    tracked = [line for line in text.splitlines()
               if line.startswith("aibutler_auth_tracked_addresses ")]
    assert tracked and float(tracked[0].split()[1]) <= 2 * auth.MAX_ADDRESSES


# --- nothing stuck, nothing 500 --------------------------------------------------------

class RawServer:
    """A loopback TCP server that answers each connection with `handler(conn)`."""

    def __init__(self, handler):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.connections = 0
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            with contextlib.suppress(OSError):
                conn.recv(65536)
                self.handler(conn, self.stopped)

    def close(self):
        self.stopped.set()
        self.sock.close()


@pytest.fixture
def raw_server():
    servers = []

    def make(handler):
        servers.append(RawServer(handler))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


def test_a_broken_answer_is_a_failed_attempt_not_stuck_sending(daemon, raw_server):
    broken = raw_server(lambda conn, stop: conn.sendall(b"HTTP/1.1 2OO OK\r\n\r\n"))
    url = f"http://127.0.0.1:{broken.port}/cb/path-token-123?token=query-token-456"
    d = daemon(f"[channels.webhook]\noutbound_url = {url}\n"
               "[delivery]\nretry_schedule = 100ms, 100ms\n").start()
    _, _, accepted = d.post({"user_id": "u", "message": "hello"})
    d.wait_log("FAILED for good after attempt 3")
    listing = d.cli("deliveries", "list", "--failed").stdout
    assert accepted["message_id"] in listing and "broken HTTP answer" in listing
    assert d.stop() == 0
    assert "token-123" not in d.log and "token-456" not in d.log


def test_a_dribbling_receiver_gets_a_total_deadline_per_attempt(daemon, raw_server):
    def dribble(conn, stop):
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 60:
            if stop.wait(0.25):
                return
            conn.sendall(bytes([byte]))
    slow = raw_server(dribble)
    d = daemon(f"[channels.webhook]\noutbound_url = http://127.0.0.1:{slow.port}/cb\n"
               "callback_timeout = 0.5s\n").start()
    started = time.monotonic()
    d.post({"user_id": "u", "message": "hello"})
    d.wait_log(r"attempt 1 failed \(network error: timed out\)")
    assert time.monotonic() - started < 5  # the dribble alone lasts 20 s
    assert d.stop() == 0


def exits_78_naming(daemon, cases):
    """Run `run` on each (config text, key) at once (each a real CLI process):
    exit 78, one line naming the key, nothing generated, nothing bound."""
    made = [(daemon(config, secret=None), key) for config, key in cases]
    with concurrent.futures.ThreadPoolExecutor(len(made)) as pool:
        results = list(pool.map(lambda case: case[0].cli(
            "run", "--config", str(case[0].config), check=False), made))
    for (d, key), result in zip(made, results):
        assert result.returncode == 78, (key, result.stderr)
        assert key in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr and "listening" not in result.stderr
        assert not (d.data / "vault.json").exists()  # no secret generated
    return results


def test_an_unusable_outbound_url_is_a_config_error(daemon):
    results = exits_78_naming(daemon, [
        (f"[channels.webhook]\noutbound_url = {url}\n", "[channels.webhook] outbound_url")
        for url in ("http://", "http:///x", "http://user:pw-s3cr3t@host/cb",
                    "http://host:99999/cb", "http://host/a b", "ftp://host/cb")])
    assert not any("s3cr3t" in result.stderr for result in results)


def test_hostile_json_gets_4xx_and_the_daemon_keeps_serving(daemon):
    d = daemon().start()
    deep = b'{"user_id": "u", "message": "m", "metadata": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    status, _, body = d.post(deep)
    assert status in (400, 422) and body["error"]["status"] == status
    for field, value in (("user_id", "\\ud800"), ("message", "hi \\udfff"),
                         ("metadata", {"note": "\\ud83d"})):
        request = {"user_id": "u", "message": "m", field: value}
        raw = json.dumps(request).replace("\\\\u", "\\u").encode()
        status, _, body = d.post(raw)
        assert status == 422, body
        assert body["error"]["field"].startswith(field)
    status, _, body = d.post({"user_id": "u", "message": "m",
                              "attachments": [{"url": "http://[::1"}]})
    assert status == 422 and body["error"]["field"] == "attachments[0].url"
    status, _, body = d.post(b'{"user_id": "u", "message": "m", "metadata": {"x": NaN}}')
    assert status == 400
    raw = json.dumps({"user_id": "u", "message": "hi"}).encode()
    for timestamp in ("\xb2" * 3, "1" * 21):
        status, _, body = http_request(d.url + "/webhook/custom", raw, {
            "Content-Type": "application/json", "webhook-id": "msg_x",
            "webhook-timestamp": timestamp, "webhook-signature": "v1,AAAA"}, "POST")
        assert status == 401 and body["error"]["status"] == 401
    assert d.get("/healthz")[0] == 200
    assert d.stop() == 0
    assert "Traceback" not in d.log, d.log


def test_overflowing_arithmetic_is_a_tool_error_and_bodies_stay_strict_json(daemon, receiver):
    callbacks = receiver()
    sync = daemon().start()
    for expression in ("10.0**308*10", "(10.0**308 * 10) / 2"):
        status, _, body = sync.post({"user_id": "u", "message": f"what is {expression}?"})
        assert status == 200 and "too large" in body["tool_calls"][0]["error"]
    assert sync.stop() == 0
    d = daemon(f"[channels.webhook]\noutbound_url = {callbacks.url}\n").start()
    d.post({"user_id": "u", "message": "what is 10.0**308*10?"})
    strict_json(callbacks.wait_for(1)[0]["body"])
    assert d.stop() == 0


# --- a full disk ---------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(path, size="3m"):
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                             str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path):
    """Write a filler file until the disk is full; returns it."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):  # ENOSPC: the next, smaller size
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


@AS_ROOT
def test_a_full_disk_is_a_503_then_heals_without_a_restart(daemon, receiver, tmp_path):
    thinking = threading.Event()
    model = receiver([held(ok(openai_text("thought about it")), thinking)])
    callbacks = receiver()
    with small_disk(tmp_path / "disk") as disk:
        d = daemon(f"[agent]\nprovider = openai\nbase_url = {model.url}\n"
                   f"[channels.webhook]\noutbound_url = {callbacks.url}\n",
                   env={"AIBUTLER_DATA": str(disk / "data")})
        d.data = disk / "data"
        d.vault.set("webhook_auth_secret", SECRET)
        d.start()
        status, _, accepted = d.post({"user_id": "u", "message": "first"})
        assert status == 202
        model.wait_for(1)
        filler = fill(disk)  # the model is still thinking
        thinking.set()
        d.wait_log("cannot write the database \\(the disk is full\\)")
        status, headers, body = d.post({"user_id": "u", "message": "second"})
        assert status == 503 and "disk is full" in body["error"]["description"]
        assert int(headers["Retry-After"]) > 0
        ready = d.get("/readyz")
        assert ready[0] == 503 and ready[2]["checks"]["storage"] is False
        metrics = d.get("/metrics", {"X-Aibutler-Secret": SECRET})[2]
        assert "aibutler_queue_depth 1" in metrics
        filler.unlink()
        delivered = callbacks.wait_for(1, timeout=20)[0]["json"]
        assert delivered["message_id"] == accepted["message_id"]
        assert delivered.get("reply") == "thought about it", (delivered, d.log)
        eventually(lambda: d.get("/readyz")[0] == 200)
        status, _, _ = d.post({"user_id": "u", "message": "third"})
        assert status == 202
        callbacks.wait_for(2, timeout=20)
        assert d.stop() == 0


# --- connection exhaustion -----------------------------------------------------------

def test_slow_header_connections_from_one_address_cannot_take_the_service_down(daemon):
    d = daemon("[server]\nheader_timeout = 0.5s\nclient_connection_limit = 20\n").start()
    attackers, stop = [], threading.Event()
    for _ in range(100):
        sock = socket.socket()
        sock.settimeout(2)
        sock.bind(("127.0.0.2", 0))  # one misbehaving address
        with contextlib.suppress(OSError):
            sock.connect(("127.0.0.1", d.port))
            sock.sendall(b"G")
        sock.settimeout(0.01)
        attackers.append(sock)

    def trickle():
        while not stop.wait(0.5):
            for sock in attackers:
                with contextlib.suppress(OSError):
                    sock.sendall(b"E")
    threading.Thread(target=trickle, daemon=True).start()
    try:
        slowest = 0.0
        for _ in range(15):  # probes every 0.1 s during the attack, from another address
            started = time.monotonic()
            status, _, _ = http_request(d.url + "/healthz", None, {}, "GET", timeout=5)
            slowest = max(slowest, time.monotonic() - started)
            assert status == 200
            time.sleep(0.1)
        assert slowest < 1.0

        answers = {}

        def closed(sock):  # told 408 (or never let in), then closed
            try:
                data = sock.recv(4096)
            except socket.timeout:
                return False
            except OSError:
                return True
            answers[sock] = answers.get(sock, b"") + data
            return data == b""
        # every trickler is gone by the header deadline (or was never let in)
        eventually(lambda: all(closed(sock) for sock in attackers), timeout=10)
    finally:
        stop.set()
        for sock in attackers:
            sock.close()
    assert d.stop() == 0
    assert "client_connection_limit" in d.log and "header_timeout" in d.log
    told = [a for a in answers.values() if a]
    assert told and all(a.startswith(b"HTTP/1.1 408 ") and b'"status": 408' in a and
                        b"[server] header_timeout" in a for a in told)


# --- logs and terminal output -----------------------------------------------------------

def test_request_values_cannot_forge_log_lines_or_reach_the_terminal(daemon, receiver):
    callbacks = receiver([(400, {}, b"", 0)])
    d = daemon(f"[channels.webhook]\noutbound_url = {callbacks.url}\n").start()
    http_request(d.url + "/nope%0a2026-01-01%2000:00:00,000%20ERROR%20aibutler:%20FORGED"
                 "%1b[2J", None, {}, "GET")
    assert d.post({"user_id": "evil\x1b[31m\nFORGED", "message": "hi"})[0] == 422
    d.post({"user_id": "evil\u202eFORGED\u2066line\u200bcolumn", "message": "hi"})
    d.wait_log("FAILED for good")
    listing = d.cli("deliveries", "list").stdout
    assert d.stop() == 0
    assert not any(line.startswith("2026-01-01 00:00:00,000 ERROR")
                   for line in d.log.splitlines())
    assert "\x1b" not in d.log and "nope\\n2026-01-01" in d.log and "\\x1b[2J" in d.log
    assert "\x1b" not in listing and len(listing.strip().splitlines()) == 1
    assert "evil\\u202eFORGED\\u2066line\\u200bcolumn" in listing  # bidi, invisible: shown
    assert not any(c in listing + d.log for c in "\u202e\u2066\u200b")
    assert len(listing.strip().split("\t")) == 6


# --- config that fails late ---------------------------------------------------------------

def test_bad_config_exits_78_before_binding_or_generating_a_secret(daemon):
    exits_78_naming(daemon, [
        ("[server]\nport = 70000\n", "[server] port"),
        ("[server]\nport = http\n", "[server] port"),
        ("[server]\nhost = no-such-host.invalid\n", "[server] host"),
        ("[server]\nhost = 999.1.2.3.4\n", "[server] host"),
        ("[channels.webhook]\npath = webhook\n", "[channels.webhook] path"),
        ("[channels.webhook]\npath = /healthz\n", "[channels.webhook] path"),
        ("[channels.webhook]\npath = /hook/{id}\n", "[channels.webhook] path"),
        ("[agent]\ntimeout = 0\n", "[agent] timeout"),
        ("[channels.webhook]\ncallback_timeout = 0s\n", "[channels.webhook] callback_timeout"),
        ("[server]\nchannel_timeout = 0ms\n", "[server] channel_timeout"),
        ("[agent]\ntemperature = nan\n", "[agent] temperature"),
        ("[server]\nthreads = 100000\n", "[server] threads")])


def test_an_unusable_data_dir_or_database_is_one_line_everywhere(daemon):
    d = daemon(secret=None)
    d.data.write_text("not a directory")
    for command in (("run",), ("deliveries", "list"), ("vault", "list"),
                    ("vault", "set", "x")):
        result = d.cli(*command, input="value", check=False)
        assert result.returncode != 0 and str(d.data) in result.stderr, command
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    d.data.unlink()
    d.data.mkdir(mode=0o700)
    (d.data / "aibutler.db").write_bytes(b"this is not a database" * 100)
    for command in (("run",), ("deliveries", "list"), ("deliveries", "retry", "--all-failed")):
        result = d.cli(*command, check=False)
        assert result.returncode == 1 and "aibutler.db" in result.stderr, command
        assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0


# --- under systemd -----------------------------------------------------------------------

def test_journal_lines_carry_syslog_priorities_and_no_timestamps(daemon, tmp_path):
    d = daemon(secret=None)
    log_path = tmp_path / "journal.log"
    with open(log_path, "w") as stream:
        info = os.fstat(stream.fileno())
        env = dict(d.env, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        proc = subprocess.Popen([sys.executable, "aibutler.py", "run", "--port", "0"],
                                cwd=d.folder, env=env, stdout=stream, stderr=stream)
        try:
            eventually(lambda: "listening" in log_path.read_text())
            port = re.search(r"listening on http://[\d.]+:(\d+)", log_path.read_text()).group(1)
            http_request(f"http://127.0.0.1:{port}/webhook/custom", b"{}",
                         {"X-Aibutler-Secret": "wrong"}, "POST")
            eventually(lambda: "rejected" in log_path.read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    lines = log_path.read_text().splitlines()
    assert any(line.startswith("<6>INFO aibutler: aibutler ") for line in lines)
    assert any(line.startswith("<4>WARNING aibutler: webhook: no webhook_auth_secret")
               for line in lines)
    assert any(line.startswith("<4>WARNING aibutler: auth: rejected") for line in lines)
    assert any(re.fullmatch(r"<6>INFO aibutler: POST /webhook/custom 401 \d+\.\dms", line)
               for line in lines)  # a request's line
    assert all(re.match(r"<[3467]>", line) for line in lines), lines
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in lines)
    # a fatal error before logging is set up is an error in the journal too
    with open(log_path, "w") as stream:
        info = os.fstat(stream.fileno())
        env = dict(d.env, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}", AIBUTLER_PORT="70000")
        assert subprocess.run([sys.executable, "aibutler.py", "run"], cwd=d.folder, env=env,
                              stdout=stream, stderr=stream).returncode == 78
    assert log_path.read_text().startswith("<3>aibutler: bad configuration: ")
    # an inherited JOURNAL_STREAM that is not our stderr changes nothing
    d.env["JOURNAL_STREAM"] = "1:1"
    d.start()
    http_request(d.url + "/openapi.json", None,
                 {"X-Aibutler-Secret": d.vault.get("webhook_auth_secret")}, "GET")
    assert d.stop() == 0
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING)", d.log_lines[0])
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO aibutler: "
                     r"GET /openapi.json 200 \d+\.\dms$", d.log, re.MULTILINE)


def test_first_start_prints_a_command_that_works_where_the_daemon_runs(daemon):
    d = daemon(secret=None).start()
    assert d.stop() == 0
    hint = re.search(r"Print it with: (.+)$", d.log, re.M).group(1)
    assert hint.startswith(f"AIBUTLER_DATA={d.data} {sys.executable} ")
    words = shlex.split(hint)
    env = dict(d.env)
    env.pop("AIBUTLER_DATA")
    for word in words[:1]:
        name, value = word.split("=", 1)
        env[name] = value
    result = subprocess.run(words[1:], env=env, cwd="/", capture_output=True, text=True)
    assert result.returncode == 0 and len(result.stdout.strip()) == 64
    assert result.stdout.strip() == d.cli("vault", "get", "webhook_auth_secret").stdout.strip()


def test_a_stop_past_the_deadline_names_only_busy_threads(daemon, receiver):
    model = receiver([ok(openai_text("slow"), delay=8)])
    callbacks = receiver()
    d = daemon(f"[server]\nshutdown_timeout = 1s\n[agent]\nprovider = openai\n"
               f"base_url = {model.url}\n[channels.webhook]\noutbound_url = {callbacks.url}\n"
               "[delivery]\nworkers = 2\n").start()
    d.post({"user_id": "u", "message": "take your time"})
    model.wait_for(1)
    assert d.stop() == 0
    busy = [line for line in d.log.splitlines() if "still busy at shutdown" in line]
    assert len(busy) == 1, busy  # the idle dispatchers and the idle worker are not named
    assert re.search(r"turn-worker: still busy .*: turn-worker-[01]$", busy[0]), busy


def test_a_port_in_use_exits_69_which_the_unit_does_not_restart(daemon):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    d = daemon()
    result = d.cli("run", "--config", str(d.config), "--port",
                   str(holder.getsockname()[1]), check=False)
    holder.close()
    assert result.returncode == 69 and "cannot listen on 127.0.0.1" in result.stderr
    unit = (aibutler_root() / "aibutler.service").read_text()
    assert re.search(r"^RestartPreventExitStatus=.*\b69\b", unit, re.M)
    documentation = re.search(r"^Documentation=file:(\S+)$", unit, re.M).group(1)
    readme = (aibutler_root() / "README.md").read_text()
    assert f"README.md {documentation}" in readme  # the install steps put it there


def aibutler_root():
    import pathlib
    return pathlib.Path(aibutler.__file__).resolve().parent


# --- found in review ------------------------------------------------------------------

def test_a_key_with_a_newline_never_reaches_a_body_or_the_log(app_for, vault, receiver,
                                                              caplog):
    model = receiver([ok(openai_text("hi"))])
    vault.set("openai_api_key", "sk-LEAKED-1234\nX-Injected: yes")
    client = app_for(agent={"provider": "openai", "base_url": model.url})
    result = client.simulate_post("/webhook/custom", json={"user_id": "u", "message": "hi"},
                                  headers={"X-Aibutler-Secret": SECRET,
                                           "Content-Type": "application/json"})
    assert result.status_code == 502 and "openai_api_key holds control characters" in result.text
    assert "LEAKED" not in result.text and "LEAKED" not in caplog.text
    assert model.requests == []


def test_numbers_that_overflow_are_not_json_either(app_for, receiver):
    client = app_for()
    result = client.simulate_post("/webhook/custom", body=b'{"user_id": "u", "message": "m", '
                                  b'"metadata": {"x": 1e999}}',
                                  headers={"X-Aibutler-Secret": SECRET,
                                           "Content-Type": "application/json"})
    assert result.status_code == 400 and "out of range" in result.json["error"]["description"]
    with pytest.raises(aibutler.ToolError, match="not valid JSON"):
        aibutler.tool_arguments('{"latitude": 1e999}')


def test_a_host_naming_several_addresses_is_a_config_error(daemon):
    found = {info[4][0] for info in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)}
    if len(found) < 2:
        pytest.skip("localhost names one address here")
    exits_78_naming(daemon, [("[server]\nhost = localhost\n", "[server] host")])


def test_under_systemd_the_hint_says_sudo_and_the_data_dir():
    hint = aibutler.command_hint("/var/lib/aibutler", "vault", "get", "webhook_auth_secret",
                                 env={"INVOCATION_ID": "x"})
    assert hint.startswith("sudo AIBUTLER_DATA=/var/lib/aibutler ")
    assert hint.endswith(" vault get webhook_auth_secret") and sys.executable in hint


def test_a_fifo_planted_as_the_vault_does_not_hang_the_cli(daemon):
    d = daemon(secret=None)
    d.data.mkdir(mode=0o700)
    os.mkfifo(d.data / "vault.json")
    result = d.cli("vault", "get", "webhook_auth_secret", check=False)
    assert result.returncode == 1 and "not a regular file" in result.stderr


def test_a_dispatcher_outlives_a_failed_read_of_the_outbox(app_for, receiver):
    callbacks = receiver()
    client = app_for(webhook={"outbound_url": callbacks.url})
    store = client.butler.store
    real, failures = store.next_delivery_due, []

    def flaky():  # one disk I/O error, as an SD card gives
        if not failures:
            failures.append(1)
            raise sqlite3.OperationalError("disk I/O error")
        return real()
    store.next_delivery_due = flaky
    client.butler.start()
    eventually(lambda: failures)
    assert client.simulate_post("/webhook/custom", json={"user_id": "u", "message": "hi"},
                                headers={"X-Aibutler-Secret": SECRET,
                                         "Content-Type": "application/json"}).status_code == 202
    callbacks.wait_for(1)
    assert client.simulate_get("/readyz").json["checks"]["dispatchers"] is True
