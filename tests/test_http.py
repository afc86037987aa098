"""The webhook's HTTP contract, in-process through falcon.testing."""

import json
import pathlib
import time

import pytest

import aibutler
from conftest import SECRET, auth, make_config, ok, openai_text

MESSAGE = {"user_id": "user-123", "message": "What is 6 * 7?",
           "metadata": {"platform": "my-chat-app", "location": "Madrid"}}


def post(client, body=MESSAGE, headers=None, path="/webhook/custom"):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.simulate_post(path, body=data, headers=auth() if headers is None else headers)


def error_of(result, status):
    assert result.status_code == status, result.text
    body = result.json["error"]
    assert body["status"] == status and body["description"] and body["title"]
    assert "Traceback" not in result.text
    return body


def test_sync_reply_has_the_documented_shape(app_for):
    result = post(app_for())
    assert result.status_code == 200
    assert set(result.json) == {"reply", "session_id", "tool_calls"}
    assert "42" in result.json["reply"]
    assert result.json["session_id"].startswith("sess-")
    assert result.json["tool_calls"] == [{"name": "calculate",
                                          "arguments": {"expression": "6 * 7"},
                                          "result": {"expression": "6 * 7", "value": 42}}]


def test_health_needs_no_secret(app_for):
    result = app_for().simulate_get("/healthz")
    assert result.status_code == 200
    assert result.json == {"status": "ok", "version": aibutler.__version__}


def test_missing_and_wrong_secret_are_401(app_for):
    client = app_for()
    error_of(post(client, headers={"Content-Type": "application/json"}), 401)
    body = error_of(post(client, headers=auth({"X-Aibutler-Secret": SECRET + "x"})), 401)
    assert SECRET not in json.dumps(body)


def test_secret_is_checked_before_the_body(app_for):
    # a wrong secret with garbage and an oversized length still answers 401, not 400/413
    client = app_for(server={"max_body_bytes": "10"})
    result = post(client, body=b"\xff" * 50, headers={"X-Aibutler-Secret": "nope",
                                                      "Content-Type": "application/json"})
    error_of(result, 401)


def test_unknown_path_and_wrong_method(app_for):
    client = app_for()
    assert error_of(client.simulate_get("/nowhere"), 404)
    result = client.simulate_get("/webhook/custom", headers=auth())
    error_of(result, 405)
    assert "POST" in result.headers["allow"]


def test_configured_path_is_used(app_for):
    client = app_for(webhook={"path": "/hooks/in"})
    assert post(client, path="/hooks/in").status_code == 200
    error_of(post(client), 404)


def test_disabled_channel_mounts_nothing(app_for):
    error_of(post(app_for(channels={"active": ""})), 404)
    error_of(post(app_for(webhook={"enabled": "false"})), 404)


def test_body_over_the_limit_is_413_without_reading_it(app_for):
    client = app_for(server={"max_body_bytes": "100"})
    error_of(post(client, body={"user_id": "u", "message": "x" * 200}), 413)

    class Unreadable:
        def read(self, *args):
            raise AssertionError("the body was read")
        readline = readlines = __iter__ = read
    result = client.simulate_request("POST", "/webhook/custom", headers=dict(
        auth(), **{"Content-Length": "5000"}), extras={"wsgi.input": Unreadable()})
    error_of(result, 413)


def test_not_json_is_415_and_points_to_the_twilio_channel(app_for):
    body = error_of(post(app_for(), body="From=%2B1555&Body=hi", headers=auth(
        {"Content-Type": "application/x-www-form-urlencoded"})), 415)
    assert "[channels.twilio]" in body["description"]


def test_malformed_invalid_utf8_and_empty_bodies_are_400(app_for):
    client = app_for()
    assert "malformed JSON" in error_of(post(client, body='{"user_id": '), 400)["description"]
    assert "UTF-8" in error_of(post(client, body=b'{"user_id": "\xff"}'), 400)["description"]
    assert "empty" in error_of(post(client, body=b""), 400)["description"]


def test_invalid_messages_are_422_naming_the_field(app_for):
    client = app_for()
    cases = [
        ([1, 2], None),
        ({"message": "hi"}, "user_id"),
        ({"user_id": "", "message": "hi"}, "user_id"),
        ({"user_id": "u" * 257, "message": "hi"}, "user_id"),
        ({"user_id": 5, "message": "hi"}, "user_id"),
        ({"user_id": "u"}, "message"),
        ({"user_id": "u", "message": "   "}, "message"),
        ({"user_id": "u", "message": "hi", "metadata": "x"}, "metadata"),
        ({"user_id": "u", "message": "hi", "session_id": 3}, "session_id"),
        ({"user_id": "u", "message": "hi", "attachments": {}}, "attachments"),
        ({"user_id": "u", "message": "hi", "attachments": [{"url": "file:///etc/passwd"}]},
         "attachments[0].url"),
    ]
    for body, field in cases:
        error = error_of(post(client, body=body), 422)
        assert error.get("field") == field, (body, error)
    # a valid message whose session_id names nothing
    error = error_of(post(client, body={"user_id": "u", "message": "hi",
                                        "session_id": "sess-nope"}), 404)
    assert error["field"] == "session_id"
    # user_id of exactly 256 characters is fine
    assert post(client, body={"user_id": "u" * 256, "message": "hi"}).status_code == 200


def test_sessions_are_reused_per_user_and_continued_by_id(app_for):
    client = app_for()
    first = post(client, body={"user_id": "a", "message": "hello"}).json["session_id"]
    again = post(client, body={"user_id": "a", "message": "hello"}).json["session_id"]
    other = post(client, body={"user_id": "b", "message": "hello"}).json["session_id"]
    assert first == again != other
    cont = post(client, body={"user_id": "a", "message": "hi", "session_id": first})
    assert cont.json["session_id"] == first
    # another user's session id is not theirs to continue
    error_of(post(client, body={"user_id": "b", "message": "hi", "session_id": first}), 404)


