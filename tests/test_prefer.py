"""Issue 11, first part, through the real daemon: the sender picks how it gets
the reply per request with RFC 7240's Prefer (wait=N, respond-async), every
202 points at GET {path}/messages/{id}, which long-polls with ?wait=N."""

import signal
import threading

from conftest import SECRET, Recorder, gauge, in_background, ok, openai_text, until

PATH = "/webhook/custom"


class HeldModel(Recorder):
    """A fake OpenAI-compatible server whose answers wait for `release`."""

    def __init__(self, text="the reply"):
        self.release = threading.Event()
        super().__init__([self._answer(text)])

    def _answer(self, text):
        def respond(request):
            self.release.wait(30)
            return ok(openai_text(text))
        return respond

    def close(self):
        self.release.set()
        super().close()


def start(daemon, model, extra=""):
    d = daemon(f"[agent]\nprovider = openai\nbase_url = {model.url}\n"
               f"[limits]\nrate = 0\nuser_rate = 0\n{extra}")
    return d.start()


def status_of(d, location, query=""):
    return d.get(location + query, {"X-Aibutler-Secret": SECRET})


def test_without_prefer_nothing_changes(daemon):
    d = daemon("[limits]\nrate = 0\nuser_rate = 0\n").start()
    status, headers, body = d.post({"user_id": "u", "message": "what is 2+2?"})
    assert status == 200 and "4" in body["reply"]
    assert headers["Location"] is None and headers["Preference-Applied"] is None


def test_respond_async_without_an_outbound_url_then_poll(daemon, receiver):
    model = receiver(kind=HeldModel)
    d = start(daemon, model)
    try:
        status, headers, body = d.post({"user_id": "u", "message": "hi"},
                                       {"Prefer": "respond-async"})
        assert status == 202 and headers["Preference-Applied"] == "respond-async"
        location = headers["Location"]
        assert location == f"{PATH}/messages/{body['message_id']}" == body["status_url"]
        status, _, state = status_of(d, location)
        assert status == 200 and state["status"] in ("queued", "running")
        assert state["user_id"] == "u" and state["session_id"] == body["session_id"]
        assert "reply" not in state and "delivery" not in state
        poll, answer = in_background(lambda: status_of(d, location, "?wait=20"))
        model.wait_for(1)
        model.release.set()  # the long poll answers as soon as the turn is done
        poll.join(20)
        status, _, state = answer[0]
        assert status == 200 and state["status"] == "done" and state["reply"] == "the reply"
        assert state["finished_at"] >= state["created_at"]
        assert "delivery" not in state  # no outbound URL: polling is the way
    finally:
        model.release.set()


def test_wait_answers_200_when_done_in_time_and_sends_no_callback(daemon, receiver):
    model = receiver(kind=HeldModel)
    callbacks = receiver()
    d = start(daemon, model, f"[channels.webhook]\noutbound_url = {callbacks.url}\n")
    replying, answer = in_background(lambda: d.post({"user_id": "u", "message": "hi"},
                                                    {"Prefer": "wait=20"}))
    model.wait_for(1)
    model.release.set()
    replying.join(20)
    status, headers, body = answer[0]
    assert status == 200 and body["reply"] == "the reply"
    assert headers["Preference-Applied"] == "wait=20"
    state = status_of(d, f"{PATH}/messages/{body['message_id']}")[2]
    assert state["status"] == "done" and "delivery" not in state  # never queued as a callback
    # the next async message's callback is the first one the receiver ever gets
    status, _, later = d.post({"user_id": "v", "message": "hello"})
    assert status == 202
    assert callbacks.wait_for(1)[0]["json"]["message_id"] == later["message_id"]


def test_a_turn_that_outlives_the_wait_is_delivered_once_later(daemon, receiver):
    model = receiver(kind=HeldModel)
    callbacks = receiver()
    d = start(daemon, model, f"[channels.webhook]\noutbound_url = {callbacks.url}\n"
                             "max_wait = 1s\n")
    status, headers, body = d.post({"user_id": "u", "message": "hi"},
                                   {"Prefer": "wait=30"})  # capped by max_wait
    assert status == 202 and headers["Preference-Applied"] == "wait=1"
    assert headers["Location"].endswith(body["message_id"])
    model.release.set()
    callback = callbacks.wait_for(1)[0]
    assert callback["json"]["message_id"] == body["message_id"]
    assert callback["json"]["reply"] == "the reply"
    state = status_of(d, headers["Location"], "?wait=10")[2]
    assert state["status"] == "done"
    assert state["delivery"]["status"] in ("delivered", "pending")
    assert len(model.requests) == 1


def test_reply_wait_makes_waiting_the_default_and_replays_keep_the_message_id(daemon,
                                                                             receiver):
    model = receiver(kind=HeldModel)
    d = start(daemon, model, "[channels.webhook]\nreply_wait = 20s\n")
    key = {"Idempotency-Key": "k-1"}
    replying, answer = in_background(lambda: d.post({"user_id": "u", "message": "hi"}, key))
    model.wait_for(1)
    model.release.set()
    replying.join(20)
    status, headers, body = answer[0]
    assert status == 200 and body["reply"] == "the reply"
    assert headers["Preference-Applied"] is None  # the operator's default, not asked for
    status, headers, again = d.post({"user_id": "u", "message": "hi"}, key)
    assert headers["Idempotent-Replayed"] == "true"
    assert again["message_id"] == body["message_id"] and len(model.requests) == 1


