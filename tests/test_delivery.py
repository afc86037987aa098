"""Async delivery that loses nothing: durable accept, retries, signatures,
idempotency, bounds and graceful stop, against real daemons and receivers."""

import base64
import collections
import concurrent.futures
import errno
import signal
import os
import threading
import time

import pytest

import aibutler
from conftest import SECRET, auth, gauge, held, make_config, ok, openai_text, until

FAST = "retry_schedule = 100ms, 100ms, 100ms, 100ms, 100ms\n"


def async_config(callback_url, extra_delivery="", extra=""):
    return (f"[channels.webhook]\noutbound_url = {callback_url}\n"
            f"[delivery]\n{FAST}{extra_delivery}{extra}")


def model_config(model_url):
    return f"[agent]\nprovider = openai\nbase_url = {model_url}\ntimeout = 20s\n"


def assert_nothing_left(d):
    """/metrics: no turn queued or running, no callback waiting to be retried."""
    status, _, text = d.get("/metrics", {"X-Aibutler-Secret": SECRET})
    assert status == 200
    assert "\naibutler_queue_depth 0\n" in text and "\naibutler_deliveries_pending 0\n" in text


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
    d.wait_log(rf"delivery {accepted['message_id']}: delivered .*\(attempt 4\)")
    assert_nothing_left(d)
    listing = d.cli("deliveries", "list").stdout
    assert accepted["message_id"] in listing and "delivered" in listing
    assert d.stop() == 0  # the stop sends whatever is still due
    assert len(callbacks.requests) == 4  # delivered once, then no more


def test_retry_after_is_honoured(vault, store, receiver):
    """The dispatcher with its clock injected: each pass sends what is due at
    that moment, so the boundaries are exact and nobody waits for real seconds."""
    callbacks = receiver([(429, {"Retry-After": "2"}, b"", 0), (503, {"Retry-After": "1"}, b"", 0),
                          (200, {}, b"", 0)])
    now = [time.time()]
    store.clock = lambda: now[0]
    config = make_config(webhook={"outbound_url": callbacks.url},
                         delivery={"retry_schedule": "100ms, 100ms, 100ms, 100ms, 100ms"})
    dispatcher = aibutler.CallbackDispatcher(
        config, store, aibutler.Metrics(),
        aibutler.build_channels(config, vault, store, clock=store.clock), clock=store.clock)
    with store.transaction(durable=True) as db:
        store.add_delivery(db, "msg-1", "u", {"message_id": "msg-1", "reply": "hello"})

    def sent_after(seconds):
        now[0] += seconds
        dispatcher.work()
        return len(callbacks.requests)
    assert sent_after(0) == 1               # 429, Retry-After: 2
    assert sent_after(1.9) == 1             # not the schedule's 100 ms: the receiver's 2 s
    assert sent_after(0.1) == 2             # 503, Retry-After: 1
    assert sent_after(0.9) == 2             # not yet: Retry-After: 1
    assert sent_after(0.1) == 3             # 200
    assert sent_after(3600) == 3            # delivered: never sent again
    assert [r["headers"]["webhook-id"] for r in callbacks.requests] == ["msg-1"] * 3


@pytest.mark.parametrize("status", [400, 410])
def test_no_retry_on_final_4xx_and_the_operator_can_retry(daemon, receiver, status):
    callbacks = receiver([(status, {}, b"", 0), (200, {}, b"", 0)])
    d = daemon(async_config(callbacks.url)).start()
    _, _, accepted = d.post({"user_id": "u", "message": "hello"})
    message_id = accepted["message_id"]
    callbacks.wait_for(1)
    d.wait_log(f"delivery {message_id}: FAILED for good.*HTTP {status}")
    assert len(callbacks.requests) == 1  # failed for good: no attempt after the first
    failed = d.cli("deliveries", "list", "--failed").stdout
    assert message_id in failed
    d.cli("deliveries", "retry", message_id)
    callbacks.wait_for(2)
    d.wait_log(f"delivery {message_id}: delivered")
    assert_nothing_left(d)
    assert "delivered" in d.cli("deliveries", "list").stdout
    assert d.cli("deliveries", "retry", check=False).returncode == 2
    assert d.stop() == 0
    assert len(callbacks.requests) == 2
    purged = d.cli("deliveries", "purge", "--older-than", "0s")
    assert "purged 1" in purged.stderr
    assert d.cli("deliveries", "list").stdout == ""


