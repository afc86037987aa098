"""Side-by-side benchmark of aibutler against the floor of its own stack.

    python bench/run.py                 # everything, also pinned to one core
    python bench/run.py --quick         # shorter runs, no soak, no pinned pass, no slow model
    python bench/run.py --slow-model    # only issue 12's slow-model runs (--cpu, --sd-card too)
    python bench/run.py --slow-model --set "[agent] concurrency = 8"   # with a config line
    python bench/run.py --checkpoints   # sync turns that write, fast disk and 49 ms fsync
    python bench/run.py --checkpoints --aibutler /tmp/aibutler-17e1de6.py   # another version

Starts on loopback: the floor (bench/floor.py), aibutler in sync mode (builtin
agent, rate limits off), aibutler in async mode (202 path, replies drained to a
loopback receiver), a dispatch run (N queued replies delivered to a receiver)
and an in-process turn against a fake model that answers at once. Then issue
12's scenarios: a fake model that takes 2 s per call with many users writing at
once (bench/slow_model.py), CPU time per request pinned to one core and durable
accepts on an emulated SD card (bench/efficiency.py); sync turns that write
(the `remember` tool) while the WAL is checkpointed, on a fast disk and an
emulated SD card (bench/checkpoints.py); idle memory after start and after a
first request. --aibutler PATH runs another aibutler.py in every daemon (and
in-process part) instead of the checkout's. Prints markdown tables
and, for a full run, writes them to bench/RESULTS.md with the machine it ran
on, keeping what follows the marker line there (figures kept for comparison).
Uses wrk when installed (apt install wrk), else a standard-library keep-alive
load generator. No timed assertions anywhere: these are figures to read.
"""

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import aibutler  # noqa: E402
import checkpoints  # noqa: E402
import efficiency  # noqa: E402
import harness  # noqa: E402
import slow_model  # noqa: E402
from harness import (PATH, SECRET, THREADS, USERS, Sink, first_health, load,  # noqa: E402
                     rss_mb, start_aibutler, start_floor)


# --- helpers --------------------------------------------------------------

def measure(server, seconds, connections, load_cpu):
    idle = rss_mb(server.proc.pid)
    peak = [idle]
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], rss_mb(server.proc.pid))
    sampler = threading.Thread(target=sample)
    sampler.start()
    result = load(server.port, seconds, connections, load_cpu)
    done.set()
    sampler.join()
    result.update(idle_mb=idle, load_mb=peak[0], ready_s=server.ready_s)
    return result


# --- scenarios ----------------------------------------------------------------

def scenario_script_start():
    """Idle memory and readiness when run as a plain script."""
    with tempfile.TemporaryDirectory() as data:
        server = start_aibutler(data, as_script=True)
        try:
            return rss_mb(server.proc.pid), server.ready_s
        finally:
            server.stop()


def scenario_idle_rss():
    """A sync daemon's VmRSS once /healthz answers (no turn run yet), then
    after one turn ("hello"), after one "remember that ..." turn, and after a
    further IDLE_SETTLE seconds: (label, MB) pairs, and the ready time."""
    marks = []
    with tempfile.TemporaryDirectory() as data:
        server = start_aibutler(data, ready=first_health)
        try:
            time.sleep(IDLE_SETTLE)
            marks.append(("after start (/healthz answered, no turn yet)", rss_mb(server.pid)))
            for label, message in (("after a first request (\"hello\")", "hello"),
                                   ("after a first write (\"remember that ...\")",
                                    "remember that my locker is 42")):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                conn.request("POST", PATH, body=json.dumps({"user_id": "idle", "message": message}),
                             headers={"Content-Type": "application/json",
                                      "X-Aibutler-Secret": SECRET})
                conn.getresponse().read()
                conn.close()
                time.sleep(IDLE_SETTLE)
                marks.append((label, rss_mb(server.pid)))
            time.sleep(10)
            marks.append((f"{10 + IDLE_SETTLE:g} s later", rss_mb(server.pid)))
        finally:
            server.stop()
    return marks, server.ready_s


IDLE_SETTLE = 1.0  # seconds after start or a request before VmRSS is read


def idle_report(result):
    marks, ready = result
    return ["### Idle memory", "",
            f"Sync daemon (`python -m aibutler`, builtin agent), VmRSS {IDLE_SETTLE:g} s after "
            f"each step (ready in {ready:.3f} s: /healthz answered): "
            + "; ".join(f"{label}: **{mb:.1f} MB**" for label, mb in marks) + ".", ""]


def scenario_floor(args, cpu, load_cpu):
    server = start_floor(cpu)
    try:
        return measure(server, args.seconds, args.connections, load_cpu)
    finally:
        server.stop()


