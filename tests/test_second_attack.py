"""What a second adversarial run found (issue 22), held through the real
daemon: /metrics that no request can grow, Twilio forms refused before they
cost anything and SIDs that cannot be re-split, each channel's users their own
(also for data kept by 0.1), callbacks signed with a secret of their own, the
contract for callers with the secret, unknown channels refused at start."""

import json
import re
import sqlite3
import threading
import time
import urllib.parse

import pytest

import aibutler
from conftest import SECRET, http_request

twilio = pytest.importorskip("test_twilio")  # the twilio package signs the Twilio cases
TOKEN, SID, sms, post, messages = twilio.TOKEN, twilio.SID, twilio.sms, twilio.post, twilio.messages


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+)", status.read()).group(1))


def series(d):
    """The series in the daemon's /metrics (name and labels, without values)."""
    text = d.get("/metrics", {"X-Aibutler-Secret": SECRET})[2]
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_no_request_can_add_a_metrics_series_or_keep_memory(daemon):
    d = daemon("[limits]\nrate = 0\nuser_rate = 0\n").start()

    def attack(numbers):  # 60 kB ids and paths, without the secret and with it
        for n in numbers:
            d.get(f"/webhook/custom/messages/{n:05d}{'x' * 60000}")
            d.get(f"/{n}%0d%0a{'y' * 2000}", {"X-Aibutler-Secret": SECRET})
            d.get(f"/webhook/custom/messages/msg-{n}", {"X-Aibutler-Secret": SECRET})
    attack(range(30))  # every kind of answer once (401, then 429 once blocked; 404)
    series(d)  # and /metrics itself
    before, rss_before = series(d), rss_kib(d.proc.pid)
    attack(range(30, 330))
    after = series(d)
    assert after == before
    assert any('path="/webhook/custom/messages/{message_id}"' in line for line in after)
    assert not any("xxxx" in line or "yyyy" in line or "msg-" in line for line in after)
    assert rss_kib(d.proc.pid) - rss_before < 4096  # 36 MB of ids came and went
    assert len(max(d.log.splitlines(), key=len)) < 400  # log lines cut the path short
    assert d.stop() == 0


def test_label_values_are_escaped_as_the_text_format_says():
    text = aibutler.format_labels((("path", 'a\\b"c\nd\re\x00f'),))
    assert text == '{path="a\\\\b\\"c\\nd\ufffde\ufffdf"}'
    assert "\r" not in text and "\n" not in text


def start_twilio(daemon, config=""):
    d = daemon(twilio.twilio_config(extra=config))
    d.vault.set("twilio_auth_token", TOKEN)
    return d.start()


def post_form(d, body, signature="x"):
    return http_request(d.url + twilio.PATH, body,
                        {"Content-Type": "application/x-www-form-urlencoded",
                         "X-Twilio-Signature": signature}, "POST")


def test_twilio_forms_are_refused_before_they_cost_anything(daemon):
    d = start_twilio(daemon)
    big = urllib.parse.urlencode(sms("x" * (1 << 20))).encode()
    status, _, body = post_form(d, big)
    assert status == 413 and body["error"]["status"] == 413 and "65536" in body[
        "error"]["description"]
    many = "&".join(f"f{n}=1" for n in range(300)).encode()  # small, but 300 fields
    status, _, body = post_form(d, many)
    assert status == 413 and "200 fields" in body["error"]["description"]
    for _ in range(aibutler.Authenticator.FAILURES_ALLOWED):  # wrong signatures: blocked
        assert post(d, sms(), signature="wrong")[0] == 403
    status, headers, body = post_form(d, big)
    assert status == 429 and headers["Retry-After"]  # refused before reading the form
    assert d.stop() == 0


def test_a_captured_form_re_split_into_a_new_message_sid_is_refused(daemon, receiver):
    from conftest import ok, openai_text
    model = receiver([ok(openai_text("done"))])
    d = daemon(twilio.twilio_config(model))
    d.vault.set("twilio_auth_token", TOKEN)
    d.start()
    form = sms("remember that the alarm code is 1234")
    signature = twilio.RequestValidator(TOKEN).compute_signature(d.url + twilio.PATH, form)
    assert messages(post(d, form, signature=signature)) == ["done"]
    # Twilio's signature joins names and values with nothing between: MessageSid
    # may swallow the field after it and the signature still holds.
    names = sorted(form)
    after = names[names.index("MessageSid") + 1]
    resplit = dict(form)
    resplit["MessageSid"] = form["MessageSid"] + after + resplit.pop(after)
    assert twilio.RequestValidator(TOKEN).validate(d.url + twilio.PATH, resplit, signature)
    status, _, body = post(d, resplit, signature=signature)
    assert status == 422 and body["error"]["field"] == "MessageSid"
    for name, value in (("AccountSid", "AC" + "g" * 32), ("MessageSid", "XX" + "0" * 32)):
        bad = sms(**{name: value})
        status, _, body = post(d, bad)
        assert (status, body["error"]["field"]) == (422, name)
    assert len(model.requests) == 1  # the captured message ran once
    assert d.stop() == 0


