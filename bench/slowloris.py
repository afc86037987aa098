"""Reproduce connection-exhaustion attacks on loopback and show that the
daemon keeps serving during them.

    python bench/slowloris.py                       # slow headers: 200 connections, 15 s
    python bench/slowloris.py --connections 400 --seconds 20
    python bench/slowloris.py --flood               # issue 22's attack, in full
    python bench/slowloris.py --flood --polls 1000 --addresses 50 --per-address 30

Slow headers (the default): starts aibutler.py (copied alone into a temporary
folder) with its default connection budget, opens --connections sockets from
127.0.0.2 (one misbehaving address) that each send one header byte every
--every seconds, and meanwhile probes GET /healthz from 127.0.0.1 every 0.1 s.
Prints how many attack connections the daemon let in, how many it closed, and
the probes' latency.

--flood: the attack of issue 22, against the daemon's default [server] limits,
with an OpenAI-compatible model server (in this process) that never finishes
the flooder's turn and answers everyone else at once. One authenticated sender
(127.0.0.30) keeps --polls long polls GET .../messages/{id}?wait=25 of its
unfinished message outstanding (each answered at once over a bound is polled
again --repoll-every seconds later), while --addresses client addresses
(127.0.0.2, .3, ...) each hold --per-address connections with a stalled
request (complete headers, a Content-Length larger than what is sent; one the
daemon closes is opened again). Meanwhile /healthz is probed every 0.1 s and a
legitimate sender's sync turn is sent every 2 s, both from 127.0.0.1. Prints
the probes' p50/p99, whether the legitimate turns were answered, and how the
attack's requests and connections were answered. Figures only, nothing is
asserted. Loopback only (Linux routes all of 127/8 to lo); bounded in count and
time; it stops by itself.
"""

import argparse
import collections
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECRET = "bench-secret-0123456789abcdef0123456789"
FLOODER = "127.0.0.30"
PROBE = "127.0.0.1"


def start_daemon(folder, config_text="", secret=None):
    shutil.copy(os.path.join(ROOT, "aibutler.py"), folder)
    env = dict(os.environ, AIBUTLER_DATA=os.path.join(folder, "data"), PYTHONUNBUFFERED="1")
    config = os.path.join(folder, "config.ini")
    with open(config, "w") as stream:
        stream.write(config_text)
    if secret:
        subprocess.run([sys.executable, "aibutler.py", "vault", "set", "webhook_auth_secret"],
                       cwd=folder, env=env, input=secret, text=True, check=True,
                       capture_output=True)
    proc = subprocess.Popen([sys.executable, "aibutler.py", "run", "--port", "0", "--config",
                             config], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        match = re.search(r"listening on http://[\d.]+:(\d+)", line)
        if match:
            threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
            return proc, int(match.group(1)), log
    raise SystemExit("the daemon did not start:\n" + "".join(log))


def stop_daemon(proc):
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    if proc.poll() is None:
        proc.kill()


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * fraction + 0.5) - 1))]


def probe_healthz(port, deadline, latencies, failures, stop=None):
    """GET /healthz from PROBE every 0.1 s until deadline: latencies in ms."""
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        started = time.monotonic()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5,
                                              source_address=(PROBE, 0))
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status == 200:
                latencies.append((time.monotonic() - started) * 1000)
            else:
                failures.append(response.status)
        except OSError as exc:
            failures.append(type(exc).__name__)
        time.sleep(0.1)


# --- slow headers (the default) --------------------------------------------------------

def attack(port, count, every, stop, stats):
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(1)
        sock.bind(("127.0.0.2", 0))
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"G")
        except OSError:
            stats["refused"] += 1
        sockets.append(sock)
    while not stop.wait(every):
        for sock in sockets:
            if sock.fileno() < 0:
                continue
            try:
                sock.sendall(b"E")
            except OSError:
                stats["closed"] += 1
                sock.close()
    for sock in sockets:
        sock.close()


