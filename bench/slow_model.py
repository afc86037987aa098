"""Issue 12's slow-model scenario: a model that takes 2 s per call and can
serve any number of calls at once, and many users who write at the same moment.

    python bench/run.py --slow-model
    python bench/run.py --slow-model --set "[agent] concurrency = 8" --set "[server] threads = 64"

Three runs, each against a fresh aibutler (copied alone into a temporary
folder; defaults, except `[agent] provider = openai` pointed at the fake model
with `timeout = 60s`, and rate limits off):

- sync: --slow-users users (50) POST one message each at the same moment;
  each reply's latency, from opening the connection to the last byte.
- async: the same with an outbound URL; each callback's arrival at a loopback
  receiver minus the moment its 202 arrived.
- sync, --waiting-users (200) waiting: the same burst, watched for
  WAITING_WINDOW seconds; then the daemon is killed (the rest would take minutes).

Each user comes from its own loopback address (127.0.1.x, ...), as distinct
people do, so the default `[server] client_connection_limit` (20 per address)
does not refuse them. Throughout each run, GET /healthz and /readyz are probed
every 100 ms from one more address (a monitor), each probe on a new connection
in its own thread so a stalled probe does not delay the next (from a process
of their own, as a monitor is); a probe that gets
no answer within PROBE_TIMEOUT, or whose connection is dropped, counts as
unanswered. The fake model counts the most calls it held at the same moment;
the daemon's resident memory is read before, every 100 ms during, and
AFTER_SECONDS after each run. Loopback only, bounded in time; it stops by itself.
"""

import contextlib
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from harness import PATH, SECRET, RssSampler, Sink, first_health, rss_mb, start_aibutler

PROBE_EVERY = 0.1      # seconds between probes of each path
PROBE_TIMEOUT = 30.0   # seconds before a probe counts as unanswered
PROBE_ADDRESS = "127.0.9.1"
USER_TIMEOUT = 120.0   # seconds a sync user waits for its reply
CALLBACK_TIMEOUT = 180.0  # seconds after the burst that async callbacks are awaited
WAITING_WINDOW = 10.0  # seconds the many-waiting run is watched
AFTER_SECONDS = 20.0   # when memory is read again after a run (spares end after 5 s, trim every 10 s)
QUIET_BEFORE = 1.0     # seconds of probes before the burst


# --- the fake model ------------------------------------------------------------

class SlowModel(ThreadingHTTPServer):
    """A fake OpenAI-compatible Chat Completions server on loopback: answers
    POST /v1/chat/completions after `delay` seconds, any number at once, and
    counts the most calls it held at the same moment."""

    daemon_threads = True
    request_queue_size = 1024
    ANSWER = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "4"}}]}).encode()

    def __init__(self, delay):
        super().__init__(("127.0.0.1", 0), SlowModelHandler)
        self.delay = delay
        self.released = threading.Event()  # set at close: answer at once
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.calls = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def reset(self):
        """Count from now on (the calls already in flight stay counted)."""
        with self.lock:
            self.max_in_flight, self.calls = self.in_flight, 0

    def think(self):
        with self.lock:
            self.in_flight += 1
            self.calls += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.released.wait(self.delay)
        finally:
            with self.lock:
                self.in_flight -= 1

    def close(self):
        self.released.set()
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address):
        pass  # a caller that hung up (a killed daemon) is no news


class SlowModelHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.send_error(404)
            return
        self.server.think()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(SlowModel.ANSWER)))
        self.end_headers()
        self.wfile.write(SlowModel.ANSWER)


class CallbackClock(Sink):
    """A callback receiver that notes when each message_id's callback arrived."""

    def __init__(self):
        super().__init__()
        self.arrived = {}  # message_id -> perf_counter() at arrival
        self.errors = 0

    def received(self, body):
        now = time.perf_counter()
        data = json.loads(body)
        with self.lock:
            self.count += 1
            self.arrived.setdefault(data.get("message_id"), now)
            self.errors += "error" in data


# --- probes and users -------------------------------------------------------------

