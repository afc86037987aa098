"""Issue 12's efficiency figures for a small device.

    python bench/run.py --cpu        # CPU time per request, server pinned to one core
    python bench/run.py --sd-card    # durable async accepts with a slow fsync

CPU per request: the server runs pinned to core 0 (taskset -c 0), wrk (or the
stdlib generator) and this process on core 1; the server's user + system CPU
time is read from /proc/PID/stat before and after a fixed-duration load and
divided by the requests answered. For the floor, sync (builtin agent), async
accept alone (the turn workers are kept waiting on a model that does not
answer, so only accepts run), and async per message: accept, turn and callback,
with every callback drained to a loopback receiver before the CPU is read again.

Emulated SD card: a Raspberry Pi's card takes milliseconds per fsync. A small
LD_PRELOAD shim, compiled here with cc, sleeps FSYNC_MS (5) before each
fsync()/fdatasync() of the daemon (sqlite syncs its WAL with them). The async
daemon takes a fixed-duration load from the stdlib generator, which counts
every 202 it got; then it is stopped with SIGTERM and the jobs in its sqlite
file are counted: a 202 without its job would be a promise lost.
"""

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time

from harness import (Sink, cpu_seconds, first_health, load, load_python, start_aibutler,
                     start_floor)
from slow_model import SlowModel

SERVER_CPU, LOAD_CPU = 0, 1
SETTLE = 0.3  # seconds for the server to finish what it has in hand after the load
ASYNC = "[delivery]\nmax_pending = 1000000\n"


# --- CPU time per request ------------------------------------------------------

@contextlib.contextmanager
def on_core(cpu):
    """This process (the receiver, the stdlib generator) on `cpu` meanwhile."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpu_per_request(server, args):
    """ms of the server's CPU per request answered under a fixed-duration load."""
    time.sleep(SETTLE)
    before = cpu_seconds(server.pid)
    result = load(server.port, args.cpu_seconds, args.connections, LOAD_CPU)
    time.sleep(SETTLE)
    spent = cpu_seconds(server.pid) - before
    return {"cpu_ms": spent * 1000 / max(1, result["requests"]), "requests": result["requests"],
            "errors": result["errors"], "cpu_s": spent}


def cpu_floor(args):
    server = start_floor(SERVER_CPU)
    try:
        return cpu_per_request(server, args)
    finally:
        server.stop()


def cpu_sync(args):
    with tempfile.TemporaryDirectory() as data:
        server = start_aibutler(data, cpu=SERVER_CPU)
        try:
            return cpu_per_request(server, args)
        finally:
            server.stop()


def cpu_async_accept(args):
    """Accepts only: the two turn workers wait on a model that holds every call
    (released at the end), so no turn or callback runs during the load."""
    model, sink = SlowModel(delay=3600), Sink()
    config = (f"[agent]\nprovider = openai\nbase_url = {model.base_url}\n"
              f"[channels.webhook]\noutbound_url = {sink.url}\n" + ASYNC)
    try:
        with tempfile.TemporaryDirectory() as data:
            server = start_aibutler(data, config, cpu=SERVER_CPU)
            try:
                return cpu_per_request(server, args)
            finally:
                server.kill()  # workers are inside a model call: nothing to wait for
    finally:
        model.close()
        sink.close()


def cpu_async_message(args):
    """Accept + turn + callback: CPU from before the load until every accepted
    message's callback has arrived, per callback."""
    sink = Sink()
    try:
        with tempfile.TemporaryDirectory() as data:
            server = start_aibutler(data, f"[channels.webhook]\noutbound_url = {sink.url}\n"
                                          + ASYNC, cpu=SERVER_CPU)
            try:
                sink.wait_for(1, 30)  # the start-up POST's callback
                time.sleep(SETTLE)
                before, first = cpu_seconds(server.pid), sink.count
                result = load(server.port, args.cpu_seconds, args.connections, LOAD_CPU)
                accepted = result["requests"] - result["errors"]
                drained = sink.wait_for(first + accepted, 120)
                settled = -1
                while settled != sink.count:  # the requests wrk left unanswered at its end
                    settled = sink.count
                    time.sleep(SETTLE)
                spent = cpu_seconds(server.pid) - before
                messages = sink.count - first
                return {"cpu_ms": spent * 1000 / max(1, messages), "requests": messages,
                        "errors": result["errors"], "cpu_s": spent, "drained": drained}
            finally:
                server.stop()
    finally:
        sink.close()