def test_gives_up_after_the_schedule_and_logs_loudly(daemon, receiver):
    callbacks = receiver([(500, {}, b"", 0)])
    d = daemon(async_config(callbacks.url)).start()
    _, _, accepted = d.post({"user_id": "u", "message": "hello"})
    callbacks.wait_for(6)
    d.wait_log("gave up after 6 attempts")
    assert accepted["message_id"] in d.cli("deliveries", "list", "--failed").stdout
    assert d.stop() == 0  # the stop sends whatever is still due
    assert len(callbacks.requests) == 6


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
    thinking = threading.Event()  # the first model call answers only after the kill
    model = receiver([held(ok(openai_text("slow answer")), thinking),
                      ok(openai_text("slow answer"))])
    callbacks = receiver()
    d = daemon(async_config(callbacks.url) + model_config(model.url)).start()
    status, _, accepted = d.post({"user_id": "u", "message": "hi"})
    assert status == 202
    if moment == "during the turn":
        model.wait_for(1)
    d.kill()
    thinking.set()
    assert callbacks.requests == []
    d.start()
    if moment == "during the turn":
        d.wait_log(r"recovered from the last run: 1 turn")
    body = callbacks.wait_for(1)[0]["json"]
    assert body["message_id"] == accepted["message_id"] and body["reply"] == "slow answer"
    d.wait_log(rf"delivery {accepted['message_id']}: delivered")
    assert_nothing_left(d)
    assert d.stop() == 0  # the stop sends whatever is still due
    assert len(callbacks.requests) == 1


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
    thinking = threading.Event()
    model = receiver([held(ok(openai_text("only once")), thinking), ok(openai_text("twice!"))])
    d = daemon(model_config(model.url)).start()
    message = {"user_id": "u", "message": "book a table"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(d.post, message, {"Idempotency-Key": "same"})
            model.wait_for(1)  # the first run is in the model
            second = pool.submit(d.post, message, {"Idempotency-Key": "same"})
            until(lambda: gauge(d, "aibutler_requests_waiting") == 1)  # the repeat waits
            assert not second.done() and len(model.requests) == 1
        finally:
            thinking.set()
        results = [first.result(), second.result()]
    assert [r[0] for r in results] == [200, 200]
    assert [r[2]["reply"] for r in results] == ["only once", "only once"]
    assert "Idempotent-Replayed" not in results[0][1]
    assert results[1][1]["Idempotent-Replayed"] == "true"
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
    # nothing was queued by the replays, and the stop sends whatever is due,
    # so a second callback would be here by then
    assert_nothing_left(d)
    assert d.stop() == 0
    assert len(callbacks.requests) == 1
    facts = [r["json"] for r in callbacks.requests]
    assert facts[0]["tool_calls"][0]["name"] == "remember"
    assert len(d.cli("deliveries", "list").stdout.splitlines()) == 1


def test_queue_full_is_503_with_retry_after(daemon, receiver):
    thinking = threading.Event()  # the one worker stays busy with the first message
    model = receiver([held(ok(openai_text("slow")), thinking)])
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
    thinking.set()


def test_one_users_messages_are_processed_in_order(daemon, receiver):
    thinking = threading.Event()  # no turn ends before every message is queued
    model = receiver([held(ok(openai_text("ok")), thinking)])
    callbacks = receiver()
    d = daemon(async_config(callbacks.url, "workers = 3\n") + model_config(model.url)).start()
    for i in range(4):
        assert d.post({"user_id": "alice", "message": f"alice {i}"})[0] == 202
        assert d.post({"user_id": "bob", "message": f"bob {i}"})[0] == 202
    model.wait_for(2)  # alice's and bob's first turns; the third worker must wait
    thinking.set()
    callbacks.wait_for(8, timeout=30)
    seen = [r["json"]["messages"][-1]["content"] for r in model.requests]
    assert [m for m in seen if m.startswith("alice")] == [f"alice {i}" for i in range(4)]
    assert [m for m in seen if m.startswith("bob")] == [f"bob {i}" for i in range(4)]
    # each turn began after the one before had ended: the model sees it in the history
    for request in model.requests:
        *history, new = [m["content"] for m in request["json"]["messages"][1:]]
        user, number = new.split()
        assert history == [text for i in range(int(number)) for text in (f"{user} {i}", "ok")]
    assert d.stop() == 0


def test_sigterm_lets_in_flight_work_finish(daemon, receiver):
    thinking = threading.Event()  # the model answers only once the stop has begun
    model = receiver([held(ok(openai_text("finished anyway")), thinking)])
    d = daemon(model_config(model.url)).start()
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(
        result=d.post({"user_id": "u", "message": "slow one"})))
    thread.start()
    model.wait_for(1)
    d.proc.send_signal(signal.SIGTERM)
    d.wait_closed()
    thinking.set()
    assert d.wait() == 0
    thread.join(10)
    status, _, body = outcome["result"]
    assert status == 200 and body["reply"] == "finished anyway"