def timed_request(method, port, path, source, timeout, body=None, headers=None):
    """One request on a new connection from `source`, all of it within `timeout`
    seconds. Returns (seconds, status, body); status None: no answer, body then
    says why ("timeout" or "dropped")."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.connect()
        conn.sock.settimeout(max(0.001, timeout - (time.perf_counter() - started)))
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return time.perf_counter() - started, response.status, data
    except socket.timeout:  # TimeoutError from Python 3.10 on
        return time.perf_counter() - started, None, "timeout"
    except (OSError, http.client.HTTPException):
        return time.perf_counter() - started, None, "dropped"
    finally:
        conn.close()


class Prober:
    """GET each path every PROBE_EVERY seconds from PROBE_ADDRESS, each probe
    on a new connection in its own thread. The probes run in a process of
    their own (this file run as `slow_model.py probe PORT`), as a monitor
    does: in this process their timing would include waits for this
    process's GIL, busy with hundreds of users' and the fake model's threads."""

    def __init__(self, port, paths=("/healthz", "/readyz")):
        self.results = {path: [] for path in paths}  # (seconds, status or None, why)
        self._child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "probe",
                                        str(port), *paths],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def stop(self):
        """No more probes; wait for those under way (each ends by PROBE_TIMEOUT)."""
        out, _ = self._child.communicate(timeout=PROBE_TIMEOUT + 10)  # closes its stdin
        for path, results in json.loads(out).items():
            self.results[path] = [tuple(r) for r in results]

    def summary(self, path):
        """Count, p99 and max in ms, where an unanswered probe counts as infinite;
        how many were unanswered, timed out and dropped by the daemon."""
        results = self.results[path]
        times = sorted(s * 1000 if status is not None else math.inf
                       for s, status, _ in results)
        answered = [t for t in times if not math.isinf(t)]
        return {"count": len(times), "p99_ms": percentile(times, 0.99),
                "max_ms": times[-1] if times else math.nan,
                "slowest_answer_ms": answered[-1] if answered else math.nan,
                "timeouts": sum(why == "timeout" for _, _, why in results),
                "dropped": sum(why == "dropped" for _, _, why in results),
                "not_200": sum(status not in (None, 200) for _, status, _ in results)}


def probe_main(port, paths):
    """The prober's process: probe until stdin closes, then print the results."""
    results = {path: [] for path in paths}
    lock = threading.Lock()
    stop = threading.Event()
    probes = []

    def probe(path):
        seconds, status, why = timed_request("GET", port, path, PROBE_ADDRESS, PROBE_TIMEOUT)
        with lock:
            results[path].append((seconds, status, why if status is None else ""))

    def schedule():
        next_at = time.perf_counter()
        while not stop.is_set():
            for path in paths:
                thread = threading.Thread(target=probe, args=(path,), daemon=True)
                thread.start()
                probes.append(thread)
            next_at += PROBE_EVERY
            stop.wait(max(0.0, next_at - time.perf_counter()))

    scheduler = threading.Thread(target=schedule, daemon=True)
    scheduler.start()
    sys.stdin.read()
    stop.set()
    scheduler.join()
    for thread in probes:
        thread.join(PROBE_TIMEOUT + 5)
    with lock:
        json.dump(results, sys.stdout)


def percentile(values, q):
    """values sorted; the nearest-rank percentile (NaN for none)."""
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def user_address(index):
    """A loopback address of its own for each user: 127.0.1.1, 127.0.1.2, ..."""
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


class Burst:
    """`count` users, each on a new connection from its own address, POST one
    message each at the same moment (threads released by a barrier)."""

    def __init__(self, port, count, timeout, prefix):
        self.results = [None] * count  # (sent, seconds, status, body) per user
        self._barrier = threading.Barrier(count + 1)
        self._threads = [threading.Thread(target=self._user, daemon=True,
                                          args=(port, i, timeout, f"{prefix}-{i}"))
                         for i in range(count)]
        for thread in self._threads:
            thread.start()

    def _user(self, port, index, timeout, user_id):
        body = json.dumps({"user_id": user_id, "message": "what is 2+2?"})
        self._barrier.wait()
        sent = time.perf_counter()
        seconds, status, data = timed_request(
            "POST", port, PATH, user_address(index), timeout, body,
            {"Content-Type": "application/json", "X-Aibutler-Secret": SECRET})
        self.results[index] = (sent, seconds, status, data)

    def go(self):
        self._barrier.wait()
        self.started = time.perf_counter()

    def join(self, deadline):
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.perf_counter()))

    def answered(self, status):
        return [r for r in self.results if r is not None and r[2] == status]


