"""Async delivery that loses nothing: durable accept, retries, signatures,
idempotency, bounds and graceful stop, against real daemons and receivers."""

import base64
import concurrent.futures
import signal
import threading
import time

import pytest

from conftest import SECRET, ok, openai_text

FAST = "retry_schedule = 100ms, 100ms, 100ms, 100ms, 100ms\n"


def async_config(callback_url, extra_delivery="", extra=""):
    return (f"[channels.webhook]\noutbound_url = {callback_url}\n"
            f"[delivery]\n{FAST}{extra_delivery}{extra}")


def model_config(model_url):
    return f"[agent]\nprovider = openai\nbase_url = {model_url}\ntimeout = 20s\n"


def test_delivery_after_a_receiver_that_fails_first(daemon, receiver):
    callbacks = receiver([(500, {}, b"", 0), (502, {}, b"", 0), (408, {}, b"", 0),
                          (200, {}, b"", 0)])
    d = daemon(async_config(callbacks.url)).start()
    status, _, accepted = d.post({"user_id": "u", "message": "what is 1+1?"})
    assert status == 202
    attempts = callbacks.wait_for(4)
    ids = {a["headers"]["webhook-id"] for a in attempts}
    assert ids == {accepted["message_id"]}
    assert all(a["json"]["message_id"] == accepted["message_id"] for a in attempts)
    time.sleep(0.5)
    assert len(callbacks.requests) == 4  # delivered once, then no more
    listing = d.cli("deliveries", "list").stdout
    assert accepted["message_id"] in listing and "delivered" in listing
    assert d.stop() == 0


def test_retry_after_is_honoured(daemon, receiver):
    callbacks = receiver([(429, {"Retry-After": "2"}, b"", 0), (503, {"Retry-After": "1"}, b"", 0),
                          (200, {}, b"", 0)])
    d = daemon(async_config(callbacks.url)).start()
    d.post({"user_id": "u", "message": "hello"})
    first, second, third = callbacks.wait_for(3, timeout=20)
    assert second["at"] - first["at"] >= 1.9
    assert third["at"] - second["at"] >= 0.9
    assert d.stop() == 0


@pytest.mark.parametrize("status", [400, 410])
def test_no_retry_on_final_4xx_and_the_operator_can_retry(daemon, receiver, status):
    callbacks = receiver([(status, {}, b"", 0), (200, {}, b"", 0)])
    d = daemon(async_config(callbacks.url)).start()
    _, _, accepted = d.post({"user_id": "u", "message": "hello"})
    callbacks.wait_for(1)
    time.sleep(1.0)
    assert len(callbacks.requests) == 1
    d.wait_log(f"FAILED for good.*HTTP {status}")
    failed = d.cli("deliveries", "list", "--failed").stdout
    assert accepted["message_id"] in failed
    d.cli("deliveries", "retry", accepted["message_id"])
    callbacks.wait_for(2)
    time.sleep(0.3)
    assert "delivered" in d.cli("deliveries", "list").stdout
    assert d.cli("deliveries", "retry", check=False).returncode == 2
    assert d.stop() == 0
    purged = d.cli("deliveries", "purge", "--older-than", "0s")
    assert "purged 1" in purged.stderr
    assert d.cli("deliveries", "list").stdout == ""


def test_gives_up_after_the_schedule_and_logs_loudly(daemon, receiver):
    callbacks = receiver([(500, {}, b"", 0)])
    d = daemon(async_config(callbacks.url)).start()
    d.post({"user_id": "u", "message": "hello"})
    callbacks.wait_for(6)
    d.wait_log("gave up after 6 attempts")
    time.sleep(0.5)
    assert len(callbacks.requests) == 6
    assert d.stop() == 0


