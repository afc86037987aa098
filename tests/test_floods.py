"""Issue 22 through the real daemon: floods of waiting requests and of slow or
idle connections. Waiting is bounded ([server] max_waiting,
max_waiting_per_address, max_waiting_per_user: over a bound a request answers
at once, its Aibutler-Wait-Limited header naming the bound); a whole request
must arrive within request_timeout (else 408); connections not waiting for an
answer are bounded in all (idle_connection_limit: the quietest goes); IPv6
clients count by /64. Client addresses are 127.0.0.X (Linux routes all of
127/8 to lo), and for IPv6 addresses added to lo when running as root."""

import contextlib
import http.client
import json
import os
import random
import re
import select
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from conftest import (DaemonProcess, SECRET, gauge, held, in_background, ok, openai_text,
                      until)

PATH = "/webhook/custom"
LIMITED = "Aibutler-Wait-Limited"
HELD = "the reply"


# --- helpers ----------------------------------------------------------------------------

def call(d, method, path, body=None, headers=None, source="127.0.0.1", timeout=30):
    """(status, headers, parsed JSON) of one request on a fresh connection from
    `source` (a local address the socket is bound to)."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        data = None if body is None else json.dumps(body).encode()
        sent = {"X-Aibutler-Secret": SECRET}
        if data is not None:
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        return response.status, response.headers, json.loads(raw) if raw else None
    finally:
        conn.close()


def poll(d, location, source="127.0.0.1", wait=20):
    return call(d, "GET", f"{location}?wait={wait}", source=source)


def post(d, user_id, headers=None, source="127.0.0.1", message="hi"):
    return call(d, "POST", PATH, {"user_id": user_id, "message": message}, headers, source)


def counter(d, name, **labels):
    """A labelled counter's value in /metrics (0 when never counted)."""
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "} "
    text = d.get("/metrics", {"X-Aibutler-Secret": SECRET})[2]
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def held_daemon(daemon, receiver, server="", webhook=""):
    """A daemon whose model answers HELD only once the returned gate is set."""
    gate = threading.Event()
    model = receiver([held(ok(openai_text(HELD)), gate)])
    d = daemon(f"[server]\n{server}\n[agent]\nprovider = openai\nbase_url = {model.url}\n"
               f"[limits]\nrate = 0\nuser_rate = 0\n[channels.webhook]\n{webhook}\n").start()
    return d, model, gate


def unfinished_message(d, model, user_id="u"):
    """The status URL of a message whose turn is at the (held) model."""
    before = len(model.requests)
    status, headers, _ = post(d, user_id, {"Prefer": "respond-async"})
    assert status == 202
    model.wait_for(before + 1)
    return headers["Location"]


def waiting(d, count):
    until(lambda: gauge(d, "aibutler_requests_waiting") == count)


def answered_at_once(answer, bound, status=200):
    got, headers, body = answer
    assert got == status, answer
    assert headers[LIMITED] == bound
    return body


def idle_connection(port, source, host="127.0.0.1", family=socket.AF_INET):
    sock = socket.socket(family)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def stalled_body(port, source):
    """A connection holding a request whose body never comes: complete headers,
    a Content-Length larger than what is sent."""
    sock = idle_connection(port, source)
    sock.sendall(b"POST /webhook/custom HTTP/1.1\r\nHost: aibutler\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n"
                 b'{"user_id": ')
    return sock