def slow_headers(args):
    with tempfile.TemporaryDirectory() as folder:
        proc, port, _ = start_daemon(folder)
        stats = {"refused": 0, "closed": 0}
        stop = threading.Event()
        attacker = threading.Thread(target=attack, daemon=True,
                                    args=(port, args.connections, args.every, stop, stats))
        attacker.start()
        latencies, failures = [], []
        probe_healthz(port, time.monotonic() + args.seconds, latencies, failures)
        stop.set()
        attacker.join(10)
        stop_daemon(proc)
    print(f"attack: {args.connections} connections from 127.0.0.2, a byte every "
          f"{args.every:g}s, for {args.seconds:g}s")
    print(f"  closed by the daemon (client_connection_limit or header_timeout): "
          f"{stats['closed'] + stats['refused']}")
    print(f"/healthz from 127.0.0.1: {len(latencies)} answered, {len(failures)} failed; "
          f"median {statistics.median(latencies):.1f} ms, p99 {percentile(latencies, 0.99):.1f} "
          f"ms, max {max(latencies):.1f} ms" if latencies else "/healthz never answered")


# --- issue 22's flood ------------------------------------------------------------------

class Model(ThreadingHTTPServer):
    """OpenAI-compatible: the flooder's turn waits for `release`; others answer at once."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ModelHandler)
        self.release = threading.Event()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()


class ModelHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if b"flood" in body:
            self.server.release.wait(120)
        answer = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [
            {"index": 0, "finish_reason": "stop",
             "message": {"role": "assistant", "content": "at your service"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def request(port, method, path, body=None, source=PROBE, timeout=30, headers=None):
    """(status, headers, parsed body) on a fresh connection from `source`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        headers = dict(headers or {}, **{"X-Aibutler-Secret": SECRET})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        return response.status, response.headers, json.loads(raw) if raw else None
    finally:
        conn.close()


def long_poller(port, location, every, stop, stats):
    """One of the flooder's long polls, kept outstanding until stop."""
    while not stop.is_set():
        try:
            status, headers, _ = request(port, "GET", f"{location}?wait=25", source=FLOODER)
            bound = headers.get("Aibutler-Wait-Limited")
            stats[f"{status} at once ({bound})" if bound else f"{status} after waiting"] += 1
        except OSError as exc:  # refused (client_connection_limit), or reset
            stats[f"no answer ({type(exc).__name__})"] += 1
        if every <= 0 or stop.wait(every):
            return


def stalled_request(port, source):
    sock = socket.socket()
    sock.settimeout(2)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /webhook/custom HTTP/1.1\r\nHost: aibutler\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                 b'{"user_id": "x", "message": "')
    sock.setblocking(False)
    return sock


def closed(sock):
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def stall(port, addresses, per_address, stop, stats):
    """addresses x per_address stalled requests; every 2 s, those the daemon
    closed are opened again."""
    slots = {(x, i): None for x in range(2, 2 + addresses) for i in range(per_address)}
    while not stop.is_set():
        for key, sock in slots.items():
            if stop.is_set():
                break
            if sock is not None:
                if not closed(sock):
                    continue
                sock.close()
                stats["closed by the daemon"] += 1
            try:
                slots[key] = stalled_request(port, f"127.0.0.{key[0]}")
                stats["opened"] += 1
            except OSError:
                slots[key] = None
                stats["could not connect"] += 1
        stop.wait(2)
    for sock in slots.values():
        if sock is not None:
            sock.close()


def legitimate_turns(port, stop, results):
    """A sync turn from another sender every 2 s: (status, seconds)."""
    n = 0
    while not stop.wait(2):
        n += 1
        started = time.monotonic()
        try:
            status, _, body = request(port, "POST", "/webhook/custom",
                                      {"user_id": "alice", "message": f"hello {n}"}, timeout=30)
            ok = status == 200 and (body or {}).get("reply") == "at your service"
            results.append((status if ok else f"{status} {body}", time.monotonic() - started))
        except OSError as exc:
            results.append((type(exc).__name__, time.monotonic() - started))


def metric_lines(port, *names):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"X-Aibutler-Secret": SECRET})
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return [line for line in text.splitlines() if line.startswith(names)]


def flood(args):
    model = Model()
    config = (f"[agent]\nprovider = openai\nbase_url = http://127.0.0.1:{model.server_port}/v1\n"
              f"timeout = 120s\n")
    with tempfile.TemporaryDirectory() as folder:
        proc, port, log = start_daemon(folder, config, SECRET)
        try:
            run_flood(args, port, model)
            print("daemon metrics at the end:")
            for line in metric_lines(port, "aibutler_requests_waiting ",
                                     "aibutler_rate_limited_total"):
                print("   ", line)
        finally:
            model.release.set()
            stop_daemon(proc)
            model.shutdown()
    print("daemon warnings:")
    for line in log:
        if " WARNING " in line and "connections:" in line:
            print("   ", line.rstrip())


