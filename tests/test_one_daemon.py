"""Fewer moving parts (issue 21), through the real daemon: one daemon per data
directory, a turn's exchange recorded once whatever is killed when, ids that
come from the system's CSPRNG, each channel's messages its own, checkpoints
off the request path and the one sqlite connection group commit relies on."""

import json
import os
import re
import sqlite3
import threading

import aibutler
from conftest import SECRET, Recorder, held, in_background, ok, openai_text, until


def model_config(model, extra=""):
    return (f"[agent]\nprovider = openai\nbase_url = {model.url}\n"
            f"[limits]\nrate = 0\nuser_rate = 0\n{extra}")


def history(d):
    """Every (session_id, role, content) in the daemon's database, oldest first."""
    with sqlite3.connect(d.data / "aibutler.db") as db:
        return db.execute("SELECT session_id, role, content FROM messages ORDER BY id").fetchall()


def test_a_second_run_on_the_same_data_directory_stops_at_once_and_touches_nothing(daemon):
    d = daemon("[limits]\nrate = 0\nuser_rate = 0\n").start()
    lock = d.data / "aibutler.lock"
    assert lock.read_text().strip() == str(d.proc.pid)
    stop = threading.Event()
    answers = []

    def load():  # a sender keeps posting while the second daemon tries its luck
        n = 0
        while not stop.is_set():
            answers.append(d.post({"user_id": f"busy{n}", "message": f"what is {n} + 1?"})[0])
            n += 1
    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    until(lambda: len(answers) >= 5)
    files = {p.name: p.stat().st_ino for p in d.data.iterdir()}
    second = d.cli("run", "--config", str(d.config), "--port", "0", check=False)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and str(d.data) in lines[0] and f"PID {d.proc.pid}" in lines[0]
    answered = len(answers)
    until(lambda: len(answers) >= answered + 5)  # the first daemon goes on serving
    stop.set()
    sender.join(30)
    assert set(answers) == {200}
    assert {p.name: p.stat().st_ino for p in d.data.iterdir()
            if p.name in files} == files  # nothing replaced or truncated
    assert lock.read_text().strip() == str(d.proc.pid)
    assert d.cli("vault", "list").returncode == 0  # the CLI works beside a running daemon
    assert d.cli("deliveries", "list").returncode == 0
    assert d.stop() == 0
    assert len(history(d)) == 2 * len(answers)  # every answered exchange, once


def posted_until_killed(d, body, headers):
    """A POST whose daemon is killed before it answers."""
    try:
        return d.post(body, headers, timeout=60)
    except OSError as exc:  # the connection ends without an answer
        return exc


class ClosingRecorder(Recorder):
    """A fake model that counts the connections it has answered and closed: a
    reply counted here has wholly reached the daemon."""

    def __init__(self, script=None):
        self.closed = 0
        super().__init__(script)

    def shutdown_request(self, request):
        super().shutdown_request(request)
        with self.lock:
            self.closed += 1
            self.arrived.notify_all()