def closed_by_daemon(sock):
    """True once the daemon has closed this connection (it sends nothing on an
    idle one, so anything readable is the end)."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(4096) == b""
    except OSError:
        return True


def read_to_end(sock, timeout=10):
    """Everything the daemon sends until it closes the connection (a reset
    too: a byte the client sent as the daemon closed makes the close a reset)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def healthz_on(sock):
    """GET /healthz on a kept-alive connection, its answer read whole: the status line."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: aibutler\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(4096)
    return head.split(b"\r\n")[0]


def error_body(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.decode("latin-1"), json.loads(body)


# --- 1. waiting is bounded -----------------------------------------------------------------

def test_waits_for_one_user_are_bounded_and_the_rest_answer_at_once(daemon, receiver):
    d, model, gate = held_daemon(daemon, receiver, "max_waiting_per_user = 2\n")
    try:
        location = unfinished_message(d, model, "u")
        polls = [in_background(lambda: poll(d, location)) for _ in range(2)]
        waiting(d, 2)
        # the third long poll on u's message, and a Prefer: wait POST from u: at once
        body = answered_at_once(poll(d, location), "max_waiting_per_user")
        assert body["status"] in ("queued", "running") and "reply" not in body
        status, headers, body = post(d, "u", {"Prefer": "wait=20"})
        assert status == 202 and headers[LIMITED] == "max_waiting_per_user"
        assert headers["Preference-Applied"] is None  # no wait= applied: it did not wait
        assert headers["Location"] == f"{PATH}/messages/{body['message_id']}"
        # another user may still wait, from the same address
        other, other_answer = in_background(lambda: post(d, "v", {"Prefer": "wait=20"}))
        waiting(d, 3)
        assert all(thread.is_alive() for thread, _ in polls) and other.is_alive()
        assert counter(d, "aibutler_rate_limited_total", scope="max_waiting_per_user") == 2
    finally:
        gate.set()
    for thread, answer in polls:
        thread.join(20)
        status, headers, body = answer[0]
        assert status == 200 and body["status"] == "done" and body["reply"] == HELD
        assert headers[LIMITED] is None
    other.join(20)
    status, headers, body = other_answer[0]
    assert status == 200 and body["reply"] == HELD
    assert headers["Preference-Applied"] == "wait=20" and headers[LIMITED] is None


def test_waits_from_one_address_are_bounded(daemon, receiver):
    d, model, gate = held_daemon(daemon, receiver, "max_waiting_per_address = 2\n")
    try:
        location = unfinished_message(d, model, "u")
        polls = [in_background(lambda: poll(d, location, "127.0.0.2")) for _ in range(2)]
        waiting(d, 2)
        answered_at_once(poll(d, location, "127.0.0.2"), "max_waiting_per_address")
        status, headers, _ = post(d, "w", {"Prefer": "wait=20"}, source="127.0.0.2")
        assert status == 202 and headers[LIMITED] == "max_waiting_per_address"
        assert headers["Preference-Applied"] is None
        # the same message, from another address: it waits
        polls.append(in_background(lambda: poll(d, location, "127.0.0.3")))
        waiting(d, 3)
        assert all(thread.is_alive() for thread, _ in polls)
        assert counter(d, "aibutler_rate_limited_total", scope="max_waiting_per_address") == 2
    finally:
        gate.set()
    for thread, answer in polls:
        thread.join(20)
        status, headers, body = answer[0]
        assert status == 200 and body["status"] == "done" and body["reply"] == HELD
        assert headers[LIMITED] is None


def test_waits_in_all_are_bounded_reply_wait_included(daemon, receiver):
    d, model, gate = held_daemon(daemon, receiver, "max_waiting = 3\n", "reply_wait = 20s\n")
    try:
        location = unfinished_message(d, model, "u")
        waiters = [in_background(lambda: poll(d, location, "127.0.0.2")),
                   in_background(lambda: poll(d, location, "127.0.0.3")),
                   in_background(lambda: post(d, "v", source="127.0.0.4"))]  # reply_wait
        waiting(d, 3)
        answered_at_once(poll(d, location, "127.0.0.5"), "max_waiting")
        status, headers, body = post(d, "x", source="127.0.0.6")  # reply_wait, over the bound
        assert status == 202 and headers[LIMITED] == "max_waiting"
        assert headers["Preference-Applied"] is None and body["status"] == "accepted"
        status, headers, _ = post(d, "y", {"Prefer": "wait=20"}, source="127.0.0.7")
        assert status == 202 and headers[LIMITED] == "max_waiting"
        assert headers["Preference-Applied"] is None
        assert all(thread.is_alive() for thread, _ in waiters)
        assert gauge(d, "aibutler_requests_waiting") == 3
        assert counter(d, "aibutler_rate_limited_total", scope="max_waiting") == 3
    finally:
        gate.set()
    for thread, answer in waiters:
        thread.join(20)
    (s1, _, first), (s2, _, second), (s3, headers, replied) = [a[0] for _, a in waiters]
    assert (s1, s2, s3) == (200, 200, 200)
    assert first["status"] == second["status"] == "done" and first["reply"] == HELD
    assert replied["reply"] == HELD and headers[LIMITED] is None


# --- 2. the attack's shape, scaled down ---------------------------------------------------

def test_under_a_flood_of_long_polls_and_stalled_bodies_the_service_answers(daemon, receiver):
    gate = threading.Event()

    def model_answer(request):  # the flooder's turn stays at the model; others answer
        if "flood" in json.dumps(request["json"]):
            gate.wait(30)
        return ok(openai_text("at your service"))
    model = receiver([model_answer])
    d = daemon(f"[agent]\nprovider = openai\nbase_url = {model.url}\n"
               "[limits]\nrate = 0\nuser_rate = 0\n").start()  # the default [server] bounds
    flooder = "127.0.0.28"  # an authenticated sender gone wild
    stop, stalled, repolls = threading.Event(), [], []
    try:
        for x in range(2, 28):  # 26 addresses x 3 connections holding a stalled request
            for _ in range(3):
                stalled.append(stalled_body(d.port, f"127.0.0.{x}"))
        location = call(d, "POST", PATH, {"user_id": "mallory", "message": "flood"},
                        {"Prefer": "respond-async"}, source=flooder)[1]["Location"]
        model.wait_for(1)
        polls = [in_background(lambda: poll(d, location, flooder)) for _ in range(4)]
        waiting(d, 4)  # max_waiting_per_user's default

        def repoll():  # every further long poll answered at once, and polled again at once
            while not stop.is_set():
                repolls.append(poll(d, location, flooder))
        flood = threading.Thread(target=repoll, daemon=True)
        flood.start()
        until(lambda: len(repolls) >= 20)
        for _ in range(5):
            assert d.get("/healthz")[0] == 200
        status, _, body = d.post({"user_id": "alice", "message": "hello"}, timeout=20)
        assert status == 200 and body["reply"] == "at your service"
        assert d.get("/healthz")[0] == 200
        stop.set()
        flood.join(10)
        assert gauge(d, "aibutler_requests_waiting") == 4
        assert all(thread.is_alive() for thread, _ in polls)
        for answer in repolls:
            answered_at_once(answer, "max_waiting_per_user")
        assert not any(map(closed_by_daemon, stalled))  # all held throughout, and no thread
    finally:
        stop.set()
        gate.set()
        for sock in stalled:
            sock.close()
    for thread, answer in polls:
        thread.join(20)
        assert answer[0][0] == 200 and answer[0][2]["reply"] == "at your service"


# --- 3. a whole request has a deadline -------------------------------------------------

def trickle_until_answered(sock, payload, every=0.25):
    """Send payload a byte at a time; stop at the daemon's first answer (or its
    close) and return all it sends until it closes the connection."""
    for byte in payload:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        if select.select([sock], [], [], every)[0]:
            break
    return read_to_end(sock)


def test_a_trickled_body_or_header_gets_408_and_the_connection_closes(daemon):
    d = daemon("[server]\nheader_timeout = 1s\nrequest_timeout = 1s\n").start()
    body_sock = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    body_sock.sendall(f"POST {PATH} HTTP/1.1\r\nHost: aibutler\r\nContent-Type: "
                      f"application/json\r\nX-Aibutler-Secret: {SECRET}\r\n"
                      "Content-Length: 200\r\n\r\n".encode())
    header_sock = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    headers = b"GET /healthz HTTP/1.1\r\nHost: aibutler\r\nX-Slow: " + b"a" * 200
    body_thread, body_answer = in_background(
        lambda: trickle_until_answered(body_sock, b'{"user_id": "u", "message": "' + b"a" * 200))
    header_answer = trickle_until_answered(header_sock, headers)
    body_thread.join(20)
    for answer, key in ((body_answer[0], "request_timeout"), (header_answer, "header_timeout")):
        head, error = error_body(answer)  # read up to the close: the connection closed
        assert head.startswith("HTTP/1.1 408 ") and "Connection: close" in head, head
        assert error["error"]["status"] == 408
        assert f"[server] {key}" in error["error"]["description"], error
    body_sock.close()
    header_sock.close()
    assert d.get("/healthz")[0] == 200
    d.wait_log(r"WARNING aibutler: connections: closed a connection from 127\.0\.0\.1: "
               r"the request")


# --- 4. idle connections are bounded in all ---------------------------------------------

def test_idle_connections_past_the_limit_close_the_quietest(daemon):
    d = daemon("[server]\nidle_connection_limit = 10\n").start()
    # 16 connections that never send a byte, each from its own address: the first 10
    # fill the limit, each later one closes the quietest (all silent: the oldest)
    sockets = [idle_connection(d.port, f"127.0.0.{x}") for x in range(2, 18)]
    try:
        assert d.get("/healthz")[0] == 200  # a fresh connection always gets in
        until(lambda: sum(map(closed_by_daemon, sockets)) >= 7)  # 6 newcomers and the probe
        closed = [i for i, sock in enumerate(sockets) if closed_by_daemon(sock)]
        assert closed == list(range(7)), closed
        for sock in (sockets[7], sockets[-1]):  # the others are open and served
            assert healthz_on(sock) == b"HTTP/1.1 200 OK"
    finally:
        for sock in sockets:
            sock.close()
    d.wait_log(r"WARNING aibutler: connections: 10 connections were not waiting for an "
               r"answer; closed the quietest, from 127\.0\.0\.2 \(\[server\] "
               r"idle_connection_limit\)")


# --- 5. IPv6 clients count by /64 ------------------------------------------------------

def test_the_failure_throttle_counts_an_ipv6_64_as_one_client(daemon):
    d = daemon("[server]\ntrusted_proxies = 127.0.0.1\n").start()
    statuses = []
    for n in range(1, 41):
        statuses.append(d.post({"user_id": "u", "message": "hi"}, secret=False, headers={
            "X-Aibutler-Secret": "wrong", "X-Forwarded-For": f"2001:db8:1:2::{n:x}"})[0])
    assert statuses == [401] * 10 + [429] * 30
    # another /64 is another client; the right secret is never refused
    assert d.post({"user_id": "u", "message": "hi"}, secret=False, headers={
        "X-Aibutler-Secret": "wrong", "X-Forwarded-For": "2001:db8:1:3::1"})[0] == 401
    assert d.post({"user_id": "u", "message": "hi"},
                  headers={"X-Forwarded-For": "2001:db8:1:2::99"})[0] == 200
    assert d.stop() == 0
    warnings = [line for line in d.log.splitlines() if " WARNING " in line]
    about = [line for line in warnings if "2001:db8:1:2:" in line]
    assert len(about) == 2, about  # its first rejection, then its block
    assert "rejected a request from 2001:db8:1:2::/64 (wrong secret)" in about[0]
    assert "10 failed attempts from 2001:db8:1:2::/64" in about[1]
    assert len(warnings) <= 4, warnings  # and 2001:db8:1:3::/64's first rejection


class DaemonOnAnyAddress(DaemonProcess):
    """Started with --host ::, whose start-up line reads http://:::PORT."""

    def start(self, *extra, port=0):
        self.log_lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "aibutler.py", "run", "--config", str(self.config),
             "--port", str(port), *extra], cwd=self.folder, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pump = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self.pump.start()
        self.port = int(self.wait_log(r"listening on http://\S*?:(\d+)\s").group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        return self


@contextlib.contextmanager
def addresses_on_lo(*addresses):
    """IPv6 addresses added to lo for the test (as root), removed after."""
    if os.geteuid() != 0 or not socket.has_ipv6 or not shutil.which("ip"):
        pytest.skip("needs root, IPv6 and ip(8) (iproute2) to add addresses to lo")
    added = []
    try:
        for address in addresses:
            result = subprocess.run(["ip", "-6", "addr", "add", f"{address}/64", "dev", "lo",
                                     "nodad"], capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"cannot add {address} to lo: {result.stderr.strip()}")
            added.append(address)
        yield
    finally:
        for address in added:
            subprocess.run(["ip", "-6", "addr", "del", f"{address}/64", "dev", "lo"],
                           capture_output=True)


def test_idle_connections_from_one_ipv6_64_are_one_client(tmp_path):
    prefix = f"2001:db8:{random.randrange(1, 0xffff):x}:{random.randrange(1, 0xfffe):x}"
    neighbour = prefix[:prefix.rindex(":")] + f":{int(prefix.rsplit(':', 1)[1], 16) + 1:x}"
    same = [f"{prefix}::{n:x}" for n in range(0xa, 0xe)]  # 4 hosts of one /64
    other = f"{neighbour}::1"
    with addresses_on_lo(*same, other):
        d = DaemonOnAnyAddress(tmp_path / "d", "[server]\nclient_connection_limit = 3\n")
        try:
            d.start("--host", "::")
            v6 = dict(host="::1", family=socket.AF_INET6)
            admitted = [idle_connection(d.port, source, **v6) for source in same[:3]]
            refused = idle_connection(d.port, same[3], **v6)
            assert read_to_end(refused) == b""  # closed at once, without a word
            neighbour_sock = idle_connection(d.port, other, **v6)  # another /64: let in
            for sock in (neighbour_sock, admitted[0]):
                assert healthz_on(sock) == b"HTTP/1.1 200 OK"
            assert not any(closed_by_daemon(sock) for sock in admitted)
            d.wait_log(rf"refused a connection from {re.escape(prefix)}::/64: it has 3 open "
                       r"\(\[server\] client_connection_limit\)")
            for sock in admitted + [refused, neighbour_sock]:
                sock.close()
            assert d.stop() == 0
        finally:
            if d.proc and d.proc.poll() is None:
                d.kill()
