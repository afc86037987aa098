"""Many slow turns at once (issue 12), through the real daemon: [agent]
concurrency caps the calls a fake model server counts, turns over the cap
start in arrival order, one user's messages run one at a time and in order,
and health probes answer while every request thread is busy."""

import threading
import time

import pytest

import aibutler
from conftest import SECRET, Recorder, gauge, in_background, ok, openai_text, until


class CountingModel(Recorder):
    """A fake OpenAI-compatible server whose n-th call (in arrival order)
    answers once gates[n] is set; counts the most calls it held at once."""

    def __init__(self, calls):
        self.gates = [threading.Event() for _ in range(calls)]
        self.in_flight = self.most_at_once = 0
        super().__init__([self._answer(n) for n in range(calls)])

    def _answer(self, n):
        def respond(request):
            with self.lock:
                self.in_flight += 1
                self.most_at_once = max(self.most_at_once, self.in_flight)
            self.gates[n].wait(30)
            with self.lock:
                self.in_flight -= 1
            return ok(openai_text(f"reply {n}"))
        return respond

    def users(self):
        """Who each call was for, in arrival order: the last user message's text."""
        return [call["json"]["messages"][-1]["content"] for call in self.requests]

    def release_all(self):
        for gate in self.gates:
            gate.set()

    def close(self):
        self.release_all()
        super().close()


@pytest.fixture
def counting_model(receiver):
    return lambda calls: receiver(kind=CountingModel, calls=calls)


def model_config(model, concurrency, extra=""):
    return (f"[agent]\nprovider = openai\nbase_url = {model.url}\nconcurrency = {concurrency}\n"
            f"[limits]\nrate = 0\nuser_rate = 0\n{extra}")


def test_concurrency_caps_model_calls_and_the_rest_start_in_arrival_order(
        daemon, counting_model, receiver):
    model = counting_model(6)
    callbacks = receiver()
    d = daemon(model_config(model, 2, f"[channels.webhook]\noutbound_url = {callbacks.url}\n"))
    d.start()
    accepted = []
    for n in range(6):  # each accepted before the next is sent: a known arrival order
        status, _, body = d.post({"user_id": f"user{n}", "message": f"m{n}"})
        assert status == 202
        accepted.append(body["status_url"])
    model.wait_for(2)
    assert sorted(model.users()) == ["m0", "m1"]
    until(lambda: gauge(d, "aibutler_turns_waiting") == 2)
    states = [d.get(url, {"X-Aibutler-Secret": SECRET})[2]["status"] for url in accepted]
    assert states == ["running"] * 2 + ["queued"] * 4  # waiting at the gate is still queued
    for n in range(4):  # each answer frees one place: the earliest waiting turn takes it
        # the 2 free turn workers hold the next messages at the gate; the rest wait in sqlite
        until(lambda: gauge(d, "aibutler_turns_waiting") == min(2, 4 - n))
        assert gauge(d, "aibutler_turns_running") == 2
        model.gates[n].set()
        model.wait_for(3 + n)
        assert model.users()[2 + n] == f"m{2 + n}"
    model.release_all()
    callbacks.wait_for(6)
    assert model.most_at_once == 2


def test_one_users_messages_run_one_at_a_time_in_order(daemon, counting_model, receiver):
    model = counting_model(3)
    callbacks = receiver()
    d = daemon(model_config(model, 8, f"[channels.webhook]\noutbound_url = {callbacks.url}\n"))
    d.start()
    for n in range(3):
        assert d.post({"user_id": "ana", "message": f"m{n}"})[0] == 202
    for n in range(3):
        model.wait_for(n + 1)
        assert model.most_at_once == 1  # room for 8, yet her turns wait for each other
        model.gates[n].set()
    callbacks.wait_for(3)
    assert model.users() == ["m0", "m1", "m2"]
    # each turn saw the one before it: the history grew in order
    assert [len(call["json"]["messages"]) for call in model.requests] == [2, 4, 6]


