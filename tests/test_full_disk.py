"""A full disk, through the real daemon on a real small filesystem (a tmpfs and a
loop-mounted ext4) filled to the last byte while async senders post and
callbacks are due: nothing acknowledged is lost, refused POSTs are 503s that
say why, /readyz says storage: false for as long as writes fail (no flapping),
the worker and dispatcher threads live on and back off instead of retrying
every 10 ms, and once space is freed everything resumes within seconds."""

import collections
import contextlib
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import time

import pytest

import aibutler
from conftest import SECRET, gauge, ok, openai_text, until

AS_ROOT_WITH_MOUNT = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("mount"),
    reason="needs root and mount(8), as CI has")

FULL_FOR = 4.0  # seconds the disk stays full once the first write failed
# Far fewer than one line per 10 ms (400 in FULL_FOR) per dispatcher: it backs off.
MOST_DISPATCHER_FAILURES = 30
# Retries every 100 ms, far more of them than the test can use up: a callback
# stays due the whole time the disk is full and is never given up on.
SCHEDULE = ", ".join(["100ms"] * 300)
FAILED_WRITE = re.compile(r"cannot write the database|storage: (?!checkpoint)")
DISPATCHER_FAILED = re.compile(r"dispatcher(-\d+)?: (still )?cannot write the database")
QUIET = re.compile(r"POST /webhook/custom 503|storage: the disk is full|GET /readyz 503")
STORAGE_PROBLEMS = ("the disk is full", "the database is read-only", "a disk I/O error",
                    "the database cannot be written")


