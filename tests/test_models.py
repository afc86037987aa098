"""Real model servers' documented behaviour and quirks, reproduced by loopback
fake servers: retry headers, reasoning models, Anthropic's whitespace blocks,
content parts, lost error messages, history windows, truncation and refusals.
Also HTTP dates past 2038 and without a zone (32-bit Raspberry Pi OS)."""

import email.utils
import logging
import re
import sqlite3
import time

import pytest

import aibutler
from conftest import (SECRET, anthropic_text, anthropic_tool_use, auth, ok, openai_text,
                      openai_tool_call)

KEY = "sk-test-key-never-logged-42"
FAR_FUTURE = "Fri, 01 Jan 2100 00:00:00 -0000"


def client_for(app_for, vault, provider, url, **agent):
    vault.set(f"{provider}_api_key", KEY)
    client = app_for(agent=dict({"provider": provider, "base_url": url, "model": "test-model",
                                 "timeout": "20s"}, **agent))
    client.sleeps = []
    client.butler.agent.model.sleep = client.sleeps.append  # no real waiting in tests
    return client


def ask(client, message="hello", user="u"):
    return client.simulate_post("/webhook/custom", headers=auth(),
                                json={"user_id": user, "message": message})


def error_of(result, status):
    assert result.status_code == status, result.text
    assert KEY not in result.text
    return result.json["error"]["description"]


def http_date(seconds_from_now, zone="GMT"):
    text = email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)
    return text.replace("GMT", zone).strip()


# --- retries -------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{"Retry-After": "0"}, {"Retry-After": "-3"},
                                     {"Retry-After": http_date(-60)},
                                     {"Retry-After": "soon"}, {}])
def test_no_retry_storm_when_the_server_says_retry_now(app_for, vault, receiver, headers):
    model = receiver([(429, headers, b'{"error": {"message": "slow down"}}', 0)])
    client = client_for(app_for, vault, "openai", model.url)
    result = ask(client)
    assert "rate limiting" in error_of(result, 503)
    assert int(result.headers["retry-after"]) >= 1
    assert len(model.requests) == 3                    # a handful, not thousands
    assert client.sleeps == [0.5, 1.0]                 # our own backoff, never zero


def test_retry_after_ms_and_fractional_seconds_are_honoured(app_for, vault, receiver):
    model = receiver([(429, {"retry-after-ms": "1500", "Retry-After": "9"}, b"{}", 0),
                      (429, {"Retry-After": "0.25"}, b"{}", 0), ok(openai_text("there"))])
    client = client_for(app_for, vault, "openai", model.url)
    assert ask(client).json["reply"] == "there"
    assert client.sleeps == [1.5, 0.25]


@pytest.mark.parametrize("status", [408, 529])
def test_408_and_529_are_retried_like_5xx(app_for, vault, receiver, status):
    model = receiver([(status, {}, b'{"type": "error", "error": {"type": "overloaded_error", '
                                   b'"message": "Overloaded"}}', 0),
                      ok(anthropic_text("made it"))])
    client = client_for(app_for, vault, "anthropic", model.url)
    assert ask(client).json["reply"] == "made it" and len(model.requests) == 2


@pytest.mark.parametrize("status", [503, 529])
def test_overload_that_outlasts_the_retries_is_a_temporary_503(app_for, vault, receiver, status):
    model = receiver([(status, {}, b'{"type": "error", "error": {"type": "overloaded_error", '
                                   b'"message": "Overloaded"}}', 0)])
    result = ask(client_for(app_for, vault, "anthropic", model.url))
    description = error_of(result, 503)
    assert "Overloaded" in description and f"HTTP {status}" in description
    assert int(result.headers["retry-after"]) >= 1 and len(model.requests) == 3


def test_a_5xx_keeps_the_servers_own_message(app_for, vault, receiver):
    # llama.cpp started without --jinja
    model = receiver([(500, {}, b'{"error": {"code": 500, "message": "tools param requires '
                                b'--jinja flag", "type": "server_error"}}', 0)])
    description = error_of(ask(client_for(app_for, vault, "openai", model.url)), 502)
    assert "tools param requires --jinja flag" in description and "3 attempt" in description


def test_a_far_future_retry_date_is_clamped_not_a_crash(app_for, vault, receiver):
    model = receiver([(429, {"Retry-After": FAR_FUTURE}, b"{}", 0)])
    result = ask(client_for(app_for, vault, "openai", model.url))
    error_of(result, 503)
    assert result.headers["retry-after"] == str(int(aibutler.MAX_RETRY_AFTER))
    assert len(model.requests) == 1  # a wait past the deadline is not waited