def scenario_sync(args, cpu, load_cpu):
    with tempfile.TemporaryDirectory() as data:
        server = start_aibutler(data, cpu=cpu)
        try:
            return measure(server, args.seconds, args.connections, load_cpu)
        finally:
            server.stop()


def scenario_async(args, cpu, load_cpu):
    sink = Sink()
    with tempfile.TemporaryDirectory() as data:
        server = start_aibutler(data, f"[channels.webhook]\noutbound_url = {sink.url}\n"
                                      "[delivery]\nmax_pending = 1000000\n", cpu=cpu)
        try:
            result = measure(server, args.seconds, args.connections, load_cpu)
            started, expected = time.perf_counter(), result["requests"] - result["errors"]
            while sink.count < expected and time.perf_counter() - started < 120:
                time.sleep(0.1)
            result["drained"] = f"{sink.count}/{expected}"
            return result
        finally:
            server.stop()
            sink.shutdown()


def scenario_dispatch(args, cpu, load_cpu):
    sink = Sink()
    count = args.callbacks
    with tempfile.TemporaryDirectory() as data:
        store = aibutler.Store(os.path.join(data, "aibutler.db"))
        with store.transaction() as db:
            for i in range(count):
                store.add_delivery(db, f"msg-{i}", f"user-{i % USERS}",
                                   {"session_id": "sess-x", "reply": "It's sunny.",
                                    "in_reply_to": f"user-{i % USERS}", "message_id": f"msg-{i}",
                                    "tool_calls": []})
        store.close()
        server = start_aibutler(data, f"[channels.webhook]\noutbound_url = {sink.url}\n", cpu=cpu)
        started = time.perf_counter()
        while sink.count < count and time.perf_counter() - started < 300:
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        server.stop()
    sink.shutdown()
    return {"callbacks_per_s": sink.count / seconds, "callbacks": sink.count}


def scenario_turn(args):
    """One agent turn against a fake model that answers at once, in-process,
    minus the bare HTTP round trip to that model."""
    model = slow_model.SlowModel(delay=0.0)  # answers at once
    with tempfile.TemporaryDirectory() as data:
        vault = aibutler.Vault(os.path.join(data, "vault.json"), env={})
        store = aibutler.Store(os.path.join(data, "aibutler.db"))
        config = aibutler.load_config(None, env={"AIBUTLER_DATA": data}, data_dir=data)
        config.agent.provider, config.agent.base_url = "openai", model.base_url
        butler = aibutler.Butler(config, vault, store)
        request = {"user_id": "u", "message": "What's the weather?",
                   "metadata": {"location": "Madrid"}}
        turns, raw = [], []
        payload = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}]})
        for i in range(args.turns):
            session = store.resolve_session(f"u{i % 50}", None, 3600)
            started = time.perf_counter()
            butler.agent.run_turn(dict(request, user_id=f"u{i % 50}"), session)
            turns.append(time.perf_counter() - started)
            started = time.perf_counter()
            aibutler.http_post(model.base_url + "/chat/completions", payload.encode(),
                               {"Content-Type": "application/json"}, 5)
            raw.append(time.perf_counter() - started)
        store.close()
    model.shutdown()
    turn_ms, raw_ms = statistics.median(turns) * 1000, statistics.median(raw) * 1000
    return {"turn_ms": turn_ms, "model_ms": raw_ms, "overhead_ms": turn_ms - raw_ms}


def scenario_soak(args):
    """RSS of a sync daemon over many requests from distinct users."""
    with tempfile.TemporaryDirectory() as data:
        server = start_aibutler(data)
        marks = []
        per_step = args.soak // 4
        try:
            marks.append((0, rss_mb(server.proc.pid)))
            for step in range(1, 5):
                load_soak(server.port, per_step, step)
                marks.append((step * per_step, rss_mb(server.proc.pid)))
        finally:
            server.stop()
    return marks


def load_soak(port, count, step):
    """`count` requests, each from a new user_id, over 8 keep-alive connections."""
    def client(index):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for n in range(index, count, 8):
            body = json.dumps({"user_id": f"soak-{step}-{n}", "message": "hello"})
            conn.request("POST", PATH, body=body, headers={
                "Content-Type": "application/json", "X-Aibutler-Secret": SECRET})
            conn.getresponse().read()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --- report ---------------------------------------------------------------------

def machine():
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as handle:
            names = [l.split(":", 1)[1].strip() for l in handle if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import falcon
    from importlib.metadata import version
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}); "
            f"Python {platform.python_version()}, falcon {falcon.__version__}, "
            f"waitress {version('waitress')}; load: "
            f"{'wrk' if shutil.which('wrk') else 'stdlib generator'}")