def test_a_texters_memories_and_history_are_not_the_webhooks(daemon):
    d = start_twilio(daemon)
    texter = "+34600111222"
    assert messages(post(d, sms("remember that my door code is 2580", sender=texter))) == [
        "OK, I'll remember that my door code is 2580."]
    status, _, answer = d.post({"user_id": texter, "message": "what do you remember?"})
    assert status == 200 and "2580" not in answer["reply"]
    d.post({"user_id": texter, "message": "remember that I am the texter"})  # a forgery
    reply = messages(post(d, sms("what do you remember?", sender=texter,
                                 sid="SM" + "c" * 32)))[0]
    assert "2580" in reply and "texter" not in reply
    status, _, body = d.post({"user_id": "evil\x1ftwilio", "message": "hi"})
    assert status == 422 and body["error"]["field"] == "user_id"
    assert d.stop() == 0


def test_data_kept_by_0_1_stays_with_the_channel_that_wrote_it(daemon):
    d = daemon(twilio.twilio_config())
    d.vault.set("twilio_auth_token", TOKEN)
    d.data.mkdir(exist_ok=True)
    store = aibutler.Store(str(d.data / "aibutler.db"))  # the same schema 0.1 had
    store.close()
    texter, now = "+34600111222", time.time()
    with sqlite3.connect(d.data / "aibutler.db") as db:  # as 0.1 kept a texter's turn
        db.execute("INSERT INTO sessions VALUES ('sess-old', ?, ?, ?)", (texter, now, now))
        db.execute("INSERT INTO messages (session_id, role, content, created) VALUES "
                   "('sess-old', 'user', 'hi', ?), ('sess-old', 'assistant', 'hello', ?)",
                   (now, now))
        db.execute("INSERT INTO memories (user_id, fact, created) VALUES (?, ?, ?)",
                   (texter, "my door code is 2580", now))
        db.execute("INSERT INTO jobs (message_id, user_id, session_id, request, state, "
                   "created, finished, result, channel) VALUES ('msg-old', ?, 'sess-old', ?, "
                   "'done', ?, ?, '{}', 'twilio')",
                   (texter, json.dumps({"user_id": texter, "message": "hi"}), now, now))
        db.execute("PRAGMA user_version = 0")
    d.start()
    reply = messages(post(d, sms("what do you remember?", sender=texter)))[0]
    assert "2580" in reply
    assert "2580" not in d.post({"user_id": texter, "message": "what do you remember?"})[2][
        "reply"]
    assert d.stop() == 0
    with sqlite3.connect(d.data / "aibutler.db") as db:
        rows = db.execute("SELECT session_id, content FROM messages ORDER BY id").fetchall()
    assert rows[:3] == [("sess-old", "hi"), ("sess-old", "hello"),
                        ("sess-old", "what do you remember?")]  # the texter's session goes on


def test_callbacks_use_the_outbound_secret_when_one_is_set(daemon, receiver):
    callbacks = receiver()
    d = daemon(f"[channels.webhook]\noutbound_url = {callbacks.url}\n")
    outbound = "receiver-only-secret-0123456789"
    d.vault.set("webhook_outbound_secret", outbound)
    d.start()
    accepted = d.post({"user_id": "u", "message": "what is 2 + 2?"})[2]
    request = callbacks.wait_for(1)[0]
    headers = request["headers"]
    assert headers["Authorization"] == f"Bearer {outbound}" and SECRET not in str(headers)
    timestamp = headers["webhook-timestamp"]
    assert headers["webhook-signature"] == aibutler.sign_payload(
        outbound, accepted["message_id"], timestamp, request["body"])
    assert d.post({"user_id": "u", "message": "hi"}, {"X-Aibutler-Secret": outbound})[0] == 401
    assert d.stop() == 0


def test_the_contract_is_for_callers_with_the_secret_unless_made_public(daemon):
    d = daemon().start()
    status, _, body = d.get("/openapi.json")
    assert status == 401 and "openapi_public" in body["error"]["description"]
    assert d.stop() == 0
    d.config.write_text("[server]\nopenapi_public = true\n")
    d.start()
    status, _, document = d.get("/openapi.json")
    assert status == 200 and document["paths"]["/openapi.json"]["get"]["security"] == []
    assert d.stop() == 0


def test_an_unknown_channel_stops_the_start_naming_the_known_ones(daemon):
    for typo in ("twillio", "sms"):
        d = daemon(f"[channels]\nactive = webhook, {typo}\n", secret=None)
        result = d.cli("run", "--config", str(d.config), check=False)
        assert result.returncode == 78 and result.stderr.count("\n") == 1
        assert repr(typo) in result.stderr and "webhook, twilio" in result.stderr


def test_a_finished_turn_wakes_the_waiters_of_its_own_message_only():
    handover = aibutler.Handover()
    looks = {"a": 0, "b": 0}
    done = {"a": False, "b": False}

    def look(message_id):
        looks[message_id] += 1
        return done[message_id]
    threads = [threading.Thread(target=handover.watch, args=(m, lambda m=m: look(m), 10))
               for m in ("a", "b") for _ in range(5)]
    for thread in threads:
        thread.start()
    while handover.waiting < 10:
        time.sleep(0.005)
    seen = dict(looks)
    for _ in range(20):  # twenty other turns finish
        handover.finish("other", {}, lambda taken: None)
    done["a"] = True
    handover.finish("a", {}, lambda taken: None)
    for thread in threads[:5]:
        thread.join(5)
    assert looks["b"] == seen["b"]  # nobody woke the waiters of b
    assert looks["a"] == seen["a"] + 5 and handover.waiting == 5
    handover.release()
    for thread in threads:
        thread.join(5)
    assert handover.waiting == 0