# --- what each server accepts ----------------------------------------------------

def test_reasoning_models_get_max_completion_tokens_and_no_temperature(app_for, vault, receiver):
    model = receiver([ok(openai_text("ok"))])
    ask(client_for(app_for, vault, "openai", model.url, model="o3-mini"))
    ask(client_for(app_for, vault, "openai", model.url, model="openrouter/gpt-5-mini"))
    ask(client_for(app_for, vault, "openai", model.url, model="llama3.2"))       # Ollama
    ask(client_for(app_for, vault, "openai", model.url, model="llama3.2",
                   max_tokens_param="max_completion_tokens", max_tokens="77"))
    sent = [request["json"] for request in model.requests]
    assert sent[0]["max_completion_tokens"] == 4096 and "max_tokens" not in sent[0]
    assert sent[1]["max_completion_tokens"] == 4096 and "max_tokens" not in sent[1]
    assert sent[2]["max_tokens"] == 4096 and "max_completion_tokens" not in sent[2]
    assert sent[3]["max_completion_tokens"] == 77 and "max_tokens" not in sent[3]
    assert all("temperature" not in body for body in sent)  # unset: never sent


def test_api_openai_com_gets_max_completion_tokens_whatever_the_model(vault):
    config = make_agent_config(base_url="https://api.openai.com/v1", model="gpt-4o-mini")
    assert aibutler.OpenAIModel(config, vault).token_limit_key() == "max_completion_tokens"
    config = make_agent_config(base_url="http://localhost:11434/v1", model="gpt-4o-mini")
    assert aibutler.OpenAIModel(config, vault).token_limit_key() == "max_tokens"
    config = make_agent_config(base_url="https://api.openai.com/v1",
                               max_tokens_param="max_tokens")
    assert aibutler.OpenAIModel(config, vault).token_limit_key() == "max_tokens"


def make_agent_config(**agent):
    from conftest import make_config
    return make_config(agent=dict({"provider": "openai"}, **agent)).agent


def test_anthropic_whitespace_text_before_a_tool_use_is_not_sent_back(app_for, vault, receiver):
    first = anthropic_tool_use("calculate", {"expression": "2+2"}, "toolu_1")
    first["content"][0]["text"] = "\n\n"

    def strict(request):  # Anthropic's own check
        for message in request["json"]["messages"]:
            for block in message["content"] if isinstance(message["content"], list) else ():
                if block["type"] == "text" and not block["text"].strip():
                    return (400, {}, {"type": "error", "error": {
                        "type": "invalid_request_error",
                        "message": "text content blocks must contain non-whitespace text"}}, 0)
        return ok(anthropic_text("2+2 is 4."))
    model = receiver([ok(first), strict])
    result = ask(client_for(app_for, vault, "anthropic", model.url), "2+2?")
    assert result.status_code == 200 and result.json["reply"] == "2+2 is 4."
    assistant = model.requests[1]["json"]["messages"][-2]
    assert [block["type"] for block in assistant["content"]] == ["tool_use"]


def test_content_as_a_list_of_parts_is_joined(app_for, vault, receiver):
    parts = openai_text(None)
    parts["choices"][0]["message"]["content"] = [{"type": "text", "text": "Hello, "},
                                                 {"type": "text", "text": "world."}]
    model = receiver([ok(parts)])
    assert ask(client_for(app_for, vault, "openai", model.url)).json["reply"] == "Hello, world."


@pytest.mark.parametrize("message", [{"content": {"unexpected": True}}, "just a string",
                                     {"content": 42}, {"tool_calls": [{"function": None}]}])
def test_any_other_shape_is_a_502_naming_the_provider(app_for, vault, receiver, message):
    model = receiver([ok({"choices": [{"index": 0, "message": message}]})])
    assert "openai" in error_of(ask(client_for(app_for, vault, "openai", model.url)), 502)


# --- history, truncation, refusals -----------------------------------------------

def test_history_window_starts_at_a_user_message(app_for, vault, receiver):
    model = receiver([ok(openai_text("answer"))])
    client = client_for(app_for, vault, "openai", model.url)
    client.butler.settings.sessions.max_history = 3  # odd: would open with the assistant
    for text in ("one", "two", "three"):
        ask(client, text)
    roles = [m["role"] for m in model.requests[2]["json"]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]