def table(title, rows, floor):
    lines = [f"### {title}", "",
             "| scenario | req/s | × floor | p50 ms | p99 ms | p99 × floor | RSS idle MB | "
             "RSS load MB | ready s | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        extra = f" (drained {r['drained']})" if "drained" in r else ""
        lines.append(f"| {name}{extra} | {r['rps']:.0f} | {r['rps'] / floor['rps']:.2f} | "
                     f"{r['p50']:.2f} | {r['p99']:.2f} | {r['p99'] / floor['p99']:.2f} | "
                     f"{r['idle_mb']:.1f} | {r['load_mb']:.1f} | {r['ready_s']:.3f} | "
                     f"{r['errors']} |")
    return lines


def run_pass(args, cpu, load_cpu):
    rows = [("floor (bare falcon + waitress)", scenario_floor(args, cpu, load_cpu)),
            ("sync (builtin agent)", scenario_sync(args, cpu, load_cpu)),
            ("async accept (202)", scenario_async(args, cpu, load_cpu))]
    dispatch = scenario_dispatch(args, cpu, load_cpu)
    return rows, dispatch


def aibutler_commit():
    """Which aibutler.py was measured: the last commit that changed it, the
    checkout's commit, and whether the file differs from it (or, with
    --aibutler, that file and its git blob id)."""
    def git(*argv):
        return subprocess.run(["git", "-C", ROOT, *argv], capture_output=True,
                              text=True).stdout.strip()
    if os.path.abspath(harness.AIBUTLER) != os.path.join(ROOT, "aibutler.py"):
        blob = git("hash-object", harness.AIBUTLER)
        same = [c for c in git("log", "--format=%h", f"--find-object={blob}", "--",
                               "aibutler.py").split() if git("rev-parse", f"{c}:aibutler.py")
                == blob] if blob else []
        if same:
            what = f"aibutler.py of commit {same[-1]}"
        elif blob and blob == git("hash-object", os.path.join(ROOT, "aibutler.py")):
            what = "the working tree's aibutler.py"
        else:
            what = "aibutler.py"
        return (f"{what} (git blob {blob[:10] or 'unknown'}), run from {harness.AIBUTLER} "
                f"(checkout {git('log', '-1', '--format=%h') or 'unknown'})")
    changed, head = git("log", "-1", "--format=%h", "--", "aibutler.py"), git("log", "-1",
                                                                              "--format=%h")
    text = f"aibutler.py of commit {changed or 'unknown'} (checkout {head or 'unknown'})"
    if git("status", "--porcelain", "--", "aibutler.py"):
        text += " with uncommitted changes"
    return text


def throughput_sections(args):
    """The side-by-side tables, start-up, turn overhead and the soak."""
    out = [f"{THREADS} waitress threads, {args.connections} keep-alive connections, "
           f"{args.seconds}s per load, {USERS} distinct user_ids, message "
           "\"what is 2+2?\" (one tool call in aibutler), rate limits off.", ""]
    passes = [("all cores", None, None)]
    if not args.quick and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        passes.append(("server pinned to one core (taskset -c 0), load on core 1", 0, 1))
    for title, cpu, load_cpu in passes:
        rows, dispatch = run_pass(args, cpu, load_cpu)
        out += table(title, rows, rows[0][1])
        out += ["", f"Dispatch: {dispatch['callbacks']} queued callbacks delivered to a loopback "
                    f"receiver at **{dispatch['callbacks_per_s']:.0f} callbacks/s**.", ""]
        print("\n".join(out[-len(rows) - 8:]), flush=True)
    script_mb, script_ready = scenario_script_start()
    out += [f"aibutler is run as aibutler.service runs it (`python -m aibutler`, byte code "
            f"compiled at install). Run as a script (`python aibutler.py run`, compiled at "
            f"every start) it idles at {script_mb:.1f} MB and is ready in {script_ready:.3f} s.",
            ""]
    turn = scenario_turn(args)
    out += [f"Turn overhead (in-process, fake OpenAI model answering at once, median of "
            f"{args.turns}): turn {turn['turn_ms']:.3f} ms, bare model round trip "
            f"{turn['model_ms']:.3f} ms, **overhead {turn['overhead_ms']:.3f} ms**.", ""]
    if args.soak:
        marks = scenario_soak(args)
        out += [f"Memory over {args.soak} sync requests, each from a new user_id: "
                + ", ".join(f"{n}: {mb:.1f} MB" for n, mb in marks) + ".", ""]
    return out


# Everything below this line in RESULTS.md survives a full run (figures kept
# for comparison, such as those before a change).
KEEP_MARKER = "<!-- bench/run.py rewrites what is above this line and keeps what follows -->"


def write_results(report):
    path = os.path.join(HERE, "RESULTS.md")
    kept = KEEP_MARKER + "\n"
    with contextlib.suppress(FileNotFoundError):
        with open(path) as handle:
            text = handle.read()
        if KEEP_MARKER in text:
            kept = text[text.index(KEEP_MARKER):]
    with open(path, "w") as handle:
        handle.write(report + "\n" + kept)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="With none of --slow-model, --cpu, --sd-card, --checkpoints, --idle-rss: "
               "everything, and (unless --quick) the report goes to bench/RESULTS.md. With "
               "some: only those, printed.")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--callbacks", type=int, default=3000)
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--soak", type=int, default=100000)
    parser.add_argument("--quick", action="store_true",
                        help="shorter runs, no soak, no pinned pass, no slow model")
    parser.add_argument("--slow-model", action="store_true",
                        help="2 s model, many users at once, probes (bench/slow_model.py)")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU time per request, pinned to one core (bench/efficiency.py)")
    parser.add_argument("--sd-card", action="store_true",
                        help="durable async accepts with a slow fsync (bench/efficiency.py)")
    parser.add_argument("--checkpoints", action="store_true",
                        help="sync turns that write (remember), fast disk and a slow fsync "
                             "(bench/checkpoints.py)")
    parser.add_argument("--idle-rss", action="store_true",
                        help="idle memory after start and after a first request")
    parser.add_argument("--aibutler", metavar="PATH",
                        help="the aibutler.py to measure instead of the checkout's, e.g. "
                             "one from `git show COMMIT:aibutler.py > /tmp/aibutler-COMMIT.py`")
    parser.add_argument("--set", action="append", default=[], metavar="'[SECTION] KEY = VALUE'",
                        help="a config line for every aibutler started, e.g. "
                             "'[agent] concurrency = 8' (repeatable)")
    parser.add_argument("--model-delay", type=float, default=2.0,
                        help="seconds the slow model takes per call")
    parser.add_argument("--slow-users", type=int, default=50)
    parser.add_argument("--waiting-users", type=int, default=200)
    parser.add_argument("--cpu-seconds", type=int, default=5)
    parser.add_argument("--sd-seconds", type=int, default=5)
    parser.add_argument("--fsync-ms", type=float, default=5.0,
                        help="milliseconds the shim adds to each fsync")
    parser.add_argument("--checkpoint-fsync-ms", type=float, default=49.0,
                        help="milliseconds the shim adds to each fsync in --checkpoints")
    parser.add_argument("--checkpoint-turns", type=int, default=3000)
    parser.add_argument("--checkpoint-senders", type=int, default=4)
    parser.add_argument("--checkpoint-users", type=int, default=1000)
    parser.add_argument("--checkpoint-rate", type=float, default=0,
                        help="turns per second in all in --checkpoints (0: each sender's "
                             "next as soon as its last is answered)")
    parser.add_argument("--checkpoint-seconds", type=int, default=120,
                        help="at most this long per --checkpoints run")
    parser.add_argument("--fact-bytes", type=int, default=1500,
                        help="characters of each remembered fact (the tool takes up to 2000)")
    args = parser.parse_args(argv)
    for line in args.set:
        try:
            harness.override_text(line)
        except ValueError as exc:
            parser.error(str(exc))
    if args.aibutler and not os.path.isfile(args.aibutler):
        parser.error(f"--aibutler {args.aibutler}: no such file")
    if args.quick:
        args.seconds, args.callbacks, args.turns, args.soak = 3, 1000, 200, 0
        args.cpu_seconds, args.sd_seconds, args.checkpoint_turns = 2, 2, 1000
    return args


