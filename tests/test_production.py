"""Running unattended on a small device: systemd notify and watchdog, secret
rotation, hot reload, auth throttling, signed inbound requests, metrics."""

import base64
import hashlib
import hmac
import json
import logging
import os
import signal
import socket
import threading
import time

import pytest
from falcon import testing

import aibutler
from conftest import SECRET, auth, make_config, ok, openai_text, openai_tool_call


def eventually(check, timeout=5.0, every=0.1):
    """The vault file is re-checked at most once a second."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(every)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []

    def read(self, timeout=5):
        self.sock.settimeout(timeout)
        message = self.sock.recv(4096).decode()
        self.messages.append(message)
        return message

    def wait_for(self, text, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.read(max(0.01, deadline - time.monotonic()))
            if text in message:
                return message
        raise AssertionError(f"{text!r} not received; got {self.messages}")


def test_sd_notify_ready_status_watchdog_and_stopping(daemon, tmp_path):
    notify = NotifySocket(tmp_path / "notify")
    d = daemon(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
    d.start()
    ready = notify.wait_for("READY=1")
    assert "STATUS=serving on 127.0.0.1:" in ready and "queued" in ready
    notify.wait_for("WATCHDOG=1", timeout=3)
    notify.wait_for("WATCHDOG=1", timeout=3)
    assert d.stop() == 0
    notify.wait_for("STOPPING=1")


def test_sd_notify_abstract_socket_and_outside_systemd():
    name = f"aibutler-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    assert aibutler.sd_notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
    assert sock.recv(100) == b"READY=1"
    assert aibutler.sd_notify("READY=1", {}) is False


def test_watchdog_stops_while_a_worker_is_wedged(tmp_path, vault, store, receiver,
                                                 monkeypatch):
    monkeypatch.setattr(aibutler, "TURN_SLACK", 0.2)  # what a turn may take beyond its calls
    monkeypatch.setattr(aibutler, "TOOL_TIMEOUT", 0.2)
    model = receiver([ok(openai_tool_call("block", {})), ok(openai_text("unblocked"))])
    callbacks = receiver()
    config = make_config(
        agent={"provider": "openai", "base_url": model.url, "timeout": "0.2s", "max_steps": "2"},
        webhook={"outbound_url": callbacks.url, "callback_timeout": "0.2s"},
        delivery={"workers": "1"})
    notify = NotifySocket(tmp_path / "notify")
    butler = aibutler.Butler(config, vault, store)
    watchdog = aibutler.Watchdog(butler.readiness, store, {"NOTIFY_SOCKET": notify.path,
                                                          "WATCHDOG_USEC": "1000000"},
                                 time.monotonic)
    release = threading.Event()
    butler.tools.register(aibutler.Tool("block", "never returns on its own", {"type": "object"},
                                          lambda ctx: {"released": release.wait(60)}))
    butler.start()
    try:
        assert watchdog.tick() and "WATCHDOG=1" in notify.read()
        client = testing.TestClient(butler.app())
        assert client.simulate_post("/webhook/custom", headers=auth(),
                                    json={"user_id": "u", "message": "go"}).status_code == 202
        model.wait_for(1)
        deadline = time.monotonic() + 15
        while watchdog.tick():
            assert "WATCHDOG=1" in notify.read()
            assert time.monotonic() < deadline, "the wedged worker was never noticed"
            time.sleep(0.05)
        assert notify.read().startswith("STATUS=unhealthy: workers not healthy")
        assert not watchdog.tick() and "WATCHDOG=1" not in notify.read()
        release.set()
        callbacks.wait_for(1)
        assert watchdog.tick() and "WATCHDOG=1" in notify.wait_for("WATCHDOG=1")
    finally:
        release.set()
        butler.stop(time.monotonic() + 5)


def test_rotation_keeps_the_old_secret_for_the_grace_then_drops_it(daemon, receiver):
    grace = 2.0
    callbacks = receiver()
    d = daemon(f"[channels.webhook]\noutbound_url = {callbacks.url}\n"
               f"previous_secret_grace = {grace}s\n")
    d.start()
    new = d.cli("vault", "rotate", "webhook_auth_secret").stdout.strip()
    assert len(new) == 64 and new != SECRET
    rotated_at = float(d.vault.get("webhook_auth_secret_rotated_at"))
    d.secret = new
    # (every 0.2 s: the 401s before the daemon re-reads its vault stay under the
    # 10 that would block this address)
    eventually(lambda: d.post({"user_id": "u", "message": "hi"})[0] == 202, every=0.2)  # new
    d.secret = SECRET
    assert d.post({"user_id": "u", "message": "hi"})[0] == 202           # old, in grace
    assert time.time() < rotated_at + grace, "too slow to check within the grace"
    for callback in callbacks.wait_for(2):  # callbacks use the new secret at once
        assert callback["headers"]["Authorization"] == f"Bearer {new}"
    time.sleep(max(0.0, rotated_at + grace - time.time()) + 0.05)  # the grace is a clock time
    assert d.post({"user_id": "u", "message": "hi"})[0] == 401           # grace over
    d.secret = new
    assert d.post({"user_id": "u", "message": "hi"})[0] == 202
    assert d.stop() == 0
    assert new not in d.log


def test_vault_changes_reach_the_running_daemon(daemon):
    d = daemon().start()
    d.cli("vault", "set", "webhook_auth_secret", input="brand-new-secret-value")
    eventually(lambda: d.post({"user_id": "u", "message": "hi"})[0] == 401)
    d.secret = "brand-new-secret-value"
    assert d.post({"user_id": "u", "message": "hi"})[0] == 200
    assert d.stop() == 0


def test_sighup_reloads_the_config(daemon):
    d = daemon("[limits]\nuser_rate = 0\n").start()
    for _ in range(3):
        assert d.post({"user_id": "u", "message": "hi"})[0] == 200
    d.config.write_text("[limits]\nuser_rate = 1/hour\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log("reload: config re-read")
    assert d.post({"user_id": "u", "message": "hi"})[0] == 200
    assert d.post({"user_id": "u", "message": "hi"})[0] == 429
    d.config.write_text("[limits]\nuser_rate = lots\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log("keeping the running config")
    assert d.post({"user_id": "other", "message": "hi"})[0] == 200
    assert d.stop() == 0


def simulate(client, secret=SECRET, remote="198.51.100.1", xff=None, body=None):
    headers = {"Content-Type": "application/json", "X-Aibutler-Secret": secret}
    if xff:
        headers["X-Forwarded-For"] = xff
    return client.simulate_post("/webhook/custom", headers=headers, remote_addr=remote,
                                json=body or {"user_id": "u", "message": "hello"})


def test_repeated_auth_failures_throttle_that_address(app_for, caplog):
    client = app_for()
    caplog.set_level(logging.INFO, logger="aibutler")
    for _ in range(10):
        assert simulate(client, secret="wrong").status_code == 401
    caplog.clear()
    for _ in range(50):
        result = simulate(client, secret="still-wrong")
        assert result.status_code == 429 and int(result.headers["retry-after"]) > 0
    assert caplog.records == []  # the journal is not flooded
    turns = client.butler.metrics.value("aibutler_agent_turns_total",
                                        (("provider", "builtin"), ("outcome", "ok")))
    assert turns == 0
    assert simulate(client).status_code == 200  # the right secret is never locked out
    assert simulate(client, remote="198.51.100.2").status_code == 200


def test_forwarded_for_is_believed_only_from_trusted_proxies(app_for):
    client = app_for(server={"trusted_proxies": "10.0.0.0/8"})
    for _ in range(10):
        simulate(client, secret="wrong", remote="10.0.0.5", xff="203.0.113.5")
    assert simulate(client, "wrong", remote="10.0.0.5", xff="203.0.113.5").status_code == 429
    assert simulate(client, "wrong", remote="10.0.0.5", xff="203.0.113.6").status_code == 401
    # an untrusted peer cannot dodge the block by inventing X-Forwarded-For
    for i in range(10):
        simulate(client, secret="wrong", remote="192.0.2.9", xff=f"203.0.113.{i + 10}")
    assert simulate(client, "wrong", remote="192.0.2.9", xff="203.0.113.99").status_code == 429


def signed_headers(body, webhook_id, timestamp=None, secret=SECRET):
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    mac = hmac.new(secret.encode(), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return {"Content-Type": "application/json", "webhook-id": webhook_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode()}


def test_signed_inbound_requests(app_for):
    client = app_for()
    body = json.dumps({"user_id": "u", "message": "what is 3*3?"}).encode()
    headers = signed_headers(body, "msg_1")
    result = client.simulate_post("/webhook/custom", body=body, headers=headers)
    assert result.status_code == 200 and result.json["reply"] == "3*3 = 9"
    replay = client.simulate_post("/webhook/custom", body=body, headers=headers)
    assert replay.status_code == 401 and "replayed" in replay.json["error"]["description"]
    # the sender's retry (same id, fresh timestamp) gets the stored answer
    retry = client.simulate_post("/webhook/custom", body=body,
                                 headers=signed_headers(body, "msg_1", int(time.time()) + 1))
    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    stale = signed_headers(body, "msg_2", int(time.time()) - 600)
    assert client.simulate_post("/webhook/custom", body=body, headers=stale).status_code == 401
    forged = signed_headers(body, "msg_3", secret="not-the-secret")
    assert client.simulate_post("/webhook/custom", body=body, headers=forged).status_code == 401
    tampered = signed_headers(body, "msg_4")
    result = client.simulate_post("/webhook/custom", body=body.replace(b"3*3", b"4*4"),
                                  headers=tampered)
    assert result.status_code == 401


def metric(text, line_start):
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_need_the_secret_and_change_with_traffic(app_for, store):
    client = app_for()
    assert client.simulate_get("/metrics").status_code == 401
    before = client.simulate_get("/metrics", headers=auth()).text
    client.simulate_post("/webhook/custom", headers=auth(),
                         json={"user_id": "u", "message": "what is 2+2"})
    client.simulate_post("/webhook/custom", headers={"X-Aibutler-Secret": "bad"})
    after = client.simulate_get("/metrics", headers=auth())
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    req = 'aibutler_http_requests_total{path="/webhook/custom",status="200"}'
    assert metric(text, req) == metric(before, req) + 1
    assert metric(text, 'aibutler_agent_turns_total{provider="builtin",outcome="ok"}') == 1
    assert metric(text, 'aibutler_tool_calls_total{tool="calculate",outcome="ok"}') == 1
    assert metric(text, 'aibutler_model_seconds_count{provider="builtin"}') == 2
    assert metric(text, "aibutler_auth_failures_total") == metric(before, "aibutler_auth_failures_total") + 1
    assert 'aibutler_http_request_seconds_bucket{path="/webhook/custom",le="+Inf"}' in text
    assert "aibutler_queue_depth 0" in text and "aibutler_deliveries_pending 0" in text
    public = app_for(server={"metrics_public": "true"})
    assert public.simulate_get("/metrics").status_code == 200


def test_metrics_count_rate_limits_and_deliveries(app_for, receiver):
    callbacks = receiver([(500, {}, b"", 0), (200, {}, b"", 0)])
    client = app_for(limits={"rate": "0", "user_rate": "1/hour"},
                     webhook={"outbound_url": callbacks.url},
                     delivery={"retry_schedule": "100ms"})
    client.butler.start()
    client.simulate_post("/webhook/custom", headers=auth(), json={"user_id": "u", "message": "a"})
    client.simulate_post("/webhook/custom", headers=auth(), json={"user_id": "u", "message": "b"})
    callbacks.wait_for(2)
    # the delivered count follows the receiver's answer
    delivered = 'aibutler_deliveries_total{outcome="delivered"}'
    eventually(lambda: metric(client.simulate_get("/metrics", headers=auth()).text,
                              delivered) == 1, every=0.01)
    text = client.simulate_get("/metrics", headers=auth()).text
    assert metric(text, 'aibutler_rate_limited_total{scope="user"}') == 1
    assert metric(text, 'aibutler_deliveries_total{outcome="retry"}') == 1
    assert metric(text, delivered) == 1


def test_readyz_reports_dead_workers(app_for):
    client = app_for()
    client.butler.start()
    assert client.simulate_get("/readyz").json == {
        "status": "ready", "checks": {"workers": True, "dispatchers": True, "queue": True,
                                      "storage": True}}
    client.butler.stop(time.monotonic() + 5)
    result = client.simulate_get("/readyz")
    assert result.status_code == 503 and result.json["checks"]["workers"] is False
    assert client.simulate_get("/healthz").status_code == 200


@pytest.mark.skipif(not os.path.exists("/usr/bin/systemd-analyze"), reason="needs systemd")
def test_unit_file_verifies_cleanly():
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    unit = os.path.join(root, "aibutler.service")
    result = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout + result.stderr == ""
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", unit],
                            capture_output=True, text=True)
    score = float(result.stdout.split("Overall exposure level for aibutler.service:")[1].split()[0])
    assert score <= 2.0