def test_users_taking_turns_keep_their_sessions_trimmed(app_for, store):
    max_history = 4  # messages; each exchange stores two: the user's and the reply
    client = app_for(sessions={"max_history": str(max_history)})
    replies = {}
    for i in range(40):
        for user in ("alice", "bob"):
            answer = ask(client, f"hello {i}", user)
            assert answer.status_code == 200
            replies[user, i] = answer.json["reply"]
    with store.connection() as db:
        rows = db.execute("SELECT session_id, COUNT(*) AS n FROM messages "
                          "GROUP BY session_id").fetchall()
        kept = db.execute("SELECT sessions.user_id, role, content FROM messages JOIN sessions "
                          "ON sessions.id = messages.session_id ORDER BY messages.id").fetchall()
    # README: "each session keeps exactly its newest max_history messages": 80 were
    # written per session, 4 stay, not fewer (a trim that cut too much loses context)
    assert [row["n"] for row in rows] == [max_history, max_history]
    for user in ("alice", "bob"):
        newest = [(row["role"], row["content"]) for row in kept if row["user_id"] == user]
        assert newest == [("user", "hello 38"), ("assistant", replies[user, 38]),
                          ("user", "hello 39"), ("assistant", replies[user, 39])], user


def test_a_cut_off_reply_is_marked_and_logged(app_for, vault, receiver, caplog):
    cut = openai_text("The first three reasons are: one, two and")
    cut["choices"][0]["finish_reason"] = "length"
    model = receiver([ok(cut)])
    caplog.set_level(logging.WARNING, logger="aibutler")
    result = ask(client_for(app_for, vault, "openai", model.url, max_tokens="12"))
    assert result.json["truncated"] is True and result.json["reply"].endswith("two and")
    assert "cut off" in caplog.text and "test-model" in caplog.text and "12" in caplog.text
    anthropic = receiver([ok(dict(anthropic_text("Half an ans"), stop_reason="max_tokens"))])
    assert ask(client_for(app_for, vault, "anthropic", anthropic.url)).json["truncated"] is True
    complete = receiver([ok(openai_text("All of it."))])
    assert "truncated" not in ask(client_for(app_for, vault, "openai", complete.url)).json


def test_a_cut_off_reply_is_marked_in_the_callback(daemon, receiver):
    cut = openai_text("Once upon a")
    cut["choices"][0]["finish_reason"] = "length"
    model = receiver([ok(cut)])
    callbacks = receiver()
    d = daemon(f"[agent]\nprovider = openai\nbase_url = {model.url}\n"
               f"[channels.webhook]\noutbound_url = {callbacks.url}\n").start()
    assert d.post({"user_id": "u", "message": "tell me a story"})[0] == 202
    body = callbacks.wait_for(1)[0]["json"]
    assert body["reply"] == "Once upon a" and body["truncated"] is True
    assert d.stop() == 0
    assert re.search(r"turn msg-\w+ of model gpt-4o-mini: the reply was cut off at \[agent\] "
                     r"max_tokens; .*\(\[agent\] max_tokens = 4096\)", d.log)


def test_refusals_reach_the_sender_in_the_models_words(app_for, vault, receiver):
    refusal = openai_text(None)
    refusal["choices"][0]["message"]["refusal"] = "I can't help with that request."
    filtered = openai_text(None)
    filtered["choices"][0]["finish_reason"] = "content_filter"
    model = receiver([ok(refusal), ok(filtered)])
    client = client_for(app_for, vault, "openai", model.url)
    assert ask(client).json["reply"] == "I can't help with that request."
    assert "content filter" in ask(client).json["reply"]
    claude = receiver([ok(dict(anthropic_text("I won't write that."), stop_reason="refusal")),
                       ok({"id": "m", "type": "message", "role": "assistant", "content": [],
                           "stop_reason": "refusal"})])
    client = client_for(app_for, vault, "anthropic", claude.url)
    # partial text before a refusal is not an answer (Anthropic's streaming classifiers)
    assert ask(client).json["reply"] == "(the model declined to answer)"
    assert ask(client).json["reply"] == "(the model declined to answer)"


# --- tools, vault, queue accounting ------------------------------------------------

def test_a_tools_own_value_error_is_not_called_bad_json(app_for, vault, receiver):
    model = receiver([ok(openai_tool_call("picky", {"n": 1}, "c1")),
                      ok(openai_tool_call("picky", "{broken", "c2")), ok(openai_text("done"))])
    client = client_for(app_for, vault, "openai", model.url)

    def picky(ctx, n):
        raise ValueError("n must be even")
    client.butler.tools.register(aibutler.Tool("picky", "wants even numbers",
                                               {"type": "object"}, picky))
    calls = ask(client).json["tool_calls"]
    assert calls[0]["error"] == "the tool failed: n must be even"
    assert "not valid JSON" in calls[1]["error"]