# --- the three runs ------------------------------------------------------------------

@contextlib.contextmanager
def slow_daemon(args, outbound_url=None):
    """A fake model and an aibutler using it; both gone afterwards, whatever happened."""
    model = SlowModel(args.model_delay)
    config = (f"[agent]\nprovider = openai\nbase_url = {model.base_url}\ntimeout = 60s\n"
              + (f"[channels.webhook]\noutbound_url = {outbound_url}\n" if outbound_url else ""))
    try:
        with tempfile.TemporaryDirectory() as data:
            server = start_aibutler(data, config, ready=first_health)
            try:
                yield model, server
            finally:
                server.kill()  # the runs are over: nothing to finish gracefully
    finally:
        model.close()


class Watch:
    """Probes and memory around one burst."""

    def __init__(self, server):
        self.server = server
        self.idle_mb = rss_mb(server.pid)
        self.rss = RssSampler(server.pid)
        self.prober = Prober(server.port)
        time.sleep(QUIET_BEFORE)

    def finish(self, memory_after=True):
        """Probes and sampling stop; memory read again AFTER_SECONDS later."""
        self.prober.stop()
        result = {"idle_mb": self.idle_mb, "peak_mb": self.rss.stop(),
                  "healthz": self.prober.summary("/healthz"),
                  "readyz": self.prober.summary("/readyz")}
        if memory_after:
            time.sleep(AFTER_SECONDS)
            result["after_mb"] = rss_mb(self.server.pid)
        return result


def watched_burst(server, model, users, timeout, name):
    """Start watching the daemon, then send one message from each user at once."""
    watch = Watch(server)
    model.reset()
    burst = Burst(server.port, users, timeout, name)
    burst.go()
    return watch, burst


def run_sync(args):
    with slow_daemon(args) as (model, server):
        watch, burst = watched_burst(server, model, args.slow_users, USER_TIMEOUT, "slow-sync")
        burst.join(burst.started + USER_TIMEOUT + 5)
        result = watch.finish()
        replies = sorted(seconds for _, seconds, _, _ in burst.answered(200))
        result.update(users=args.slow_users, answered=len(replies), latencies=replies,
                      max_in_flight=model.max_in_flight, model_calls=model.calls)
    return result


def run_async(args):
    receiver = CallbackClock()
    try:
        with slow_daemon(args, receiver.url) as (model, server):
            watch, burst = watched_burst(server, model, args.slow_users, 30.0, "slow-async")
            burst.join(burst.started + 35)
            accepted = {}  # message_id -> when its 202 arrived
            for sent, seconds, status, data in burst.answered(202):
                accepted[json.loads(data)["message_id"]] = sent + seconds
            deadline = burst.started + CALLBACK_TIMEOUT
            while (not all(m in receiver.arrived for m in accepted)
                   and time.perf_counter() < deadline):
                time.sleep(0.05)
            result = watch.finish()
            waits = sorted(receiver.arrived[m] - at for m, at in accepted.items()
                           if m in receiver.arrived)
            accept_ms = [seconds * 1000 for _, seconds, _, _ in burst.answered(202)]
            result.update(users=args.slow_users, accepted=len(accepted), answered=len(waits),
                          latencies=waits, accept_max_ms=max(accept_ms, default=math.nan),
                          error_callbacks=receiver.errors,
                          max_in_flight=model.max_in_flight, model_calls=model.calls)
    finally:
        receiver.close()
    return result


def run_waiting(args):
    with slow_daemon(args) as (model, server):
        watch, burst = watched_burst(server, model, args.waiting_users, USER_TIMEOUT,
                                     "slow-wait")
        time.sleep(max(0.0, burst.started + WAITING_WINDOW - time.perf_counter()))
        answered = len(burst.answered(200))
        max_in_flight = model.max_in_flight
        result = watch.finish(memory_after=False)  # waits for the probes under way
        result.update(users=args.waiting_users, answered=answered, latencies=[],
                      max_in_flight=max_in_flight, model_calls=model.calls)
    return result


