#!/usr/bin/env python3
"""Make the fixture of tests/test_upgrade.py: a data directory left by the
daemon of commit 17e1de6 (the last to write history behind, through the
memory-mapped journal <data>/aibutler.db-history) when it was killed with
SIGKILL while its journal still held exchanges sqlite did not have.

Today's code is taken from git (`git show 17e1de6:aibutler.py`), not from the
working tree, and runs in a child process that records exchanges through the
real Store, moves the journal once midway, records more, then kills itself
(kill -9: no clean close, nothing moved on the way out). The files it leaves
are copied as they are into

    tests/data/journal-upgrade/           the move midway emptied the journal, so
                                          the file started over under a new
                                          generation: every line in it is unmoved,
                                          and history_journal names the old one
    tests/data/journal-upgrade-mid-move/  an exchange was appended while the move
                                          ran, so the file did not start over: its
                                          first exchanges are moved (history_journal
                                          has its generation and the offset moved
                                          to), the rest are not

each with aibutler.db, aibutler.db-wal (the commits not checkpointed: without
it the database lacks the moved exchanges), aibutler.db-history.gz (the 1 MiB
journal, mostly zeros), any large file gzipped too, and expected.json: per user,
the session and the exact messages its history must hold once the journal is
imported (everything recorded, moved or not, each once, in order; trimmed to
the newest max_history messages as the old code trims), with the time each
was said.

The expectation is checked against the old code itself: a scratch copy is
opened by the 17e1de6 Store, which recovers the journal, and must hold exactly
the expected messages. Run from anywhere: python3 tests/data/make_journal_fixture.py
"""

import gzip
import json
import pathlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap

COMMIT = "17e1de6"
HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VARIANTS = {"journal-upgrade": "plain", "journal-upgrade-mid-move": "mid-move"}
GZIP_ABOVE = 16 << 10  # bytes: a file larger than this is stored gzipped
PHONE = "+34600111222"
BIG, SMALL = 20, 4  # max_history: nothing trimmed / older messages trimmed

# (user, max_history, user_text, reply), in the order recorded. Texts are unique
# (a duplicate in the history is then a message imported twice) and carry what
# the journal's JSON escapes: quotes, a newline, non-ASCII, an emoji.
BEFORE_MOVE = [
    ("ada", BIG, "Hi, I'm Ada", "Nice to meet you, Ada!"),
    (PHONE, BIG, "Hola, ¿qué tiempo hace en Madrid?", "Soleado, 24 °C ☀️"),
    ("trimmed", SMALL, "t1: first", "r1: first reply"),
    ("ada", BIG, "Remind me: the \"blue\" key opens the shed", "Noted: the \"blue\" key."),
    ("trimmed", SMALL, "t2: second", "r2: second reply"),
    (PHONE, BIG, "¿Y mañana?", "Mañana:\n- nubes por la mañana\n- lluvia 🌧 por la tarde"),
    ("trimmed", SMALL, "t3: third", "r3: third reply"),
    ("ada", BIG, "What's 2+2?", "4"),
    ("trimmed", SMALL, "t4: fourth", "r4: fourth reply"),
]
DURING_MOVE = (PHONE, BIG, "Gracias 🙏", "¡De nada!")  # mid-move variant only
AFTER_MOVE = [
    ("ada", BIG, "Which key opens the shed?", "The blue one."),
    (PHONE, BIG, "¿Y el fin de semana?", "Despejado, 27 °C."),
    ("trimmed", SMALL, "t5: fifth", "r5: fifth reply"),
    ("ada", BIG, "Thanks — that's all", "You're welcome, Ada 👋"),
    (PHONE, BIG, "Adiós", "¡Hasta luego!"),
]

CHILD = textwrap.dedent("""
    import contextlib, json, os, signal, sys, threading
    old_code, data, variant, plan_path, report_path = sys.argv[1:]
    sys.path.insert(0, old_code)
    import aibutler
    assert os.path.realpath(aibutler.__file__).startswith(os.path.realpath(old_code))
    plan = json.load(open(plan_path))
    store = aibutler.Store(os.path.join(data, "aibutler.db"))
    assert store.keep_history_journal(flush_after=3600) == 0  # its writer never moves
    journal = store.journal
    sessions = {}

    def record(user, max_history, text, reply):
        if user not in sessions:
            sessions[user] = store.resolve_session(user, None, 3600)
        assert store.resolve_session(user, None, 3600) == sessions[user]
        store.record_exchange(sessions[user], user, text, reply, max_history)

    for step in plan["before"]:
        record(*step)
    if variant == "plain":
        journal.move()  # all moved: the file starts over under a new generation
    else:
        # A turn appends while the move commits (the daemon's writer thread
        # against a request thread): the move's transaction waits until it has.
        real, inside, appended = store.transaction, threading.Event(), threading.Event()
        mover = threading.Thread(target=journal.move)

        @contextlib.contextmanager
        def transaction(durable=False):
            if threading.current_thread() is mover:
                inside.set()
                assert appended.wait(30)
            with real(durable) as db:
                yield db
        store.transaction = transaction
        mover.start()
        assert inside.wait(30)
        record(*plan["during"])
        appended.set()
        mover.join(30)
        assert not mover.is_alive()
        del store.transaction
        assert len(journal._held) == 1  # the one appended meanwhile: no start over
    for step in plan["after"]:
        record(*step)
    with open(report_path, "w") as out:
        json.dump({"sessions": sessions, "held": len(journal._held),
                   "generation": journal._generation,
                   "position": store.journal_position()}, out)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9: nothing moved, nothing closed
""")