@contextlib.contextmanager
def small_filesystem(kind, mount_point, image):
    """A tmpfs of 4 MiB, or an ext4 of 8 MiB (about 6 MiB free, none reserved
    for root), mounted at mount_point; unmounted afterwards."""
    mount_point.mkdir()
    if kind == "tmpfs":
        command = ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)]
    else:
        if not shutil.which("mkfs.ext4"):
            pytest.skip("mkfs.ext4 is not installed")
        subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True,
                       capture_output=True)
        command = ["mount", "-o", "loop", str(image), str(mount_point)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a {kind} here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(disk):
    """Write a filler file until not one more byte fits; returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):  # ENOSPC: the next, smaller size
                while True:
                    os.write(fd, b"\0" * size)
        with pytest.raises(OSError):
            os.write(fd, b"\0")
    finally:
        os.close(fd)
    return filler


class Senders:
    """A thread posting messages one after another (a few KiB each, so the
    database must grow) until stopped; keeps every answer."""

    def __init__(self, d, prefix, pause=0.02):
        self.d, self.prefix, self.pause = d, prefix, pause
        self.answers = []  # (status, headers, body)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        i = 0
        while not self.stopping.is_set():
            try:
                answer = self.d.post({"user_id": f"{self.prefix}{i % 20}",
                                      "message": f"note {i}: " + "x" * 3000}, timeout=10)
            except OSError as exc:  # the daemon is gone: the test says so, with its log
                answer = (repr(exc), {}, None)
            self.answers.append(answer)
            i += 1
            self.stopping.wait(self.pause)

    def stop(self):
        self.stopping.set()
        self.thread.join(15)
        assert not self.thread.is_alive()
        return self.answers


def readiness(d):
    status, _, body = d.get("/readyz")
    return status, body["checks"]


@AS_ROOT_WITH_MOUNT
@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_a_full_disk_loses_nothing_keeps_threads_alive_and_heals(kind, daemon, receiver,
                                                                 tmp_path):
    thinking = threading.Event()  # the "slow" turns finish only once writes fail

    def model_answer(request):
        text = request["json"]["messages"][-1]["content"]
        if text.startswith("slow"):
            thinking.wait(30)
        return ok(openai_text(f"done with {text[:12]}"))
    model = receiver([model_answer])

    freed = threading.Event()  # the receiver takes callbacks only once space is freed

    def callback_answer(request):
        request["status"] = 200 if freed.is_set() else 500
        return (request["status"], {}, b"", 0)
    callbacks = receiver([callback_answer])

    folder = tmp_path / "d"
    with small_filesystem(kind, tmp_path / "disk", tmp_path / "ext4.img") as disk:
        d = daemon(f"[channels.webhook]\noutbound_url = {callbacks.url}\n"
                   f"[delivery]\nretry_schedule = {SCHEDULE}\n"
                   "[limits]\nrate = 0\nuser_rate = 0\n"
                   f"[agent]\nprovider = openai\nbase_url = {model.url}\ntimeout = 20s\n",
                   env={"AIBUTLER_DATA": str(disk / "data")}, secret=None, folder=folder)
        d.data, d.secret = disk / "data", SECRET
        d.vault.set("webhook_auth_secret", SECRET)
        senders = None
        try:
            d.start()
            accepted = []
            # Callbacks due: their receiver answers 500, they are retried every 100 ms.
            for i in range(3):
                status, _, body = d.post({"user_id": f"early{i}", "message": f"early {i}"})
                assert status == 202
                accepted.append(body["message_id"])
            until(lambda: len({r["json"]["message_id"] for r in callbacks.requests}) == 3)
            # Turns in flight when the disk fills: their results cannot be written.
            for i in range(2):
                status, _, body = d.post({"user_id": f"slow{i}", "message": f"slow {i}"})
                assert status == 202
                accepted.append(body["message_id"])
            until(lambda: sum(r["json"]["messages"][-1]["content"].startswith("slow")
                              for r in model.requests) == 2)

            filler = fill(disk)
            senders = Senders(d, f"{kind}-sender-")
            match = d.wait_log(FAILED_WRITE, what="no write failed on the full disk")
            full_since = time.monotonic()
            first_failure = len(d.log_lines)
            # From the first failed write on, /readyz says so.
            status, checks = readiness(d)
            assert status == 503 and checks["storage"] is False, (match.group(0), checks)
            thinking.set()  # the slow turns end, and cannot record their results
            d.wait_log(r"turn-worker-\d+: cannot write the database \(the disk is full\)",
                       what="the stranded turns did not fail to write")

            # Full for FULL_FOR seconds with callbacks due: never ready, threads alive.
            samples = []
            while time.monotonic() - full_since < FULL_FOR:
                samples.append(readiness(d))
                time.sleep(0.3)
            window = [line for line in d.log_lines[first_failure:] if line]
            answers = senders.stop()
            assert len(samples) >= 6  # sampled all along, slow machine or not
            assert all(status == 503 and checks["storage"] is False
                       for status, checks in samples), samples
            assert all(checks["workers"] and checks["dispatchers"]
                       for _, checks in samples), samples
            # Callbacks were due all along: of the three, at most one per dispatcher is
            # 'sending' (caught by the fill between its claim and its outcome).
            assert gauge(d, "aibutler_deliveries_pending") >= 1

            dispatcher_failures = [line for line in window if DISPATCHER_FAILED.search(line)]
            assert 1 <= len(dispatcher_failures) < MOST_DISPATCHER_FAILURES, \
                "".join(dispatcher_failures)
            assert not re.search(r"unexpected error|Traceback", d.log), d.log

            # Refused POSTs: 503 in the error shape, with Retry-After, saying why.
            statuses = collections.Counter(status for status, _, _ in answers)
            assert set(statuses) <= {202, 503}, statuses
            refused = [(headers, body) for status, headers, body in answers if status == 503]
            assert refused, statuses
            for headers, body in refused:
                assert int(headers["Retry-After"]) > 0
                error = body["error"]
                assert error["status"] == 503 and error["title"] == "Service Unavailable"
                assert any(problem in error["description"] for problem in STORAGE_PROBLEMS), \
                    error
            assert any("disk is full" in body["error"]["description"] for _, body in refused)
            maybe_stored = sum("may not have been stored" in body["error"]["description"]
                               for _, body in refused)
            accepted += [body["message_id"] for status, _, body in answers if status == 202]

            # Space freed: within seconds ready again, stranded work resumes, 202s again.
            filler.unlink()
            freed.set()
            freed_at = time.monotonic()
            until(lambda: readiness(d)[1]["storage"] is True, timeout=15)
            storage_back = time.monotonic() - freed_at
            until(lambda: d.get("/readyz")[0] == 200, timeout=15)
            for i in range(2):
                status, _, body = d.post({"user_id": f"late{i}", "message": f"late {i}"})
                assert status == 202, body
                accepted.append(body["message_id"])

            def delivered():
                return collections.Counter(r["json"]["message_id"] for r in callbacks.requests
                                           if r.get("status") == 200)
            until(lambda: set(accepted) <= set(delivered()), timeout=15)
            all_back = time.monotonic() - freed_at
            d.wait_log(r"turn-worker: \d+ item\(s\) back in line after a failed write")
            for message_id in accepted[3:5]:  # the stranded turns ran again
                d.wait_log(rf"delivery {message_id}: delivered")
            assert d.stop() == 0
            # Each 202 exactly once; another message only if a 503 said it may be stored.
            arrived = delivered()
            assert all(arrived[message_id] == 1 for message_id in accepted), arrived
            assert len(set(arrived) - set(accepted)) <= maybe_stored, (arrived, accepted)
            assert max(arrived.values()) == 1, arrived
            print(f"{kind}: full for {FULL_FOR:.0f}s: {dict(statuses)} POSTs, "
                  f"{len(dispatcher_failures)} dispatcher failures logged; storage back "
                  f"{storage_back:.1f}s and every callback {all_back:.1f}s after freeing")
        except BaseException:
            if d.proc and d.proc.poll() is not None:
                print(f"the daemon exited with {d.proc.returncode}")
            print("the daemon's log, without its POST 503s and readiness checks:\n" + "".join(
                line for line in d.log_lines if line and not QUIET.search(line)))
            raise
        finally:
            if senders is not None:
                senders.stopping.set()
            if d.proc and d.proc.poll() is None:
                d.kill()


def test_failures_past_the_old_overflow_neither_kill_nor_hurry_a_worker_loop(caplog):
    """1,025 failures in a row overflowed `1.0 * 2 ** failures` and killed the
    thread; the daemon's back-off makes that many take hours, so the count
    starts past it here (and the back-off is milliseconds). Every failure, a
    full disk or a bug, is logged, and the loop goes on at the capped back-off."""
    class Failing(aibutler.WorkerPool):
        RESCUE_FIRST, RESCUE_MAX = 0.01, 0.04

        def __init__(self):
            super().__init__("failing", 1)
            self.rounds = []

        def work(self):
            self.rounds.append(time.monotonic())
            if len(self.rounds) % 2:
                raise sqlite3.OperationalError("database or disk is full")
            raise RuntimeError("a bug in a round")

        def rescue(self, held):
            return 0

    pool = Failing()
    pool._failures_in_a_row = 5000
    caplog.set_level(logging.INFO, logger="aibutler")
    pool.start()
    try:
        until(lambda: len(pool.rounds) >= 12, timeout=5)
        assert pool.healthy(60)
    finally:
        pool.stop(time.monotonic() + 5)
    gaps = [later - earlier for earlier, later in zip(pool.rounds, pool.rounds[1:])]
    assert min(gaps) >= 0.03, gaps  # the capped back-off, not a tight loop
    messages = [record.getMessage() for record in caplog.records]
    assert any("cannot write the database (the disk is full)" in m for m in messages)
    assert any(m.endswith("unexpected error") for m in messages), messages
