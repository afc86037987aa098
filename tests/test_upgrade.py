"""Upgrading from the version that wrote history behind through a journal file
(<data>/aibutler.db-history, commit 17e1de6): at its first start the new
version imports what a killed daemon left unmoved in that file into sqlite's
`messages`, each exchange once and in order, then removes the file.

The data directories in tests/data/journal-upgrade*/ were left by the old code
itself, killed with SIGKILL (see tests/data/make_journal_fixture.py):

- journal-upgrade: a move had emptied the journal, so the file started over
  under a new generation; every exchange in it is unmoved, and the
  history_journal row names the previous generation.
- journal-upgrade-mid-move: a turn appended while a move committed, so the
  file kept its generation; its first exchanges are in sqlite already (the
  row holds that generation and the offset moved to), the rest are not.

expected.json says, per user, the session and the exact messages its history
holds once the journal is imported, and when each was said."""

import gzip
import json
import re
import shutil
import sqlite3

import pytest

from conftest import ROOT, ok, openai_text

FIXTURES = ROOT / "tests" / "data"
VARIANTS = ["journal-upgrade", "journal-upgrade-mid-move"]
JOURNAL = "aibutler.db-history"


def expected_of(variant):
    return json.loads((FIXTURES / variant / "expected.json").read_text())


def install(d, variant):
    """The killed daemon's files in d's data directory, as it left them."""
    d.data.mkdir(parents=True, exist_ok=True)
    for source in (FIXTURES / variant).iterdir():
        if source.name == "expected.json":
            continue
        if source.suffix == ".gz":
            target = d.data / source.name[:-len(".gz")]
            with gzip.open(source, "rb") as packed, open(target, "wb") as out:
                shutil.copyfileobj(packed, out)
        else:
            target = d.data / source.name
            shutil.copyfile(source, target)
        target.chmod(0o600)
    assert (d.data / JOURNAL).stat().st_size == 1 << 20
    return expected_of(variant)


def rows(d):
    """Every message in the database: (id, session_id, role, content, created)."""
    with sqlite3.connect(d.data / "aibutler.db") as db:
        return db.execute("SELECT id, session_id, role, content, created FROM messages "
                          "ORDER BY id").fetchall()


def history_of(all_rows, session_id):
    return [[role, content] for _, sid, role, content, _ in all_rows if sid == session_id]


def sessions_of(d):
    with sqlite3.connect(d.data / "aibutler.db") as db:
        return dict(db.execute("SELECT id, user_id FROM sessions").fetchall())


def assert_imported_once(d, expected):
    """Each session holds exactly its expected messages, in order, each once,
    and nothing else is in the database."""
    found = rows(d)
    for user, want in expected["users"].items():
        got = history_of(found, want["session_id"])
        assert got == want["messages"], (
            f"{user}: history after the upgrade differs\n  expected {want['messages']}\n"
            f"  found    {got}")
    assert len(found) == sum(len(u["messages"]) for u in expected["users"].values())
    owners = sessions_of(d)
    for user, want in expected["users"].items():
        assert owners[want["session_id"]] == user
    return found


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_old_journal_is_imported_once_in_order_then_removed(daemon, variant):
    d = daemon()
    expected = install(d, variant)
    d.start()
    assert d.stop() == 0
    first = assert_imported_once(d, expected)
    assert not (d.data / JOURNAL).exists()
    # each message keeps the time it was said (an imported exchange stamped
    # "now" would make a stale session the user's current one again)
    for want in expected["users"].values():
        assert [row[4] for row in first if row[1] == want["session_id"]] == want["created"]
    # The wording is not decided: a line about the journal or history that
    # gives the number of exchanges imported.
    count = expected["exchanges_in_journal_only"]
    assert any(re.search(r"(?i)journal|history", line) and re.search(rf"\b{count}\b", line)
               for line in d.log.splitlines()), d.log

    d.start()  # a second start imports nothing again
    assert d.stop() == 0
    assert rows(d) == first
    assert not (d.data / JOURNAL).exists()


@pytest.mark.parametrize("variant", VARIANTS)
def test_after_the_upgrade_the_conversations_go_on_with_their_history(daemon, receiver,
                                                                      variant):
    model = receiver([ok(openai_text("Hoy no llueve.")), ok(openai_text("Under the mat."))])
    d = daemon(f"[agent]\nprovider = openai\nbase_url = {model.url}/v1\nmodel = test-model\n"
               "[sessions]\nidle_timeout = 100000d\n",  # the fixture's sessions are old
               env={"AIBUTLER_OPENAI_API_KEY": "x"})
    expected = install(d, variant)
    phone, ada = expected["users"]["+34600111222"], expected["users"]["ada"]
    d.start()

    # the user's current session, found without naming it
    status, _, body = d.post({"user_id": "+34600111222", "message": "¿Llueve hoy?"})
    assert status == 200, body
    assert body["session_id"] == phone["session_id"] and body["reply"] == "Hoy no llueve."
    # a session named by the sender
    status, _, body = d.post({"user_id": "ada", "message": "Where is the spare key?",
                              "session_id": ada["session_id"]})
    assert status == 200, body
    assert body["session_id"] == ada["session_id"] and body["reply"] == "Under the mat."

    requests = model.wait_for(2)
    for request, user, text in ((requests[0], phone, "¿Llueve hoy?"),
                                (requests[1], ada, "Where is the spare key?")):
        assert request["path"] == "/v1/chat/completions"
        sent = [[m["role"], m["content"]] for m in request["json"]["messages"]]
        while sent and sent[0][0] == "system":
            del sent[0]
        assert sent == user["messages"] + [["user", text]]  # each once, in order
    assert d.stop() == 0

    found = rows(d)
    assert history_of(found, phone["session_id"]) == phone["messages"] + [
        ["user", "¿Llueve hoy?"], ["assistant", "Hoy no llueve."]]
    assert history_of(found, ada["session_id"]) == ada["messages"] + [
        ["user", "Where is the spare key?"], ["assistant", "Under the mat."]]
    trimmed = expected["users"]["trimmed"]
    assert history_of(found, trimmed["session_id"]) == trimmed["messages"]
    assert not (d.data / JOURNAL).exists()