def test_a_sync_retry_after_a_kill_between_the_reply_and_its_key_records_the_exchange_once(
        daemon, receiver):
    gate = threading.Event()
    model = receiver(kind=ClosingRecorder, script=None)
    model.script = [held(ok(openai_text("first reply")), gate), ok(openai_text("second reply"))]
    d = daemon(model_config(model)).start()
    key = {"Idempotency-Key": "order-1"}
    body = {"user_id": "ana", "message": "book a table"}
    in_background(lambda: posted_until_killed(d, body, key))
    model.wait_for(1)
    blocker = sqlite3.connect(d.data / "aibutler.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the daemon's next write waits behind this
    gate.set()
    until(lambda: model.closed == 1)  # the reply is the daemon's; nothing can commit it
    d.kill()
    blocker.execute("ROLLBACK")
    blocker.close()
    d.start()
    status, _, answer = d.post(body, key)
    assert (status, answer["reply"]) == (200, "second reply")
    assert [m[1:] for m in history(d)] == [("user", "book a table"),
                                           ("assistant", "second reply")]
    assert d.post(body, key)[2]["reply"] == "second reply"  # and the key holds it now
    assert len(history(d)) == 2
    assert d.stop() == 0


def test_an_async_turn_killed_at_any_point_is_recorded_once(daemon, receiver):
    callbacks = receiver()
    gate = threading.Event()
    model = receiver(kind=ClosingRecorder, script=None)
    model.script = [held(ok(openai_text("never seen")), gate),      # killed mid-call
                    held(ok(openai_text("not committed")), gate),   # killed before commit
                    ok(openai_text("the answer"))]
    d = daemon(model_config(model, f"[channels.webhook]\noutbound_url = {callbacks.url}\n"
                                   "[delivery]\nretry_schedule = 100ms, 100ms\n")).start()
    accepted = d.post({"user_id": "bo", "message": "plan my day"})[2]
    model.wait_for(1)
    d.kill()  # during the model call
    d.start()
    model.wait_for(2)
    blocker = sqlite3.connect(d.data / "aibutler.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    gate.set()
    until(lambda: model.closed >= 2)  # the reply is in, its commit waits
    d.kill()
    blocker.execute("ROLLBACK")
    blocker.close()
    d.start()
    callbacks.wait_for(1)
    assert callbacks.requests[0]["json"]["reply"] == "the answer"
    assert callbacks.requests[0]["json"]["message_id"] == accepted["message_id"]
    assert [m[1:] for m in history(d)] == [("user", "plan my day"),
                                           ("assistant", "the answer")]
    assert d.stop() == 0
    assert len(callbacks.requests) == 1


def test_ids_come_from_the_systems_csprng_not_the_random_module(app_for, monkeypatch):
    """A holder of the secret who saw many ids must not predict the next: no id
    may depend on the random module's state (a Mersenne Twister)."""
    monkeypatch.setattr(aibutler, "random", None)  # any use of it fails the request
    client = app_for()
    ids = set()
    for n in range(20):
        sync = client.simulate_post("/webhook/custom", json={"user_id": f"u{n}", "message": "hi"},
                                    headers={"X-Aibutler-Secret": SECRET})
        queued = client.simulate_post("/webhook/custom", json={"user_id": f"u{n}",
                                                               "message": "hi"},
                                      headers={"X-Aibutler-Secret": SECRET,
                                               "Prefer": "respond-async"})
        assert (sync.status_code, queued.status_code) == (200, 202)
        ids.update([sync.json["session_id"], queued.json["message_id"]])
    assert all(re.fullmatch(r"(sess|msg)-[0-9a-f]{20}", i) for i in ids)
    assert len(ids) == 40  # a session per user, a message id per message: none repeated


def test_the_status_route_answers_only_for_its_own_channels_messages(daemon, receiver):
    from test_twilio import TOKEN, post, sms, twilio_config
    model = receiver([ok(openai_text("hi texter"))])
    d = daemon(twilio_config(model, twilio="reply_wait = 5s\n"))
    d.vault.set("twilio_auth_token", TOKEN)
    d.start()
    assert post(d, sms("my door code is 2580"))[0] == 200
    with sqlite3.connect(d.data / "aibutler.db") as db:
        (texted,) = db.execute("SELECT message_id FROM jobs WHERE channel='twilio'").fetchone()
    secret = {"X-Aibutler-Secret": SECRET}
    status, _, body = d.get(f"/webhook/custom/messages/{texted}", secret)
    assert status == 404 and "2580" not in json.dumps(body) and "+34600111222" not in str(body)
    own = d.post({"user_id": "web", "message": "hello"}, {"Prefer": "respond-async"})[2]
    assert d.get(f"/webhook/custom/messages/{own['message_id']}", secret)[0] == 200
    assert d.stop() == 0


def test_checkpoints_run_in_their_own_thread_and_the_wal_stays_the_daemons_one(
        tmp_path, monkeypatch):
    """Group commit fsyncs the WAL through a descriptor opened at start: that is
    only right while the store keeps its one connection (the last to close
    deletes the WAL, and a new one would make another file). Commits never
    checkpoint themselves (a checkpoint fsyncs the database: tens of ms on an
    SD card); the Checkpointer copies the WAL into the database meanwhile."""
    monkeypatch.setattr(aibutler.Checkpointer, "EVERY", 0.05)
    connections = []

    class CountingStore(aibutler.Store):
        def _connect(self):
            connections.append(threading.current_thread().name)
            return super()._connect()
    path = str(tmp_path / "aibutler.db")
    store = CountingStore(path)
    try:
        store.checkpoint_in_background()
        with store.connection() as db:
            assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        size = os.path.getsize(path)

        def write(n):
            for i in range(50):
                store.remember(f"user{n}", "x" * 2000 + str(i))
        writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join(30)
        until(lambda: os.path.getsize(path) > size + 200 * 2000)  # copied by the checkpointer
        wal = os.fstat(store._wal)
        assert (wal.st_ino, wal.st_nlink) == (os.stat(path + "-wal").st_ino, 1)
        assert len(connections) == 1  # one connection, whatever the threads
    finally:
        store.close()
    assert not os.path.exists(path + "-wal")  # the last connection's close removed it