# Opens a scratch copy with the old code: its Store recovers the journal as the
# old daemon would at start; prints what sqlite then holds per session.
RECOVER = textwrap.dedent("""
    import json, os, sys
    old_code, db_path, sessions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.path.insert(0, old_code)
    import aibutler
    store = aibutler.Store(db_path)
    recovered = store.keep_history_journal()
    history = {user: store.history(sid, 1000) for user, sid in sessions.items()}
    store.close()
    import sqlite3
    with sqlite3.connect(db_path) as db:
        rows = {user: [list(r) for r in db.execute(
                    "SELECT role, content, created FROM messages WHERE session_id=? "
                    "ORDER BY id", (sid,))]
                for user, sid in sessions.items()}
    print(json.dumps({"recovered": recovered, "rows": rows, "history": history}))
""")


def old_code(folder):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{COMMIT}:aibutler.py"],
                            check=True, capture_output=True).stdout
    (folder / "aibutler.py").write_bytes(source)
    return folder


def expected_messages(steps):
    """Per user: every exchange recorded, oldest first, trimmed as insert_exchange
    trims (the newest max_history messages after each exchange)."""
    history = {}
    for user, max_history, text, reply in steps:
        messages = history.setdefault(user, [])
        messages += [["user", text], ["assistant", reply]]
        del messages[:-max_history]
    return history


def copy_as_left(data, out):
    """The files the killed process left, byte for byte, before anything opens
    them (opening the database would checkpoint its WAL)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stored = {}
    for name in ("aibutler.db", "aibutler.db-wal", "aibutler.db-history"):
        source = data / name
        if not source.exists():
            continue
        raw = source.read_bytes()
        if name.endswith("-history") or len(raw) > GZIP_ABOVE:
            with gzip.GzipFile(out / (name + ".gz"), "wb", mtime=0) as packed:
                packed.write(raw)
            stored[name] = name + ".gz"
        else:
            (out / name).write_bytes(raw)
            stored[name] = name
    return stored


def scratch_copy(data, folder):
    folder.mkdir()
    for name in ("aibutler.db", "aibutler.db-wal", "aibutler.db-history"):
        if (data / name).exists():
            shutil.copyfile(data / name, folder / name)
    return folder / "aibutler.db"


def inspect(data, folder, sessions):
    """What the killed state holds, read directly: messages per session in sqlite,
    the history_journal row, and the journal's lines, moved or not."""
    db_path = scratch_copy(data, folder)
    with sqlite3.connect(db_path) as db:
        in_db = {user: [tuple(r) for r in db.execute(
                     "SELECT role, content FROM messages WHERE session_id=? ORDER BY id", (sid,))]
                 for user, sid in sessions.items()}
        row = db.execute("SELECT generation, moved_to FROM history_journal").fetchone()
    raw = (data / "aibutler.db-history").read_bytes()
    size = len(raw)
    lines = raw.split(b"\0", 1)[0].split(b"\n")
    assert lines[-1] == b"", "the journal ends with a partial line"
    header = json.loads(lines[0])["generation"]
    moved_to = row[1] if row and row[0] == header else 0
    offset, moved, unmoved = len(lines[0]) + 1, [], []
    for line in lines[1:-1]:
        offset += len(line) + 1
        (moved if offset <= moved_to else unmoved).append(json.loads(line))
    return {"in_db": in_db, "row": row, "header": header, "size": size,
            "moved_lines": moved, "unmoved": unmoved, "end": offset}


