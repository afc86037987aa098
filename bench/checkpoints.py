"""Sync turns that write, on a fast disk and on an emulated SD card: do they
wait for sqlite's WAL checkpoints?

    python bench/run.py --checkpoints
    python bench/run.py --checkpoints --aibutler /tmp/aibutler-17e1de6.py   # another version

Each turn is a sync request to the builtin agent whose message is "remember
that ..." with a long fact (--fact-bytes, 1500 characters), so the builtin
model calls the `remember` tool, which commits the fact to sqlite, and the
turn's exchange is recorded too: several WAL pages per turn, so over
--checkpoint-turns turns (3000) the WAL crosses 1000 pages (sqlite's
automatic checkpoint threshold) many times. Every turn comes from another
user_id of --checkpoint-users (1000), over --checkpoint-senders (4) keep-alive
connections, each sending its next turn when the last was answered (or, with
--checkpoint-rate R, turn n when it is due, n / R seconds after the start, and
its last was answered); a run ends after its turns or after
--checkpoint-seconds (120), whichever is first.

Two runs, each against a fresh daemon (sync mode, builtin agent, rate limits
off, `python -m aibutler` as in every scenario): without the shim (this
machine's disk) and with efficiency.py's LD_PRELOAD shim sleeping
--checkpoint-fsync-ms (49: an SD card's fsync, as measured on one) before each
fsync()/fdatasync() of the daemon. A checkpoint syncs the WAL and the database
file, so one costs about two of those.

Latency is from sending a turn to the last byte of its answer. Meanwhile a
thread reads the WAL index header in the database's -shm file every 2 ms (its
first 100 bytes, as sqlite lays them out: mxFrame, the salt that changes when
the WAL restarts from its beginning, nBackfill), which gives the frames (pages)
written to the WAL, the most frames it held at once and how many checkpoints
copied frames back: sampled, so about. Figures only: nothing is asserted.
"""

import http.client
import json
import os
import random
import struct
import tempfile
import threading
import time

import efficiency
from harness import PATH, SECRET, first_health, rss_mb, start_aibutler
from slow_model import percentile

PAGE = 4096  # bytes: sqlite's default page size, a WAL frame's payload
SAMPLE_EVERY = 0.002  # seconds between reads of the WAL index header
WORDS = ("locker garden bicycle window orange marble harbour violin lantern meadow "
         "copper thunder ribbon candle pepper silver maple anchor basket pillow "
         "compass falcon granite kettle ladder mirror needle oyster quartz saddle "
         "tunnel velvet walnut yogurt zephyr almond breeze cactus dolphin ember").split()


def fact(index, size, rng):
    """A distinct fact of about `size` characters."""
    words = [f"my note {index} is"]
    length = len(words[0])
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


class WalWatch:
    """Samples the WAL index header (the -shm file's first 100 bytes: two
    copies of a 48-byte WalIndexHdr, then WalCkptInfo) every SAMPLE_EVERY s."""

    HEADER = struct.Struct("=IIIBBHII8x8s8x")  # iVersion .. nPage, aSalt

    def __init__(self, db_path):
        self.path = db_path + "-shm"
        self.frames = 0        # frames appended to the WAL, summed over its restarts
        self.most = 0          # the most frames it held at once
        self.restarts = 0      # times it started again from its beginning
        self.checkpoints = 0   # times nBackfill grew: a checkpoint copied frames back
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self, fd):
        raw = os.pread(fd, 100, 0)  # not a buffered file's read: that could be stale
        if len(raw) < 100 or raw[:48] != raw[48:96]:
            return None  # not set up yet, or read while sqlite rewrote it
        _, _, _, init, _, _, mx_frame, _, salt = self.HEADER.unpack(raw[:48])
        if not init:
            return None
        backfill, = struct.unpack("=I", raw[96:100])
        return mx_frame, salt, backfill

    def _run(self):
        fd = None
        last = None
        while not self._done.wait(SAMPLE_EVERY):
            try:
                if fd is None:
                    fd = os.open(self.path, os.O_RDONLY)
                now = self._read(fd)
            except OSError:
                continue
            if now is None:
                continue
            self.samples += 1
            mx_frame, salt, backfill = now
            self.most = max(self.most, mx_frame)
            if last is None:
                self.frames = mx_frame
            elif salt != last[1]:  # a new WAL: everything in it is new
                self.restarts += 1
                self.frames += mx_frame
                self.checkpoints += last[2] < last[0]  # its last backfill was not seen
            else:
                self.frames += max(0, mx_frame - last[0])
                self.checkpoints += backfill > last[2]
            last = now
        if fd is not None:
            os.close(fd)

    def stop(self):
        self._done.set()
        self._thread.join()


