"""Writing behind: the history journal (HistoryJournal), where a turn's exchange
waits for its move into sqlite (a killed process loses none, none is moved twice);
the sessions' newest messages kept in memory (HistoryWindow); and the requests'
log lines, written in batches and without a LogRecord."""

import datetime
import io
import json
import logging
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

import aibutler
from conftest import ROOT, ok, openai_text
from test_hardening import eventually


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


def contents(history):
    return [message["content"] for message in history]


def kept_bytes(store):
    """What the kept windows take, counted afresh: the store's own count must agree."""
    counted = sum(aibutler.HistoryWindow(w.size, list(w.messages)).bytes
                  for w in store._windows.values())
    assert store._windows_bytes == counted
    return counted


def test_history_kept_in_memory_stays_exact_within_its_budget(tmp_path):
    store = aibutler.Store(str(tmp_path / "aibutler.db"))
    store.keep_history_journal(flush_after=3600)
    store.HISTORY_KEPT_BYTES = 4000  # a few sessions: the others are dropped and read again
    sessions = [store.resolve_session(f"u{n}", None, 3600) for n in range(8)]
    for turn in range(6):
        if turn == 3:
            store.journal.move()  # half of it from sqlite, half from the journal
        for n, session in enumerate(sessions):
            said = [text for t in range(turn) for text in (f"m{n}.{t}", f"r{n}.{t}")]
            assert contents(store.history(session, 4)) == said[-4:]
            store.record_exchange(session, f"u{n}", f"m{n}.{turn}", f"r{n}.{turn}", 4)
            assert 0 < kept_bytes(store) <= store.HISTORY_KEPT_BYTES
    assert len(store._windows) < len(sessions)
    # a longer history than the one kept is read again (max_history raised by a reload)
    assert contents(store.history(sessions[0], 3)) == ["m0.5", "r0.5"]
    assert contents(store.history(sessions[0], 6)) == ["m0.3", "r0.3", "m0.4", "r0.4",
                                                       "m0.5", "r0.5"]
    kept_bytes(store)
    # one session of huge messages is read from sqlite, not kept: it would push out the rest
    store.record_exchange(sessions[1], "u1", "x" * 2000, "a long one", 4)
    assert contents(store.history(sessions[1], 4))[-2:] == ["x" * 2000, "a long one"]
    assert sessions[1] not in store._windows and sessions[0] in store._windows
    kept_bytes(store)
    store.close()


def test_history_after_max_history_is_lowered_then_raised_is_what_sqlite_keeps(tmp_path):
    """[sessions] max_history 20 -> 2 -> 20 by reloads: the database was trimmed in
    between (by a turn, or by the daily prune), and memory must not remember more."""
    store = aibutler.Store(str(tmp_path / "aibutler.db"))
    store.keep_history_journal(flush_after=3600)
    talked, idle = (store.resolve_session(user, None, 3600) for user in ("talked", "idle"))
    for session, user in ((talked, "talked"), (idle, "idle")):
        for turn in range(5):
            store.record_exchange(session, user, f"m{turn}", f"r{turn}", 20)
        assert len(store.history(session, 20)) == 10  # both kept in memory, 10 messages
    # a turn that read its history before the reload and records after it
    store.record_exchange(talked, "talked", "m5", "r5", 2)  # trimmed to 2 when moved
    store.journal.move()
    assert contents(store.history(talked, 20)) == ["m5", "r5"]
    store.prune(86400, 2)  # trims the idle session
    assert contents(store.history(idle, 20)) == ["m4", "r4"]
    kept_bytes(store)
    store.close()


def waiting_in(thread, function):
    """The thread's innermost Python frame is `function`: it waits in a C call (a lock)."""
    frame = sys._current_frames().get(thread.ident)
    return frame is not None and frame.f_code.co_name == function


def test_an_exchange_recorded_while_its_session_is_read_is_in_its_history_once(tmp_path):
    store = aibutler.Store(str(tmp_path / "aibutler.db"))
    store.keep_history_journal(flush_after=3600)
    session = the_session(store)
    store.record_exchange(session, "u", "first", "one", 20)
    reading, go_on = threading.Event(), threading.Event()
    read = store._read

    def paused_read(*query):
        reading.set()
        go_on.wait(10)
        return read(*query)

    store._read = paused_read
    reader = threading.Thread(target=store.history, args=(session, 20))
    reader.start()
    assert reading.wait(10)  # the reader has what the journal holds, not yet sqlite's
    writer = threading.Thread(target=store.record_exchange,
                              args=(session, "u", "second", "two", 20))
    writer.start()
    eventually(lambda: not writer.is_alive() or waiting_in(writer, "record_exchange"),
               every=0.001)
    go_on.set()
    reader.join(10)
    writer.join(10)
    del store._read
    assert contents(store.history(session, 20)) == ["first", "one", "second", "two"]
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


@pytest.mark.parametrize("journal", [False, True])
def test_a_request_line_made_without_a_log_record_reads_as_logging_writes_it(journal):
    stream = io.StringIO()
    handler = aibutler.BatchedLogHandler(stream)
    handler.setFormatter(aibutler.LogFormatter(journal=journal))
    text = "GET /nope\n2026-01-01 00:00:00,000 ERROR 200 1.0ms"
    level = aibutler.log.level
    try:
        aibutler.log.setLevel(logging.WARNING)  # [server] log_level = warning: no request lines
        handler.access_line(text)
        handler.flush()
        assert stream.getvalue() == ""
        aibutler.log.setLevel(logging.INFO)
        handler.access_line(text)
        assert stream.getvalue() == ""  # held, as logging's request lines are
        handler.flush()
    finally:
        aibutler.log.setLevel(level)
    record = aibutler.log.makeRecord("aibutler", logging.INFO, __file__, 1, "%s", (text,), None)
    stamp = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) "
    line, expected = stream.getvalue(), handler.format(record) + "\n"
    if not journal:  # the same clock and format as a LogRecord's, to the millisecond
        made = datetime.datetime.strptime("%s.%s" % re.match(stamp, line).groups(),
                                          "%Y-%m-%d %H:%M:%S.%f").timestamp()
        assert made <= record.created < made + 1  # made first, to the ms: within a second
        assert re.match(stamp, expected)
        line, expected = re.sub(stamp, "", line, count=1), re.sub(stamp, "", expected, count=1)
    assert line == expected and "\\n2026" in line and line.count("\n") == 1
