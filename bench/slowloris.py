"""Reproduce a slow-header (slowloris) attack on loopback and show that the
daemon keeps serving during it.

    python bench/slowloris.py                       # 200 connections, 15 s
    python bench/slowloris.py --connections 400 --seconds 20

Starts aibutler.py (copied alone into a temporary folder) with its default
connection budget, opens --connections sockets from 127.0.0.2 (one misbehaving
address) that each send one header byte every --every seconds, and meanwhile
probes GET /healthz from 127.0.0.1 every 0.1 s. Prints how many attack
connections the daemon let in, how many it closed, and the probes' latency.
Loopback only; bounded in count and time; it stops by itself.
"""

import argparse
import contextlib
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
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def start_daemon(folder):
    shutil.copy(os.path.join(ROOT, "aibutler.py"), folder)
    env = dict(os.environ, AIBUTLER_DATA=os.path.join(folder, "data"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "aibutler.py", "run", "--port", "0"], cwd=folder,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        match = re.search(r"listening on http://[\d.]+:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, int(match.group(1))
    raise SystemExit("the daemon did not start")


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between bytes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        proc, port = start_daemon(folder)
        stats = {"refused": 0, "closed": 0}
        stop = threading.Event()
        attacker = threading.Thread(target=attack, daemon=True,
                                    args=(port, args.connections, args.every, stop, stats))
        attacker.start()
        latencies, failures = [], 0
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    r.read()
                latencies.append((time.monotonic() - started) * 1000)
            except OSError:
                failures += 1
            time.sleep(0.1)
        stop.set()
        attacker.join(10)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
    latencies.sort()
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else float("nan")
    print(f"attack: {args.connections} connections from 127.0.0.2, a byte every "
          f"{args.every:g}s, for {args.seconds:g}s")
    print(f"  closed by the daemon (client_connection_limit or header_timeout): "
          f"{stats['closed'] + stats['refused']}")
    print(f"/healthz from 127.0.0.1: {len(latencies)} answered, {failures} failed; "
          f"median {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, "
          f"max {latencies[-1]:.1f} ms" if latencies else "/healthz never answered")


if __name__ == "__main__":
    main()