def main(argv=None):
    args = parse_args(argv)
    harness.CONFIG_OVERRIDES[:] = args.set
    if args.aibutler:
        global aibutler
        harness.AIBUTLER = os.path.abspath(args.aibutler)
        aibutler = harness.load_aibutler(harness.AIBUTLER)
    chosen = (args.slow_model or args.cpu or args.sd_card or args.checkpoints
              or args.idle_rss)
    out = ["# aibutler benchmark", "", f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
           f"on {machine()}; {aibutler_commit()}"
           + (f"; config for every aibutler: {'; '.join(args.set)}" if args.set else "") + ".",
           ""]
    if not chosen:
        out += throughput_sections(args)
    if args.idle_rss or not chosen:
        out += idle_report(scenario_idle_rss())
    if args.slow_model or not (chosen or args.quick):
        out += slow_model.report(slow_model.scenario_slow_model(args), args)
    if args.cpu or not chosen:
        out += efficiency.cpu_report(efficiency.scenario_cpu(args), args)
    if args.sd_card or not chosen:
        out += efficiency.sd_report(efficiency.scenario_sd_card(args), args)
    if args.checkpoints or not chosen:
        out += checkpoints.report(checkpoints.scenario_checkpoints(args), args,
                                  f"Measured: {aibutler_commit()}")
    report = "\n".join(out)
    print(report)
    if not (chosen or args.quick):
        write_results(report)


if __name__ == "__main__":
    main()