def drive(port, args):
    """--checkpoint-turns "remember that ..." turns over --checkpoint-senders
    keep-alive connections, until done or --checkpoint-seconds passed.
    Returns (latencies in seconds sorted, statuses, dropped, seconds)."""
    latencies, statuses, dropped = [], {}, [0]
    lock = threading.Lock()
    senders, turns, rate = args.checkpoint_senders, args.checkpoint_turns, args.checkpoint_rate
    started = time.perf_counter()
    stop_at = started + args.checkpoint_seconds

    def sender(index):
        rng = random.Random(index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, codes, lost = [], {}, 0
        for n in range(index, turns, senders):
            if rate:  # turn n is due n / rate seconds after the start
                time.sleep(max(0.0, started + n / rate - time.perf_counter()))
            if time.perf_counter() > stop_at:
                break
            body = json.dumps({"user_id": f"ckpt-{n % args.checkpoint_users}",
                               "message": f"remember that {fact(n, args.fact_bytes, rng)}"})
            sent = time.perf_counter()
            try:
                conn.request("POST", PATH, body=body, headers={
                    "Content-Type": "application/json", "X-Aibutler-Secret": SECRET})
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                lost += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            mine.append(time.perf_counter() - sent)
            codes[response.status] = codes.get(response.status, 0) + 1
        conn.close()
        with lock:
            latencies.extend(mine)
            for code, n in codes.items():
                statuses[code] = statuses.get(code, 0) + n
            dropped[0] += lost
    threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(latencies), statuses, dropped[0], time.perf_counter() - started


def one_run(folder, name, env):
    data = os.path.join(folder, name)
    os.mkdir(data, 0o700)
    return data, start_aibutler(data, env=env, ready=first_health)


def run_disk(folder, name, env, args):
    data, server = one_run(folder, name, env)
    try:
        wal = WalWatch(os.path.join(data, "aibutler.db"))
        try:
            latencies, statuses, dropped, seconds = drive(server.port, args)
        finally:
            wal.stop()
        rss = rss_mb(server.pid)
    finally:
        server.stop()
    ms = [s * 1000 for s in latencies]
    return {"turns": len(ms), "seconds": seconds, "statuses": statuses, "dropped": dropped,
            "p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99),
            "max": ms[-1] if ms else float("nan"),
            "over_40": sum(t > 40 for t in ms), "over_100": sum(t > 100 for t in ms),
            "rss_mb": rss,
            "wal_frames": wal.frames, "wal_most": wal.most, "wal_restarts": wal.restarts,
            "checkpoints": wal.checkpoints, "samples": wal.samples}


def scenario_checkpoints(args):
    with tempfile.TemporaryDirectory() as folder:
        shim = efficiency.build_shim(folder)
        runs = {}
        runs["fast"] = run_disk(folder, "fast", None, args)
        print("checkpoints, fast disk: " + one_line(runs["fast"]), flush=True)
        if shim is None:
            return runs
        slow_env = {"LD_PRELOAD": shim, "AIBUTLER_BENCH_FSYNC_MS": str(args.checkpoint_fsync_ms)}
        probe = efficiency.sync_times(os.path.join(folder, "probe"),
                                      dict(os.environ, **slow_env))
        runs["probe"] = {"fsync_ms": probe[0], "commit_ms": probe[1]}
        runs["sd"] = run_disk(folder, "sd", slow_env, args)
        print(f"checkpoints, {args.checkpoint_fsync_ms:g} ms fsync: " + one_line(runs["sd"]),
              flush=True)
    return runs


def one_line(r):
    return (f"{r['turns']} turns in {r['seconds']:.1f} s, p50 {r['p50']:.1f} ms, p99 "
            f"{r['p99']:.1f} ms, max {r['max']:.1f} ms, {r['over_40']} over 40 ms, "
            f"{r['over_100']} over 100 ms; WAL "
            f"~{r['wal_frames']} frames written, most at once {r['wal_most']}, "
            f"~{r['checkpoints']} checkpoints, {r['wal_restarts']} restarts")


def report(runs, args, measured):
    lines = ["### Sync turns that write, and the WAL's checkpoints", "",
             f"{measured}. Sync daemon (builtin agent, rate limits off, all cores); each turn "
             f"is \"remember that my note N is ...\" ({args.fact_bytes} characters of fact) "
             f"from one of {args.checkpoint_users} user_ids, {args.checkpoint_senders} "
             "keep-alive connections each sending its next turn when the last is answered"
             + (f" and it is due ({args.checkpoint_rate:g} turns/s in all), "
                if args.checkpoint_rate else " (as fast as they are answered), ")
             + f"{args.checkpoint_turns} turns (at most {args.checkpoint_seconds} s). Latency: "
             "send to last byte. WAL figures sampled from the -shm header every "
             f"{SAMPLE_EVERY * 1000:g} ms (about).", ""]
    if "probe" in runs:
        lines += [f"Shim: {args.checkpoint_fsync_ms:g} ms before each fsync()/fdatasync() "
                  f"(checked in a child: one os.fsync {runs['probe']['fsync_ms']:.1f} ms, one "
                  f"synchronous=FULL sqlite commit {runs['probe']['commit_ms']:.1f} ms).", ""]
    lines += ["| disk | turns | turns/s | p50 ms | p99 ms | max ms | turns > 40 ms | "
              "turns > 100 ms | "
              "other answers | WAL frames written | most frames at once (MB) | checkpoints seen | "
              "WAL restarts |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    names = {"fast": "this machine's disk",
             "sd": f"SD card ({args.checkpoint_fsync_ms:g} ms fsync shim)"}
    for key, name in names.items():
        if key not in runs:
            lines.append(f"| {name} | skipped (no C compiler for the shim) |||||||||||||")
            continue
        r = runs[key]
        others = [f"{n}× {code}" for code, n in sorted(r["statuses"].items()) if code != 200]
        if r["dropped"]:
            others.append(f"{r['dropped']} dropped")
        lines.append(f"| {name} | {r['turns']} | {r['turns'] / r['seconds']:.0f} | "
                     f"{r['p50']:.1f} | **{r['p99']:.1f}** | {r['max']:.1f} | {r['over_40']} | "
                     f"{r['over_100']} | "
                     f"{', '.join(others) or 'none'} | ~{r['wal_frames']} | {r['wal_most']} "
                     f"({r['wal_most'] * PAGE / 2**20:.0f}) | ~{r['checkpoints']} | "
                     f"{r['wal_restarts']} |")
    lines.append("")
    return lines