def scenario_cpu(args):
    if not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        return None
    runs = {}
    for name, run in (("floor", cpu_floor), ("sync", cpu_sync),
                      ("accept", cpu_async_accept), ("message", cpu_async_message)):
        with on_core(LOAD_CPU):
            runs[name] = run(args)
        print(f"cpu, {name}: {runs[name]['cpu_ms']:.3f} ms per request over "
              f"{runs[name]['requests']} requests", flush=True)
    return runs


def cpu_report(runs, args):
    if runs is None:
        return ["CPU per request: skipped (needs taskset and two cores).", ""]
    floor = runs["floor"]["cpu_ms"]
    names = {"floor": "floor (bare falcon + waitress)", "sync": "sync (builtin agent)",
             "accept": "async accept alone (202)",
             "message": "async per message (accept + turn + callback)"}
    lines = ["### CPU time per request, server pinned to one core", "",
             f"Server on core {SERVER_CPU} (taskset), load and receiver on core {LOAD_CPU}; "
             f"the server's user + system CPU time (/proc/PID/stat) over {args.cpu_seconds} s "
             f"of load on {args.connections} keep-alive connections, divided by the requests "
             "answered (async per message: by the callbacks received, all drained).", "",
             "| scenario | requests | CPU s | CPU ms per request | × floor |",
             "|---|---:|---:|---:|---:|"]
    for key, name in names.items():
        r = runs[key]
        note = "" if r.get("drained", True) else " (not all drained)"
        lines.append(f"| {name}{note} | {r['requests']} | {r['cpu_s']:.2f} | "
                     f"{r['cpu_ms']:.3f} | {r['cpu_ms'] / floor:.2f} |")
    lines += ["", "Issue 12's target: sync ≤ 2.5 × the floor.", ""]
    return lines


# --- emulated SD card -------------------------------------------------------------

SHIM_C = r"""
/* LD_PRELOAD shim: sleep AIBUTLER_BENCH_FSYNC_MS (default 5) ms before each
   fsync()/fdatasync(), then call the real one: an SD card's sync latency. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <errno.h>

static struct timespec delay;

__attribute__((constructor)) static void init(void) {
    const char *text = getenv("AIBUTLER_BENCH_FSYNC_MS");
    double ms = text ? atof(text) : 5.0;
    delay.tv_sec = (time_t)(ms / 1000);
    delay.tv_nsec = (long)((ms - delay.tv_sec * 1000.0) * 1e6);
}

static void slow_down(void) {
    struct timespec left = delay;
    int saved = errno;
    while (nanosleep(&left, &left) == -1 && errno == EINTR) {}
    errno = saved;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow_down();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow_down();
    return real(fd);
}
"""

# Run in a child with and without the shim: one fsync, and one sqlite commit
# made the way the daemon makes a durable one (WAL, synchronous=FULL).
SYNC_PROBE = textwrap.dedent("""
    import os, sqlite3, statistics, sys, time
    folder = sys.argv[1]
    fd = os.open(os.path.join(folder, "probe"), os.O_WRONLY | os.O_CREAT, 0o600)
    fsyncs, commits = [], []
    db = sqlite3.connect(os.path.join(folder, "probe.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS t (x)")
    for i in range(7):
        os.write(fd, b"x")
        started = time.perf_counter()
        os.fsync(fd)
        fsyncs.append(time.perf_counter() - started)
        started = time.perf_counter()
        db.execute("INSERT INTO t VALUES (?)", (i,))
        commits.append(time.perf_counter() - started)
    print(statistics.median(fsyncs) * 1000, statistics.median(commits) * 1000)
""")