def make(name, variant, work, old):
    steps = BEFORE_MOVE + ([DURING_MOVE] if variant == "mid-move" else []) + AFTER_MOVE
    data, plan, report = work / name / "data", work / name / "plan.json", work / name / "rep.json"
    data.mkdir(parents=True)
    plan.write_text(json.dumps({"before": BEFORE_MOVE, "during": DURING_MOVE,
                                "after": AFTER_MOVE}))
    child = subprocess.run([sys.executable, "-c", CHILD, str(old), str(data), variant,
                            str(plan), str(report)], capture_output=True, text=True, timeout=60,
                           cwd=old)
    if child.returncode != -signal.SIGKILL:
        sys.exit(f"the child did not kill itself (exit {child.returncode}):\n{child.stderr}")
    left = json.loads(report.read_text())
    sessions = left["sessions"]

    out = HERE / name
    stored = copy_as_left(data, out)  # first: nothing has opened the files yet

    state = inspect(data, work / name / "inspect", sessions)
    expected = expected_messages(steps)
    moved_steps = BEFORE_MOVE  # what the move took (the one during it stayed behind)
    left_steps = steps[len(moved_steps):]
    # The killed state really is the one wanted: the journal holds exchanges
    # the database lacks, for every session, and the position says what is moved.
    assert [r[2:4] for r in state["unmoved"]] == [list(s[2:4]) for s in left_steps], state
    assert len(state["unmoved"]) == left["held"]
    assert state["row"] is not None and list(state["row"]) == left["position"]
    if variant == "plain":
        assert state["header"] != state["row"][0] and state["moved_lines"] == []
    else:
        assert state["header"] == state["row"][0] == left["generation"]
        assert [r[2:4] for r in state["moved_lines"]] == [list(s[2:4]) for s in moved_steps]
    for user, sid in sessions.items():
        db_texts = {content for _, content in state["in_db"][user]}
        waiting = [r for r in state["unmoved"] if r[0] == sid]
        assert waiting and not any(r[2] in db_texts or r[3] in db_texts for r in waiting), user
        assert state["in_db"][user] == [tuple(m) for m in expected_messages(
            [s for s in moved_steps if s[0] == user])[user]], user

    # What the old code makes of it (its own recovery, on a scratch copy).
    scratch = scratch_copy(data, work / name / "old-recovery")
    result = subprocess.run([sys.executable, "-c", RECOVER, str(old), str(scratch),
                             json.dumps(sessions)], capture_output=True, text=True, timeout=60,
                            cwd=old)
    if result.returncode:
        sys.exit(f"the old code's recovery failed:\n{result.stderr}")
    recovered = json.loads(result.stdout)
    assert recovered["recovered"] == len(left_steps), recovered
    for user in sessions:
        assert [r[:2] for r in recovered["rows"][user]] == expected[user], user
        assert [[m["role"], m["content"]] for m in recovered["history"][user]] == expected[user]

    users = {}
    print(f"{name} ({variant}): journal {state['size']} bytes, header generation "
          f"{state['header']}, history_journal row {tuple(state['row'])}; the journal's "
          f"lines end at byte {state['end']}")
    for user, sid in sessions.items():
        recorded = sum(1 for s in steps if s[0] == user)
        moved = sum(1 for s in moved_steps if s[0] == user)
        waiting = sum(1 for r in state["unmoved"] if r[0] == sid)
        max_history = next(s[1] for s in steps if s[0] == user)
        print(f"  {user:>14} {sid}: {recorded} exchanges recorded, {moved} moved "
              f"({len(state['in_db'][user])} messages in sqlite), {waiting} only in the "
              f"journal; after the import {len(expected[user])} messages "
              f"(max_history {max_history})")
        users[user] = {"session_id": sid, "max_history": max_history,
                       "exchanges_recorded": recorded, "exchanges_moved": moved,
                       "exchanges_in_journal_only": waiting,
                       "messages": expected[user],
                       # when each was said (the old journal kept it; so does sqlite)
                       "created": [r[2] for r in recovered["rows"][user]]}
    print(f"  total: {len(moved_steps)} exchanges moved, {len(state['unmoved'])} left in the "
          f"journal; stored {', '.join(stored.values())}")
    (out / "expected.json").write_text(json.dumps({
        "made_by": f"tests/data/make_journal_fixture.py, aibutler.py of {COMMIT}, "
                   f"killed with SIGKILL",
        "variant": variant,
        "files": stored,
        "history_journal": list(state["row"]),
        "journal_generation": state["header"],
        "exchanges_moved": len(moved_steps),
        "exchanges_in_journal_only": len(state["unmoved"]),
        "users": users,
    }, indent=2, ensure_ascii=False) + "\n")


def main():
    with tempfile.TemporaryDirectory(prefix="aibutler-fixture-") as work:
        work = pathlib.Path(work)
        old = old_code(pathlib.Path(work))
        for name, variant in VARIANTS.items():
            make(name, variant, work, old)


if __name__ == "__main__":
    main()
