"""Issue 24's streaming latency: how long after a model server writes its first
token does the first delta reach a browser-like client, through the real daemon?

    python bench/first_delta.py [--runs 8] [--tokens 20] [--keep-alive 15s]

A fake OpenAI-compatible server (loopback, stdlib) answers every request with
"stream": true as server-sent events: the role chunk at once, its first token
FIRST_TOKEN_AFTER (2 s) later, then one token every TOKEN_EVERY (50 ms), a
finish_reason chunk, a usage chunk and [DONE]. aibutler.py is copied alone
into a temporary folder and run as a subprocess (`run --port 0`, provider
openai pointed at the fake, rate limits off), as the tests run it. A client
POSTs with Accept: text/event-stream (http.client, one connection per run)
and notes when each delta arrives. The fake and the client share this
process's monotonic clock, so each figure is the time from the token being
written to the model connection to its delta being read by the client.

Figures are printed, never asserted (the aim: the first delta within 100 ms).
Loopback only; it stops by itself.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECRET = "bench-secret-0123456789abcdef"
PATH = "/webhook/custom"
FIRST_TOKEN_AFTER = 2.0
TOKEN_EVERY = 0.05


class Model(ThreadingHTTPServer):
    """Streams `tokens` tokens per request and notes when each was flushed."""

    daemon_threads = True

    def __init__(self, tokens):
        super().__init__(("127.0.0.1", 0), Handler)
        self.tokens = tokens
        self.written = []  # time.monotonic() of each token of the current run
        self.asked_to_stream = []
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()


def chunk(delta, finish=None):
    return ("data: " + json.dumps({"id": "chatcmpl-b", "object": "chat.completion.chunk",
                                   "created": 1, "model": "bench", "choices": [
                                       {"index": 0, "delta": delta,
                                        "finish_reason": finish}]}) + "\n\n").encode()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        self.server.asked_to_stream.append(body.get("stream") is True)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            self.wfile.write(chunk({"role": "assistant", "content": ""}))
            self.wfile.flush()
            time.sleep(FIRST_TOKEN_AFTER)
            for number in range(self.server.tokens):
                if number:
                    time.sleep(TOKEN_EVERY)
                written = time.monotonic()  # before the write: the conservative side
                self.wfile.write(chunk({"content": f"w{number} "}))
                self.wfile.flush()
                self.server.written.append(written)
            self.wfile.write(chunk({}, "stop"))
            self.wfile.write(b'data: {"id": "chatcmpl-b", "choices": [], "usage": '
                             b'{"prompt_tokens": 1, "completion_tokens": 1}}\n\n')
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


def start_daemon(folder, model_url, keep_alive):
    shutil.copy(os.path.join(ROOT, "aibutler.py"), folder)
    data = os.path.join(folder, "data")
    config = os.path.join(folder, "config.ini")
    with open(config, "w") as handle:
        handle.write(f"[agent]\nprovider = openai\nbase_url = {model_url}\ntimeout = 60s\n"
                     f"[limits]\nrate = 0\nuser_rate = 0\n"
                     f"[channels.webhook]\nstream_keep_alive = {keep_alive}\n")
    env = dict(os.environ, AIBUTLER_DATA=data, PYTHONUNBUFFERED="1")
    for name in [n for n in env if n.startswith(("AIBUTLER_WEBHOOK", "NOTIFY_SOCKET",
                                                 "WATCHDOG_"))]:
        del env[name]
    subprocess.run([sys.executable, "aibutler.py", "vault", "set", "webhook_auth_secret"],
                   cwd=folder, env=env, input=SECRET, text=True, check=True,
                   capture_output=True, timeout=60)
    proc = subprocess.Popen([sys.executable, "aibutler.py", "run", "--config", config,
                             "--port", "0"], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        match = re.search(r"listening on http://[\d.]+:(\d+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, int(match.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the daemon did not start")


def one_run(port, model, user):
    """The arrival time of each delta, in order."""
    model.written = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", PATH, json.dumps({"user_id": user, "message": "hi"}).encode(), {
        "Content-Type": "application/json", "Accept": "text/event-stream",
        "X-Aibutler-Secret": SECRET})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"the daemon answered {response.status}: {response.read()[:300]!r}")
    arrived, event = [], None
    while True:
        line = response.readline()
        if not line:
            break
        line = line.decode().rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event == "delta":
            arrived.append(time.monotonic())
        elif line.startswith("data:") and event in ("done", "error"):
            if event == "error":
                raise SystemExit(f"the stream ended with an error: {line}")
            break
    conn.close()
    return arrived


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--keep-alive", default="15s", help="[channels.webhook] "
                                                           "stream_keep_alive")
    args = parser.parse_args()
    model = Model(args.tokens)
    folder = tempfile.mkdtemp(prefix="aibutler-first-delta-")
    proc, port = start_daemon(folder, f"http://127.0.0.1:{model.server_address[1]}",
                              args.keep_alive)
    first, every = [], []
    try:
        one_run(port, model, "warm-up")  # imports, first connections
        for run in range(args.runs):
            arrived = one_run(port, model, f"user-{run}")
            written = list(model.written)
            # deltas may merge tokens or hold one back ("w1 " waits for what follows
            # its trailing space): pair each delta with the latest token written before it
            lags = []
            for moment in arrived:
                before = [w for w in written if w <= moment]
                if before:
                    lags.append(moment - before[-1])
            first_lag = arrived[0] - written[0]
            first.append(first_lag)
            every.extend(lags)
            print(f"run {run + 1}: first delta {first_lag * 1000:7.1f} ms after the model's "
                  f"first token; {len(arrived)} deltas for {len(written)} tokens")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        model.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    ms = lambda seconds: f"{seconds * 1000:.1f} ms"  # noqa: E731
    print()
    print(f"model asked with \"stream\": true: {all(model.asked_to_stream)} "
          f"({len(model.asked_to_stream)} requests)")
    print(f"first delta after the model's first token, {len(first)} runs: "
          f"p50 {ms(statistics.median(first))}, max {ms(max(first))} (aim: within 100 ms)")
    print(f"every delta after the latest token before it, {len(every)} deltas: "
          f"p50 {ms(statistics.median(every))}, p99 {ms(percentile(every, 0.99))}, "
          f"max {ms(max(every))}")


if __name__ == "__main__":
    main()