def test_a_failed_turn_answers_its_error_within_the_wait(daemon, receiver):
    model = receiver([(500, {}, b"model crashed", 0)])
    d = start(daemon, model)
    status, _, body = d.post({"user_id": "u", "message": "hi"}, {"Prefer": "wait=20"})
    assert status == 502 and body["error"]["status"] == 502


def test_status_needs_the_secret_and_answers_404_and_422(daemon):
    d = daemon("[limits]\nrate = 0\nuser_rate = 0\n").start()
    _, headers, _ = d.post({"user_id": "u", "message": "hi"}, {"Prefer": "respond-async"})
    assert d.get(headers["Location"])[0] == 401
    status, _, body = status_of(d, f"{PATH}/messages/msg-nope")
    assert status == 404 and body["error"]["status"] == 404
    status, _, body = status_of(d, headers["Location"], "?wait=soon")
    assert status == 422 and body["error"]["field"] == "wait"


def test_wait_0_means_do_not_wait(daemon):
    d = daemon("[limits]\nrate = 0\nuser_rate = 0\n").start()
    status, headers, body = d.post({"user_id": "u", "message": "hi"}, {"Prefer": "wait=0"})
    assert status == 202 and headers["Preference-Applied"] == "wait=0"
    assert status_of(d, headers["Location"], "?wait=10")[2]["status"] == "done"


def test_malformed_prefer_is_ignored(daemon):
    d = daemon("[limits]\nrate = 0\nuser_rate = 0\n").start()
    for prefer in ("wait=soon", "wait=-1", "respond-async=yes", "return=minimal"):
        status, headers, body = d.post({"user_id": "u", "message": "what is 2+2?"},
                                       {"Prefer": prefer})
        assert status == 200 and "4" in body["reply"], prefer
        assert headers["Preference-Applied"] is None


def test_a_retry_while_the_first_request_waits_gets_the_reply_delivered(daemon, receiver):
    model = receiver(kind=HeldModel)
    callbacks = receiver()
    d = start(daemon, model, f"[channels.webhook]\noutbound_url = {callbacks.url}\n")
    key = {"Prefer": "wait=20", "Idempotency-Key": "k-7"}
    first, first_answer = in_background(lambda: d.post({"user_id": "u", "message": "hi"}, key))
    model.wait_for(1)  # the first request waits for the turn; its sender gives up and retries
    status, headers, body = d.post({"user_id": "u", "message": "hi"}, key)
    assert status == 202 and headers["Idempotent-Replayed"] == "true"
    first.join(20)
    assert first_answer[0][0] == 202  # it stops waiting: the reply goes as the 202 promised
    model.release.set()
    callback = callbacks.wait_for(1)[0]["json"]
    assert callback["message_id"] == body["message_id"] and callback["reply"] == "the reply"


def test_a_key_held_by_a_running_sync_request_is_a_409_for_an_async_one(daemon, receiver):
    model = receiver(kind=HeldModel)
    d = start(daemon, model)
    key = {"Idempotency-Key": "k-9"}
    first, answer = in_background(lambda: d.post({"user_id": "u", "message": "hi"}, key))
    model.wait_for(1)
    status, headers, body = d.post({"user_id": "u", "message": "hi"},
                                   dict(key, Prefer="respond-async"))
    assert status == 409 and headers["Retry-After"] and body["error"]["status"] == 409
    model.release.set()
    first.join(20)
    assert answer[0][0] == 200


def test_results_are_kept_for_the_idempotency_ttl_then_pruned(app_for, store):
    client = app_for()
    client.butler.start()  # its turn workers
    headers = {"X-Aibutler-Secret": SECRET, "Prefer": "wait=10"}
    answer = client.simulate_post(PATH, headers=headers, json={"user_id": "u", "message": "hi"})
    assert answer.status_code == 200
    location = f"{PATH}/messages/{answer.json['message_id']}"
    auth = {"X-Aibutler-Secret": SECRET}
    store.prune(idempotency_ttl=3600, max_history=20)  # younger than the ttl: kept
    assert client.simulate_get(location, headers=auth).json["status"] == "done"
    store.prune(idempotency_ttl=-1, max_history=20)  # older than the ttl: gone
    gone = client.simulate_get(location, headers=auth)
    assert gone.status_code == 404 and gone.json["error"]["status"] == 404


def test_a_stop_answers_waiting_long_polls_at_once_and_logs_no_error(daemon, receiver):
    model = receiver(kind=HeldModel)
    d = start(daemon, model)
    _, headers, _ = d.post({"user_id": "u", "message": "hi"}, {"Prefer": "respond-async"})
    model.wait_for(1)
    poll, answer = in_background(lambda: status_of(d, headers["Location"], "?wait=25"))
    until(lambda: gauge(d, "aibutler_requests_waiting") == 1)
    d.proc.send_signal(signal.SIGTERM)
    poll.join(10)  # answered by the stop, not by the end of its 25 s
    status, _, state = answer[0]
    assert status == 200 and state["status"] in ("queued", "running")
    model.release.set()  # the turn in hand finishes within shutdown_timeout
    assert d.wait(20) == 0
    assert "Traceback" not in d.log and " ERROR " not in d.log


def test_a_waiter_whose_message_was_handed_elsewhere_stops_without_an_error():
    import aibutler
    handover = aibutler.Handover()
    handover.expect("msg-1")
    handover.forget("msg-1")  # a retry of the same key took over before the wait began
    assert handover.take("msg-1", 0.01) is None  # nothing to take, and no error