def test_sigterm_sends_the_reply_of_an_async_turn_in_flight(daemon, receiver):
    thinking = threading.Event()  # the model answers only once the stop has begun
    model = receiver([held(ok(openai_text("async finished")), thinking)])
    callbacks = receiver()
    d = daemon(async_config(callbacks.url) + model_config(model.url)).start()
    d.post({"user_id": "u", "message": "one"})
    model.wait_for(1)
    d.proc.send_signal(signal.SIGTERM)
    d.wait_closed()
    thinking.set()
    assert d.wait() == 0
    assert callbacks.requests[0]["json"]["reply"] == "async finished"


def test_sigterm_keeps_unstarted_work_for_the_next_start(daemon, receiver):
    thinking = threading.Event()  # the first turn ends only once the stop has begun
    # Nothing the daemon shows tells when its worker stops taking new turns, so
    # under load the worker may start m1 between the port closing and that
    # moment; m1's model call is then held past the exit (the stop waits out
    # shutdown_timeout and leaves it for the next start) and never answered
    # before it, so exactly m0 is delivered before the exit either way.
    second = threading.Event()
    model = receiver([held(ok(openai_text("done")), thinking),
                      held(ok(openai_text("done")), second), ok(openai_text("done"))])
    callbacks = receiver()
    d = daemon(async_config(callbacks.url, "workers = 1\n") + model_config(model.url)
               + "[server]\nshutdown_timeout = 3s\n").start()
    accepted = []
    for i in range(3):
        status, _, body = d.post({"user_id": "u", "message": f"m{i}"})
        assert status == 202
        accepted.append(body["message_id"])
    model.wait_for(1)
    d.proc.send_signal(signal.SIGTERM)
    d.wait_closed()
    thinking.set()
    assert d.wait() == 0
    second.set()
    delivered = [r["json"]["message_id"] for r in callbacks.requests]
    assert delivered == accepted[:1]  # the turn in flight finished; the others wait
    d.start()
    callbacks.wait_for(3, timeout=20)
    d.wait_log(rf"delivery {accepted[2]}: delivered")
    assert_nothing_left(d)
    assert d.stop() == 0
    arrived = collections.Counter(r["json"]["message_id"] for r in callbacks.requests)
    assert arrived == collections.Counter(accepted)  # each one, exactly once
    assert [r["json"]["reply"] for r in callbacks.requests] == ["done"] * 3


def test_durable_commits_share_fsyncs_and_each_waits_for_one(tmp_path):
    """Group commit: with a slow disk (50 ms per fsync, as an SD card gives a
    few), 20 accepts at once need far fewer than 20 fsyncs, and none returns
    before an fsync that began after it started has finished."""
    import aibutler
    syncs, lock = [], threading.Lock()

    def slow_fsync(fd):
        started = time.monotonic()
        time.sleep(0.05)
        os.fsync(fd)
        with lock:
            syncs.append((started, time.monotonic()))
    store = aibutler.Store(str(tmp_path / "aibutler.db"), fsync=slow_fsync)
    spans = []

    def accept(i):
        began = time.monotonic()
        with store.transaction(durable=True) as db:
            store.add_job(db, f"msg-{i}", f"user-{i}", "sess", {"user_id": f"user-{i}"})
        spans.append((began, time.monotonic()))
    threads = [threading.Thread(target=accept, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert store.pending_jobs() == 20 and len(spans) == 20
    assert 1 <= len(syncs) <= 10, syncs
    for began, returned in spans:
        assert any(began <= start and end <= returned for start, end in syncs)
    store.close()


def test_a_turn_done_before_its_sender_waits_is_still_handed_over():
    """A quick turn (the builtin agent) can finish between the commit and the
    sender's take(): the sender still gets it, and it is not also delivered."""
    handover = aibutler.Handover()
    handover.expect("msg-1")
    taken = []
    handover.finish("msg-1", {"reply": "hi"}, taken.append)
    assert handover.take("msg-1", 0) == {"reply": "hi"} and taken == [True]
    handover.expect("msg-2")
    assert handover.take("msg-2", 0) is None  # gave up waiting: the result is delivered
    handover.finish("msg-2", {"reply": "later"}, taken.append)
    assert taken == [True, False]


def test_a_failed_fsync_after_commit_says_the_message_may_be_stored(tmp_path, vault, receiver):
    """The COMMIT went through, the fsync that makes it durable did not: the
    503 must not claim that nothing was stored, and tells how to retry safely."""
    from falcon import testing

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")
    store = aibutler.Store(str(tmp_path / "eio.db"), fsync=failing_fsync)
    config = make_config(webhook={"outbound_url": receiver().url},
                         limits={"rate": "0", "user_rate": "0"})
    butler = aibutler.Butler(config, vault, store)
    try:
        answer = testing.TestClient(butler.app()).simulate_post(
            "/webhook/custom", headers=auth(), json={"user_id": "u", "message": "hi"})
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        description = answer.json["error"]["description"]
        assert "may not have been stored" in description and "Idempotency-Key" in description
    finally:
        store.close()