def test_vault_get_and_source_agree(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_key").write_text("\n")  # an empty credential is passed over
    vault = aibutler.Vault(str(tmp_path / "vault.json"), env={"CREDENTIALS_DIRECTORY": str(creds),
                                                             "AIBUTLER_API_KEY": "  "})
    vault.set("api_key", "from-file")
    assert vault.lookup("api_key") == ("file", "from-file")
    assert (vault.source("api_key"), vault.get("api_key")) == ("file", "from-file")


def test_the_pending_count_changes_only_when_the_commit_does(store):
    with store.connection() as db:  # the one the next transaction borrows
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript("CREATE TABLE parent (id INTEGER PRIMARY KEY);"
                         "CREATE TABLE child (p INTEGER REFERENCES parent(id) "
                         "DEFERRABLE INITIALLY DEFERRED);")
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction() as tx:  # the COMMIT itself fails
            store.add_job(tx, "msg-1", "u", "sess-1", {"user_id": "u", "message": "hi"})
            tx.execute("INSERT INTO child VALUES (7)")
    assert store.pending_jobs() == 0
    assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    with store.transaction() as tx:
        store.add_job(tx, "msg-2", "u", "sess-1", {"user_id": "u", "message": "hi"})
    assert store.pending_jobs() == 1


# --- HTTP dates: past 2038, without a zone, under a non-UTC TZ ----------------------

@pytest.mark.parametrize("text", ["Fri, 01 Jan 2100 00:00:00 -0000",
                                  "Fri, 01 Jan 2100 00:00:00 GMT",
                                  "Fri Jan  1 00:00:00 2100",         # asctime, no zone
                                  "Friday, 01-Jan-00 00:00:00 GMT",  # RFC 850: 2000, past
                                  "Fri, 01 Jan 2100 00:00:00",
                                  "Wed, 3 Apr 2002 12.34.56.78+0800"])  # bpo-45239
def test_http_dates_never_touch_the_platform_time_t(text):
    wait = aibutler.parse_retry_after(text)
    if "2100" in text:
        assert wait == aibutler.MAX_RETRY_AFTER
    else:
        assert wait is None  # in the past: our own backoff


def test_zone_less_http_dates_are_utc():
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 90, usegmt=True)
    for zone in ("GMT", "-0000", ""):
        assert aibutler.parse_retry_after(date.replace("GMT", zone), now=now) == 90
    assert aibutler.parse_retry_after(date.replace("GMT", "+0100"), now=now) is None
    assert aibutler.iso_utc(4102444800) == "2100-01-01T00:00:00Z"
    assert aibutler.iso_utc(1e30) == "1e+30"


def test_zone_less_retry_date_under_a_non_utc_tz(daemon, receiver):
    # read as Madrid time it would lie an hour in the past, and be retried at once
    callbacks = receiver([lambda r: (503, {"Retry-After": http_date(2, "")}, b"", 0),
                          (200, {}, b"", 0)])
    d = daemon(f"[channels.webhook]\noutbound_url = {callbacks.url}\n",
               env={"TZ": "Europe/Madrid"}).start()
    d.post({"user_id": "u", "message": "hello"})
    first, second = callbacks.wait_for(2)
    assert second["at"] - first["at"] >= 1.0
    assert d.stop() == 0


def test_a_callback_retry_date_past_2038_is_scheduled_not_stuck(daemon, receiver):
    callbacks = receiver([(429, {"Retry-After": FAR_FUTURE}, b"", 0)])
    d = daemon(f"[channels.webhook]\noutbound_url = {callbacks.url}\n").start()
    _, _, accepted = d.post({"user_id": "u", "message": "hello"})
    callbacks.wait_for(1)
    d.wait_log(r"attempt 1 failed \(HTTP 429\); next try in 86400")
    listing = d.cli("deliveries", "list").stdout
    assert accepted["message_id"] in listing and "\tpending\t" in listing
    assert d.stop() == 0


def test_deliveries_list_shows_timestamps_no_calendar_can_hold(daemon):
    d = daemon()
    d.cli("deliveries", "list")  # creates the database
    db = sqlite3.connect(d.data / "aibutler.db")
    db.executemany("INSERT INTO deliveries (message_id, user_id, body, state, next_attempt, "
                   "created) VALUES (?, 'u', '{}', 'pending', 0, ?)",
                   [("msg-2100", 4102444800.0), ("msg-huge", 1e30)])
    db.commit()
    db.close()
    listing = d.cli("deliveries", "list").stdout
    assert "2100-01-01T00:00:00Z" in listing and "1e+30" in listing
    assert SECRET not in listing