def test_a_sync_message_waits_for_the_same_users_turn_in_progress(daemon, counting_model):
    model = counting_model(2)
    d = daemon(model_config(model, 8))
    d.start()
    first, first_answer = in_background(lambda: d.post({"user_id": "ben", "message": "m0"}))
    model.wait_for(1)
    second, second_answer = in_background(lambda: d.post({"user_id": "ben", "message": "m1"}))
    until(lambda: gauge(d, "aibutler_turns_waiting") == 1)
    model.gates[0].set()
    first.join(15)
    model.wait_for(2)
    model.gates[1].set()
    second.join(15)
    assert first_answer[0][2]["reply"] == "reply 0" and second_answer[0][2]["reply"] == "reply 1"
    assert model.most_at_once == 1
    assert [m["content"] for m in model.requests[1]["json"]["messages"][1:]] == [
        "m0", "reply 0", "m1"]


def test_health_answers_while_every_request_thread_waits_on_the_model(daemon, counting_model):
    model = counting_model(8)
    d = daemon(model_config(model, 1, "[server]\nthreads = 1\n"))
    d.start()
    senders = [in_background(lambda n=n: d.post({"user_id": f"u{n}", "message": f"m{n}"}))
               for n in range(8)]
    model.wait_for(1)
    until(lambda: gauge(d, "aibutler_turns_waiting") == 7)
    for path in ("/healthz", "/readyz"):  # one request thread, eight turns: still answered
        status, _, body = aibutler_get(d, path)
        assert status == 200, body
    model.release_all()
    for thread, answer in senders:
        thread.join(15)
        assert answer[0][0] == 200
    assert model.most_at_once == 1


def aibutler_get(d, path):
    from conftest import http_request
    return http_request(d.url + path, None, {}, "GET", timeout=5)


def test_a_sync_turn_that_waits_its_whole_time_limit_gets_503():
    class Settings:
        agent = type("Agent", (), {"concurrency": 1})
    gate = aibutler.TurnGate(Settings(), remote=lambda: False)
    with gate.turn("first", time.time()):
        with pytest.raises(aibutler.ApiError) as refused:
            with gate.turn("second", time.time(), timeout=0.05):
                pass
    assert refused.value.status == 503 and refused.value.retry_after
    assert "[agent] concurrency" in refused.value.description
    assert gate.waiting() == 0 and gate.running == 0
    with gate.turn("third", time.time()):  # the place it gave up is free again
        assert gate.running == 1


def test_spare_request_threads_end_once_not_needed_for_a_while():
    from waitress.task import ThreadedTaskDispatcher
    now = [0.0]
    dispatcher = ThreadedTaskDispatcher()
    threads = aibutler.RequestThreads(dispatcher, 2, clock=lambda: now[0])
    dispatcher.set_thread_count(2)
    try:
        for _ in range(3):  # three requests wait on the model: three spares
            threads.park()
        assert len(dispatcher.threads) == 5
        for _ in range(3):
            threads.unpark()
        threads.shrink()
        assert len(dispatcher.threads) == 5  # needed a moment ago: kept
        now[0] += threads.SHRINK_AFTER
        threads.shrink()  # the window that needed five ends now
        now[0] += threads.SHRINK_AFTER
        threads.shrink()  # a whole window needed two
        until(lambda: len(dispatcher.threads) == 2)
        threads.park()  # needed again: started again
        assert len(dispatcher.threads) == 3
    finally:
        dispatcher.shutdown(timeout=5)


def test_a_turn_whose_thread_fails_while_waiting_gives_its_place_back():
    class Settings:
        agent = type("Agent", (), {"concurrency": 1})

    class NoSpareThreads:  # as when the system cannot start another thread
        def park(self):
            raise RuntimeError("can't start new thread")

        def unpark(self):
            pass

    gate = aibutler.TurnGate(Settings(), remote=lambda: False)
    with gate.turn("first", time.time()):
        gate.pools.pool = NoSpareThreads()
        with pytest.raises(RuntimeError):
            with gate.turn("second", time.time()):
                pass
        gate.pools.pool = None
        assert gate.waiting() == 0  # it left the line
    assert gate.running == 0
    with gate.turn("second", time.time()):  # nobody's place is lost: the user can go on
        assert gate.running == 1
