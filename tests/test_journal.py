"""Writing behind: the history journal (HistoryJournal), where a turn's exchange
waits for its move into sqlite (a killed process loses none, none is moved twice),
and the requests' log lines, written in batches."""

import io
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap

import aibutler
from conftest import ROOT, ok, openai_text


def run_then_kill(db_path, body):
    """Run `body` in a child with a Store that keeps a journal whose writer never
    moves on its own; the child then kills itself with SIGKILL."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import aibutler
        store = aibutler.Store({str(db_path)!r})
        store.keep_history_journal(flush_after=3600)
        user = store.resolve_session("u", None, 3600)
    """) + textwrap.dedent(body) + "\nos.kill(os.getpid(), signal.SIGKILL)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == -signal.SIGKILL, result.stderr


def messages_in_sqlite(db_path):
    with sqlite3.connect(db_path) as db:
        return [tuple(row) for row in db.execute("SELECT role, content FROM messages ORDER BY id")]


def reopened(db_path):
    store = aibutler.Store(str(db_path))
    recovered = store.keep_history_journal()
    return store, recovered


def the_session(store):
    return store.resolve_session("u", None, 3600)


def test_exchanges_written_behind_survive_kill_9_and_are_moved_once(tmp_path):
    db_path = tmp_path / "aibutler.db"
    run_then_kill(db_path, """
        store.record_exchange(user, "u", "first", "reply one", 20)
        store.record_exchange(user, "u", "second", "reply two", 20)
    """)
    assert messages_in_sqlite(db_path) == []  # only the journal had them
    store, recovered = reopened(db_path)
    assert recovered == 2
    expected = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply one"},
                {"role": "user", "content": "second"}, {"role": "assistant", "content": "reply two"}]
    assert store.history(the_session(store), 20) == expected
    store.close()
    store, recovered = reopened(db_path)
    assert recovered == 0 and store.history(the_session(store), 20) == expected
    store.close()


def test_a_process_killed_right_after_a_move_moves_nothing_twice(tmp_path):
    """Killed between the move's commit and the file starting over: the file
    still holds the moved exchanges, and sqlite says they are moved."""
    db_path = tmp_path / "aibutler.db"
    run_then_kill(db_path, """
        store.record_exchange(user, "u", "first", "reply one", 20)
        aibutler.HistoryJournal._start_over = lambda self: os.kill(os.getpid(), signal.SIGKILL)
        store.journal.move()
    """)
    assert len(messages_in_sqlite(db_path)) == 2
    store, recovered = reopened(db_path)
    assert recovered == 0
    assert [m["content"] for m in store.history(the_session(store), 20)] == ["first", "reply one"]
    store.close()


def test_a_partial_exchange_is_left_out_and_the_rest_is_moved(tmp_path):
    db_path = tmp_path / "aibutler.db"
    run_then_kill(db_path, """
        store.record_exchange(user, "u", "first", "reply one", 20)
        journal = store.journal
        torn = b'["' + user.encode() + b'", "u", "second", "rep'  # killed while copying
        journal._map[journal._end:journal._end + len(torn)] = torn
    """)
    store, recovered = reopened(db_path)
    assert recovered == 1
    assert [m["content"] for m in store.history(the_session(store), 20)] == ["first", "reply one"]
    store.close()


def test_history_and_the_current_session_include_what_is_not_moved_yet(tmp_path):
    store = aibutler.Store(str(tmp_path / "aibutler.db"))
    store.keep_history_journal(flush_after=3600)
    first = the_session(store)
    store.record_exchange(first, "u", "hello", "hi there", 3)
    assert messages_in_sqlite(tmp_path / "aibutler.db") == []
    store._current.clear()  # as if the user was forgotten: the journal still knows
    assert the_session(store) == first
    assert [m["content"] for m in store.history(first, 3)] == ["hello", "hi there"]
    store.record_exchange(first, "u", "again", "hi again", 3)
    # The newest 3 messages, from the first user message among them.
    assert [m["content"] for m in store.history(first, 3)] == ["again", "hi again"]
    store.close()  # moves them
    assert [content for _, content in messages_in_sqlite(tmp_path / "aibutler.db")] == \
        ["hello", "hi there", "again", "hi again"][-3:]


def test_a_full_journal_is_moved_by_the_turn_that_fills_it(tmp_path, monkeypatch):
    monkeypatch.setattr(aibutler.HistoryJournal, "CAPACITY", 4096)
    store = aibutler.Store(str(tmp_path / "aibutler.db"))
    store.keep_history_journal(flush_after=3600)
    session = the_session(store)
    for index in range(120):  # about 80 bytes each: the file fills twice
        store.record_exchange(session, "u", f"message {index}", f"reply {index}", 100)
    assert len(messages_in_sqlite(tmp_path / "aibutler.db")) >= 100
    big = "x" * 5000  # larger than the file: committed directly
    store.record_exchange(session, "u", big, "ok", 100)
    history = store.history(session, 100)
    assert [m["content"] for m in history][-4:] == ["message 119", "reply 119", big, "ok"]
    store.close()


def test_sync_history_survives_kill_9_of_the_daemon(daemon, receiver):
    model = receiver([ok(openai_text("nice to meet you, Ada")), ok(openai_text("you are Ada"))])
    config = f"[agent]\nprovider = openai\nbase_url = {model.url}\n"
    d = daemon(config).start()
    status, _, body = d.post({"user_id": "ada", "message": "my name is Ada"})
    assert status == 200 and body["reply"] == "nice to meet you, Ada"
    d.kill()  # the reply went out; the exchange may be only in the journal
    d.start()
    status, _, body = d.post({"user_id": "ada", "message": "who am I?"})
    assert status == 200
    sent = [(m["role"], m["content"]) for m in model.wait_for(2)[1]["json"]["messages"]]
    assert sent[1:3] == [("user", "my name is Ada"), ("assistant", "nice to meet you, Ada")]
    assert d.stop() == 0


def test_the_daemon_keeps_a_full_size_journal_that_starts_over_once_moved(daemon):
    d = daemon().start()
    assert d.post({"user_id": "u", "message": "hi"})[0] == 200
    journal = d.data / "aibutler.db-history"
    assert journal.stat().st_size == aibutler.HistoryJournal.CAPACITY
    assert d.stop() == 0
    header = journal.read_bytes().split(b"\n", 1)[0]
    assert json.loads(header)["generation"]  # everything moved: the file started over


def test_requests_log_lines_are_held_briefly_and_every_other_line_keeps_the_order():
    stream = io.StringIO()
    handler = aibutler.BatchedLogHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.Logger("batched")
    logger.addHandler(handler)
    logger.info("POST /webhook/custom 200 1.0ms", extra=aibutler.ACCESS_LINE)
    assert stream.getvalue() == ""  # held: written with the lines that follow it
    logger.warning("delivery failed")
    assert stream.getvalue() == "INFO POST /webhook/custom 200 1.0ms\nWARNING delivery failed\n"
    logger.info("GET /healthz 200 0.1ms", extra=aibutler.ACCESS_LINE)
    handler.flush()  # what logging.shutdown does at exit
    assert stream.getvalue().endswith("INFO GET /healthz 200 0.1ms\n")