def test_idle_session_starts_a_new_one(app_for, store):
    client = app_for(sessions={"idle_timeout": "1s"})
    first = post(client, body={"user_id": "a", "message": "hello"}).json["session_id"]
    assert post(client, body={"user_id": "a", "message": "hello"}).json["session_id"] == first
    store.clock = lambda: time.time() + 5
    assert post(client, body={"user_id": "a", "message": "hello"}).json["session_id"] != first


def model_client(app_for, receiver, **sections):
    """A client whose agent talks to a fake OpenAI-style model that always says "ok"."""
    model = receiver([ok(openai_text("ok"))])
    client = app_for(agent={"provider": "openai", "base_url": model.url, "model": "m"},
                     **sections)
    return client, model


def test_history_is_capped(app_for, store, receiver):
    # two users taking turns: each one is shown the newest messages of their own session
    client, model = model_client(app_for, receiver, sessions={"max_history": "4"})
    for i in range(40):
        user = "ab"[i % 2]
        post(client, body={"user_id": user, "message": f"{user} {i}"})
    for request, user in zip(model.requests[-2:], "ab"):
        shown = [m["content"] for m in request["json"]["messages"][1:]]
        last = 38 if user == "a" else 39
        assert shown == [f"{user} {last - 4}", "ok", f"{user} {last - 2}", "ok", f"{user} {last}"]
    store.prune(86400, 4)
    with store.connection() as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2 * 4
    for user in "ab":  # what the prune kept is what the next turn is shown
        post(client, body={"user_id": user, "message": "again"})
        last = 38 if user == "a" else 39
        assert [m["content"] for m in model.requests[-1]["json"]["messages"][1:-1]] == [
            f"{user} {last - 2}", "ok", f"{user} {last}", "ok"]


@pytest.mark.parametrize("users", ["a", "ab"], ids=["one user", "two users taking turns"])
def test_history_is_trimmed_as_it_goes(app_for, store, users):
    client = app_for(sessions={"max_history": "4"})
    for i in range(200):
        user = users[i % len(users)]
        post(client, body={"user_id": user, "message": f"hello {i}"})
    with store.connection() as db:
        stored = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    assert stored == len(users) * 4  # trimmed as it goes, not kept forever


def test_channel_and_user_rate_limits_answer_429_with_retry_after(app_for):
    client = app_for(limits={"rate": "100/minute", "user_rate": "2/minute"})
    for _ in range(2):
        assert post(client).status_code == 200
    result = post(client)
    assert "user_rate" in error_of(result, 429)["description"]
    assert int(result.headers["retry-after"]) >= 1
    assert post(client, body=dict(MESSAGE, user_id="someone-else")).status_code == 200

    client = app_for(limits={"rate": "1/hour", "user_rate": "0"})
    assert post(client).status_code == 200
    result = post(client, body=dict(MESSAGE, user_id="x"))
    assert "[limits] rate" in error_of(result, 429)["description"]
    assert int(result.headers["retry-after"]) > 60


def test_attachments_reach_the_model_as_references(app_for, receiver):
    client, model = model_client(app_for, receiver)
    body = dict(MESSAGE, attachments=[{"url": "https://example.com/a.png", "type": "image/png",
                                       "name": "a.png"}])
    assert post(client, body=body).status_code == 200
    seen = model.requests[0]["json"]["messages"][-1]["content"]  # what the model was sent
    assert seen.startswith(MESSAGE["message"])
    assert "https://example.com/a.png" in seen and "Madrid" in seen
    assert "a.png (image/png)" in seen


def test_unexpected_errors_are_a_plain_500_and_the_daemon_goes_on(app_for):
    client = app_for()

    def broken(*args, **kwargs):
        raise RuntimeError("boom secret-detail")
    original = client.butler.agent.run_turn
    client.butler.agent.run_turn = broken
    body = error_of(post(client), 500)
    assert "boom" not in json.dumps(body)
    client.butler.agent.run_turn = original
    assert post(client).status_code == 200


def test_config_example_lists_every_key_with_its_default(tmp_path):
    example = pathlib.Path(__file__).parent.parent / "config.example.ini"
    config = aibutler.load_config(str(example), env={}, data_dir=str(tmp_path))
    assert config.warnings == []
    defaults = make_config()
    for section, keys in aibutler.CONFIG_SCHEMA.items():
        name = section.split(".")[-1]
        for key in keys:
            assert getattr(getattr(config, name), key) == getattr(getattr(defaults, name), key)
    text = example.read_text()
    for section, keys in aibutler.CONFIG_SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} =" in text, key


def test_rate_limit_buckets_stay_bounded():
    limiter = aibutler.RateLimiter((1, 3600.0), max_keys=100)
    for i in range(5000):
        assert limiter.take(f"user-{i}") == 0  # each one's hourly message, used up
    # the newest 100 users are remembered, and limited ...
    assert all(limiter.take(f"user-{i}") > 0 for i in range(4999, 4899, -1))
    # ... but no more than that: the oldest was forgotten, so the table is bounded
    assert limiter.take("user-0") == 0
    limiter = aibutler.RateLimiter((5, 60.0), max_keys=100)
    for i in range(5000):
        assert limiter.take(f"user-{i}") == 0
    for _ in range(5):
        limiter.take("busy")
    assert limiter.take("busy") > 0  # a bounded table still limits the user in it