def test_callbacks_are_signed_per_standard_webhooks(daemon, receiver):
    callbacks = receiver()
    d = daemon(async_config(callbacks.url)).start()
    _, _, accepted = d.post({"user_id": "u", "message": "what is 2*21?"})
    request = callbacks.wait_for(1)[0]
    Webhook = pytest.importorskip("standardwebhooks").Webhook  # not packaged by Debian
    # the reference implementation takes the base64 of the secret's bytes
    verifier = Webhook(base64.b64encode(SECRET.encode()).decode())
    payload = verifier.verify(request["body"], dict(request["headers"].items()))
    assert payload["reply"] == "2*21 = 42" and payload["message_id"] == accepted["message_id"]
    assert request["headers"]["webhook-id"] == accepted["message_id"]
    wrong = Webhook(base64.b64encode(b"another secret").decode())
    with pytest.raises(Exception):
        wrong.verify(request["body"], dict(request["headers"].items()))
    assert d.stop() == 0


def test_signing_can_be_turned_off(daemon, receiver):
    callbacks = receiver()
    d = daemon(async_config(callbacks.url).replace(
        "[channels.webhook]\n", "[channels.webhook]\nsign = false\n", 1)).start()
    d.post({"user_id": "u", "message": "hello"})
    request = callbacks.wait_for(1)[0]
    assert "webhook-signature" not in request["headers"]
    assert request["headers"]["webhook-id"]
    assert d.stop() == 0


@pytest.mark.parametrize("moment", ["right after 202", "during the turn"])
def test_sigkill_after_202_loses_nothing(daemon, receiver, moment):
    model = receiver([ok(openai_text("slow answer"), delay=1.5)])
    callbacks = receiver()
    d = daemon(async_config(callbacks.url) + model_config(model.url)).start()
    status, _, accepted = d.post({"user_id": "u", "message": "hi"})
    assert status == 202
    if moment == "during the turn":
        model.wait_for(1)
    d.kill()
    assert callbacks.requests == []
    d.start()
    if moment == "during the turn":
        d.wait_log(r"recovered from the last run: 1 turn")
    body = callbacks.wait_for(1)[0]["json"]
    assert body["message_id"] == accepted["message_id"] and body["reply"] == "slow answer"
    time.sleep(0.3)
    assert len(callbacks.requests) == 1
    assert d.stop() == 0


def test_sigkill_with_a_callback_in_flight_resends_it(daemon, receiver):
    callbacks = receiver([(200, {}, b"", 5), (200, {}, b"", 0)])
    d = daemon(async_config(callbacks.url)).start()
    _, _, accepted = d.post({"user_id": "u", "message": "hello"})
    callbacks.wait_for(1)
    d.kill()
    d.start()
    first, second = callbacks.wait_for(2)
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"] == \
        accepted["message_id"]
    assert first["body"] == second["body"]
    assert d.stop() == 0


def test_idempotent_replay_in_sync_mode_and_across_a_restart(daemon, receiver):
    model = receiver([ok(openai_text("answer one")), ok(openai_text("answer two"))])
    d = daemon(model_config(model.url)).start()
    message = {"user_id": "u", "message": "charge my card"}
    status, headers, first = d.post(message, {"Idempotency-Key": "k-1"})
    assert status == 200 and headers.get("Idempotent-Replayed") is None
    status, headers, again = d.post(message, {"Idempotency-Key": "k-1"})
    assert status == 200 and again == first and headers["Idempotent-Replayed"] == "true"
    assert len(model.requests) == 1
    status, _, error = d.post(dict(message, message="something else"), {"Idempotency-Key": "k-1"})
    assert status == 422 and error["error"]["field"] == "Idempotency-Key"
    # the same key from another user is another request
    status, _, other = d.post(dict(message, user_id="v"), {"Idempotency-Key": "k-1"})
    assert other["reply"] == "answer two"
    assert d.stop() == 0
    d.start()
    status, _, after = d.post(message, {"webhook-id": "k-1"})
    assert after == first and len(model.requests) == 2
    assert d.stop() == 0