def build_shim(folder):
    """The compiled shim's path, or None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, shim = os.path.join(folder, "shim.c"), os.path.join(folder, "shim.so")
    with open(source, "w") as handle:
        handle.write(SHIM_C)
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", shim, source, "-ldl"],
                   check=True, capture_output=True, timeout=60)
    return shim


def sync_times(folder, env):
    """(median ms of one os.fsync, median ms of one durable sqlite commit) in a child."""
    os.makedirs(folder, exist_ok=True)
    out = subprocess.run([sys.executable, "-c", SYNC_PROBE, folder], env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    fsync_ms, commit_ms = map(float, out.split())
    return fsync_ms, commit_ms


def count_jobs(db_path):
    db = sqlite3.connect(db_path)
    try:
        return db.execute("SELECT COUNT(*) FROM jobs WHERE user_id LIKE 'user-%'").fetchone()[0]
    finally:
        db.close()


def scenario_sd_card(args):
    with tempfile.TemporaryDirectory() as folder:
        shim = build_shim(folder)
        if shim is None:
            return None
        slow_env = {"LD_PRELOAD": shim, "AIBUTLER_BENCH_FSYNC_MS": str(args.fsync_ms)}
        plain = sync_times(os.path.join(folder, "plain"), dict(os.environ))
        shimmed = sync_times(os.path.join(folder, "shimmed"), dict(os.environ, **slow_env))
        sink = Sink()
        data = os.path.join(folder, "data")
        os.mkdir(data)
        try:
            server = start_aibutler(data, f"[channels.webhook]\noutbound_url = {sink.url}\n"
                                          + ASYNC, env=slow_env, ready=first_health)
            try:
                result = load_python(server.port, args.sd_seconds, args.connections)
            finally:
                stopped = server.stop(timeout=30)
        finally:
            sink.close()
        accepted = result["statuses"].get(202, 0)
        jobs = count_jobs(os.path.join(data, "aibutler.db"))
    return {"plain_fsync_ms": plain[0], "plain_commit_ms": plain[1],
            "fsync_ms": shimmed[0], "commit_ms": shimmed[1],
            "accepted": accepted, "accepts_per_s": accepted / args.sd_seconds,
            "p50": result["p50"], "p99": result["p99"], "statuses": dict(result["statuses"]),
            "dropped": result["errors"] - sum(n for code, n in result["statuses"].items()
                                              if code >= 300),
            "jobs": jobs, "lost": max(0, accepted - jobs),
            "stopped_by_sigterm": stopped}


def sd_report(r, args):
    if r is None:
        return ["Emulated SD card: skipped (no C compiler to build the fsync shim).", ""]
    others = [f"{n}× {code}" for code, n in sorted(r["statuses"].items()) if code != 202]
    if r["dropped"]:
        others.append(f"{r['dropped']} dropped connections")
    return [
        "### Async accept on an emulated SD card", "",
        f"An LD_PRELOAD shim sleeps {args.fsync_ms:g} ms before each fsync()/fdatasync() of "
        f"the daemon (checked in a child process: one os.fsync {r['plain_fsync_ms']:.2f} ms "
        f"without it, {r['fsync_ms']:.2f} ms with it; one durable sqlite commit "
        f"{r['plain_commit_ms']:.2f} ms → {r['commit_ms']:.2f} ms). Async daemon (builtin "
        f"agent, callbacks to a loopback receiver, all cores), {args.connections} keep-alive "
        f"connections for {args.sd_seconds} s from the stdlib generator, which counts every "
        "answer; then SIGTERM, and the jobs in the sqlite file are counted.", "",
        "| durable accepts/s | 202s | p50 ms | p99 ms | other answers | jobs in sqlite | "
        "202s without a job (lost) | stopped by SIGTERM |",
        "|---:|---:|---:|---:|---|---:|---:|---|",
        f"| **{r['accepts_per_s']:.0f}** | {r['accepted']} | {r['p50']:.1f} | {r['p99']:.1f} | "
        f"{', '.join(others) or 'none'} | {r['jobs']} | **{r['lost']}** | "
        f"{'yes' if r['stopped_by_sigterm'] else 'no, killed after 30 s'} |", "",
        "Issue 12's target: ≥ 500 durable accepts/s here with none lost.", ""]