def run_flood(args, port, model):
    status, headers, _ = request(port, "POST", "/webhook/custom",
                                 {"user_id": "mallory", "message": "flood"}, source=FLOODER,
                                 headers={"Prefer": "respond-async"})
    location = headers["Location"]
    if status != 202 or not location:
        raise SystemExit(f"the flooder's message was not accepted: {status}")

    stop = threading.Event()
    poll_stats, stall_stats = collections.Counter(), collections.Counter()
    threads = [threading.Thread(target=stall, daemon=True, args=(
        port, args.addresses, args.per_address, stop, stall_stats))]
    threads += [threading.Thread(target=long_poller, daemon=True, args=(
        port, location, args.repoll_every, stop, poll_stats)) for _ in range(args.polls)]
    turns = []
    threads.append(threading.Thread(target=legitimate_turns, daemon=True,
                                    args=(port, stop, turns)))
    quiet_latencies, quiet_failures = [], []
    probe_healthz(port, time.monotonic() + 2, quiet_latencies, quiet_failures)
    started = time.monotonic()
    for thread in threads:
        thread.start()
    latencies, failures = [], []
    probe_healthz(port, started + args.seconds, latencies, failures)
    stop.set()
    model.release.set()
    for thread in threads:
        thread.join(30)

    def figures(values):
        return (f"p50 {percentile(values, 0.5):.1f} ms, p99 {percentile(values, 0.99):.1f} ms, "
                f"max {max(values):.1f} ms" if values else "none answered")
    repolled = (f"each re-polled {args.repoll_every:g}s after an at-once answer"
                if args.repoll_every > 0 else "each sent once")
    print(f"attack (issue 22): {args.polls} long polls ?wait=25 from one authenticated "
          f"sender ({FLOODER}), {repolled}; {args.addresses} addresses x "
          f"{args.per_address} stalled requests (reopened when closed); {args.seconds:g}s")
    print(f"  long polls: {sum(poll_stats.values())} answers: "
          + ", ".join(f"{count} {kind}" for kind, count in poll_stats.most_common()))
    print("  stalled requests: " + ", ".join(f"{count} {kind}" for kind, count in
                                              stall_stats.most_common()))
    print(f"/healthz from {PROBE} before the attack: {len(quiet_latencies)} answered, "
          f"{len(quiet_failures)} failed; {figures(quiet_latencies)}")
    print(f"/healthz from {PROBE} during the attack: {len(latencies)} answered, "
          f"{len(failures)} failed{' ' + str(collections.Counter(failures)) if failures else ''}"
          f"; {figures(latencies)}")
    answered = [seconds for status, seconds in turns if status == 200]
    print(f"legitimate sync turns from {PROBE}: {len(answered)} of {len(turns)} answered "
          f"(200 with the reply)" + (f", in {min(answered) * 1000:.0f}-"
                                     f"{max(answered) * 1000:.0f} ms" if answered else "")
          + "".join(f"; {status} after {seconds:.1f}s" for status, seconds in turns
                    if status != 200))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between bytes")
    parser.add_argument("--flood", action="store_true", help="issue 22's attack instead")
    parser.add_argument("--polls", type=int, default=520, help="--flood: long polls")
    parser.add_argument("--repoll-every", type=float, default=1.0,
                        help="--flood: seconds before a long poll answered at once is sent "
                             "again (0: never)")
    parser.add_argument("--addresses", type=int, default=26,
                        help="--flood: client addresses (127.0.0.2 on), 1 to 27")
    parser.add_argument("--per-address", type=int, default=20,
                        help="--flood: stalled requests per address")
    args = parser.parse_args()
    if args.flood:
        if not 1 <= args.addresses <= 27:
            parser.error("--addresses: 1 to 27 (127.0.0.2 to .28; the flooder is .30)")
        flood(args)
    else:
        slow_headers(args)


if __name__ == "__main__":
    main()