def scenario_slow_model(args):
    """The three runs, in order; each one's figures as a dict."""
    runs = {}
    for name, run in (("sync", run_sync), ("async", run_async), ("waiting", run_waiting)):
        runs[name] = run(args)
        print(f"slow model, {name}: " + one_line(runs[name]), flush=True)
    return runs


def one_line(result):
    """A run's figures in a line of progress output."""
    lat = result["latencies"]
    return (f"{result['answered']}/{result['users']} answered"
            + (f", p50 {percentile(lat, 0.5):.2f} s, max {lat[-1]:.2f} s" if lat else "")
            + f", max model calls at once {result['max_in_flight']}, /healthz p99 "
            f"{ms(result['healthz']['p99_ms'])} max {ms(result['healthz']['max_ms'])}")


# --- report ------------------------------------------------------------------------

def ms(value):
    if math.isinf(value):
        return "no answer"
    if math.isnan(value):
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def probe_cell(summary):
    return f"{ms(summary['p99_ms'])} / {ms(summary['max_ms'])}"


def unanswered_cell(runs_summary):
    parts = []
    for path, s in runs_summary:
        lost = s["timeouts"] + s["dropped"]
        text = f"{path} {lost}/{s['count']}"
        if lost:
            text += (f" ({s['dropped']} dropped, {s['timeouts']} timed out; slowest answer "
                     f"{ms(s['slowest_answer_ms'])} ms)")
        if s["not_200"]:
            text += f", {s['not_200']} answered other than 200"
        parts.append(text)
    return "; ".join(parts)


def report(runs, args):
    delay = args.model_delay
    head = (f"### Slow model: fake OpenAI-compatible server, {delay:g} s per call, "
            "unlimited parallelism")
    lines = [head, "",
             f"Each user POSTs once, all at the same moment, each from its own loopback "
             f"address. Probes: GET /healthz and /readyz every {PROBE_EVERY * 1000:.0f} ms "
             f"from one address, each on a new connection, {PROBE_TIMEOUT:g} s timeout; an "
             "unanswered probe (timed out, or its connection dropped by the daemon) counts "
             "as infinite in p99 and max. Memory: VmRSS before, peak (sampled every 100 ms) "
             f"and {AFTER_SECONDS:g} s after the last reply.", "",
             "| run | answered | p50 s | max s | most model calls at once | "
             "/healthz p99 / max ms | /readyz p99 / max ms | probes unanswered of sent | "
             "RSS before → peak → after MB |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    names = {"sync": f"sync, {runs['sync']['users']} users: request → reply",
             "async": f"async, {runs['async']['users']} users: 202 → callback",
             "waiting": f"sync, {runs['waiting']['users']} users waiting "
                        f"(first {WAITING_WINDOW:g} s, then killed)"}
    for key in ("sync", "async", "waiting"):
        r = runs[key]
        lat = r["latencies"]
        answered = f"{r['answered']}/{r['users']}"
        if key == "waiting":
            answered += f" within {WAITING_WINDOW:g} s"
        memory = f"{r['idle_mb']:.1f} → {r['peak_mb']:.1f}" + (
            f" → {r['after_mb']:.1f}" if "after_mb" in r else "")
        lines.append(
            f"| {names[key]} | {answered} | "
            + (f"{percentile(lat, 0.5):.2f} | {lat[-1]:.2f}" if lat else "– | –")
            + f" | {r['max_in_flight']} | {probe_cell(r['healthz'])} | "
            f"{probe_cell(r['readyz'])} | "
            f"{unanswered_cell([('healthz', r['healthz']), ('readyz', r['readyz'])])} | "
            f"{memory} |")
    a = runs["async"]
    lines += ["", f"Async: {a['accepted']}/{a['users']} got their 202 (slowest "
                  f"{ms(a['accept_max_ms'])} ms), {a['error_callbacks']} callbacks carried an "
                  f"error. Issue 12's targets: sync max ≤ {delay + 0.5:g} s, async max ≤ "
                  f"{delay + 1:g} s, probes p99 ≤ 50 ms in every run, RSS peak − before ≤ 15 MB "
                  "and back near before afterwards.", ""]
    return lines


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    probe_main(int(sys.argv[2]), sys.argv[3:])