def test_a_repeat_during_the_first_run_waits_for_it(daemon, receiver):
    model = receiver([ok(openai_text("only once"), delay=1.5), ok(openai_text("twice!"))])
    d = daemon(model_config(model.url)).start()
    message = {"user_id": "u", "message": "book a table"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(d.post, message, {"Idempotency-Key": "same"})
        time.sleep(0.3)
        second = pool.submit(d.post, message, {"Idempotency-Key": "same"})
        results = [first.result(), second.result()]
    assert [r[2]["reply"] for r in results] == ["only once", "only once"]
    assert len(model.requests) == 1
    assert d.stop() == 0


def test_idempotent_replay_in_async_mode(daemon, receiver):
    callbacks = receiver()
    d = daemon(async_config(callbacks.url)).start()
    message = {"user_id": "u", "message": "remember that I paid"}
    _, _, first = d.post(message, {"Idempotency-Key": "pay-1"})
    status, headers, second = d.post(message, {"Idempotency-Key": "pay-1"})
    assert status == 202 and second == first and headers["Idempotent-Replayed"] == "true"
    callbacks.wait_for(1)
    assert d.stop() == 0
    d.start()
    status, _, third = d.post(message, {"Idempotency-Key": "pay-1"})
    assert status == 202 and third == first
    time.sleep(1.0)
    assert len(callbacks.requests) == 1
    facts = [r["json"] for r in callbacks.requests]
    assert facts[0]["tool_calls"][0]["name"] == "remember"
    assert d.stop() == 0


def test_queue_full_is_503_with_retry_after(daemon, receiver):
    model = receiver([ok(openai_text("slow"), delay=2)])
    callbacks = receiver()
    d = daemon(async_config(callbacks.url, "max_pending = 2\nworkers = 1\n")
               + model_config(model.url)).start()
    statuses = [d.post({"user_id": f"u{i}", "message": "hi"})[0] for i in range(2)]
    status, headers, body = d.post({"user_id": "u9", "message": "hi"})
    assert statuses == [202, 202] and status == 503
    assert int(headers["Retry-After"]) > 0 and "queue is full" in body["error"]["description"]
    status, _, ready = d.get("/readyz")
    assert status == 503 and ready["checks"]["queue"] is False
    d.kill()


def test_one_users_messages_are_processed_in_order(daemon, receiver):
    model = receiver([ok(openai_text("ok"), delay=0.3)])
    callbacks = receiver()
    d = daemon(async_config(callbacks.url, "workers = 3\n") + model_config(model.url)).start()
    for i in range(4):
        d.post({"user_id": "alice", "message": f"alice {i}"})
        d.post({"user_id": "bob", "message": f"bob {i}"})
    callbacks.wait_for(8, timeout=30)
    seen = [r["json"]["messages"][-1]["content"] for r in model.requests]
    assert [m for m in seen if m.startswith("alice")] == [f"alice {i}" for i in range(4)]
    assert [m for m in seen if m.startswith("bob")] == [f"bob {i}" for i in range(4)]
    assert d.stop() == 0


def test_sigterm_lets_in_flight_work_finish(daemon, receiver):
    model = receiver([ok(openai_text("finished anyway"), delay=1.5)])
    d = daemon(model_config(model.url)).start()
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(
        result=d.post({"user_id": "u", "message": "slow one"})))
    thread.start()
    model.wait_for(1)
    assert d.stop(signal.SIGTERM) == 0
    thread.join(10)
    status, _, body = outcome["result"]
    assert status == 200 and body["reply"] == "finished anyway"


def test_sigterm_sends_the_reply_of_an_async_turn_in_flight(daemon, receiver):
    model = receiver([ok(openai_text("async finished"), delay=1.5)])
    callbacks = receiver()
    d = daemon(async_config(callbacks.url) + model_config(model.url)).start()
    d.post({"user_id": "u", "message": "one"})
    model.wait_for(1)
    assert d.stop(signal.SIGTERM) == 0
    assert callbacks.requests[0]["json"]["reply"] == "async finished"


def test_sigterm_keeps_unstarted_work_for_the_next_start(daemon, receiver):
    model = receiver([ok(openai_text("done"), delay=1.0)])
    callbacks = receiver()
    d = daemon(async_config(callbacks.url, "workers = 1\n") + model_config(model.url)
               + "[server]\nshutdown_timeout = 3s\n").start()
    for i in range(3):
        assert d.post({"user_id": "u", "message": f"m{i}"})[0] == 202
    model.wait_for(1)
    assert d.stop(signal.SIGTERM) == 0
    delivered = len(callbacks.requests)
    assert delivered < 3
    d.start()
    callbacks.wait_for(3, timeout=20)
    assert d.stop() == 0
