"""The Twilio channel (issue 11) through the real daemon: X-Twilio-Signature as
Twilio's own RequestValidator computes it, TwiML replies, slower replies
through a loopback fake of the Messages API, MessageSid retries, long replies
in numbered parts, a failed turn's apology, media and config errors."""

import base64
import re
import signal
import threading
import urllib.parse
import xml.etree.ElementTree as ET

import pytest

import aibutler
from conftest import held, http_request, ok, openai_text

RequestValidator = pytest.importorskip("twilio.request_validator").RequestValidator  # pip only

TOKEN = "twilio-auth-token-for-tests-0123"
SID = "AC" + "0123456789abcdef" * 2
PATH = "/webhook/twilio"
CREATED = (201, {"Content-Type": "application/json"}, {"sid": "SM1", "status": "queued"}, 0)


def sms(text="hello", sender="+34600111222", sid="SM" + "a" * 32, **extra):
    form = {"MessageSid": sid, "SmsSid": sid, "AccountSid": SID, "From": sender,
            "To": "+15550001111", "Body": text, "NumMedia": "0", "FromCity": "MADRID",
            "FromState": "", "FromZip": "", "FromCountry": "ES", "ApiVersion": "2010-04-01"}
    form.update(extra)
    return form


def twilio_config(model=None, api=None, extra="", twilio=""):
    agent = f"[agent]\nprovider = openai\nbase_url = {model.url}\n" if model else ""
    return (f"[channels]\nactive = webhook, twilio\n"
            f"[channels.twilio]\naccount_sid = {SID}\n"
            + (f"api_base = {api.url}\n" if api else "") + twilio +
            f"[limits]\nrate = 0\nuser_rate = 0\n"
            f"[delivery]\nretry_schedule = 100ms, 100ms, 100ms, 100ms\n{agent}{extra}")


def start(daemon, config):
    d = daemon(config)
    d.vault.set("twilio_auth_token", TOKEN)
    return d.start()


def post(d, form, signed_url=None, signature=None, headers=None):
    """POST the form as Twilio does, signed over signed_url (default: the URL
    it is sent to) by the twilio package."""
    url = d.url + PATH
    all_headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signature is None:
        signature = RequestValidator(TOKEN).compute_signature(signed_url or url, form)
    if signature:
        all_headers["X-Twilio-Signature"] = signature
    all_headers.update(headers or {})
    return http_request(url, urllib.parse.urlencode(form).encode(), all_headers, "POST")


def messages(answer):
    """The <Message> texts of a TwiML answer (checked to be well-formed XML)."""
    status, headers, body = answer
    assert status == 200 and headers["Content-Type"].startswith("text/xml"), answer
    root = ET.fromstring(body)
    assert root.tag == "Response"
    return [element.text for element in root.findall("Message")]


def sent(api):
    """What the fake Messages API was asked to send, in order."""
    out = []
    for request in api.requests:
        form = dict(urllib.parse.parse_qsl(request["body"].decode()))
        out.append((request["path"], request["headers"]["Authorization"], form))
    return out


def reload(d, config, count):
    d.config.write_text(config)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log(r"(reload: config re-read[\s\S]*){%d}" % count)


# --- in-process: the signature and the split, against the twilio package ---------

def test_signature_is_the_one_twilios_validator_computes():
    url = "https://butler.example.com/webhook/twilio?x=1&y=%C3%A9"
    form = sms("héllo 👋 & <b>", MediaUrl0="https://api.twilio.com/m/1", body="lower")
    ours = aibutler.twilio_signature(TOKEN, url, list(form.items()))
    assert ours == RequestValidator(TOKEN).compute_signature(url, form)
    # the default port, written or not, is the same URL to Twilio
    assert RequestValidator(TOKEN).validate("https://butler.example.com:443/webhook/twilio?x=1"
                                            "&y=%C3%A9", form, ours)
    assert len(aibutler.twilio_url_variants(url)) == 2


def test_long_replies_split_at_sentences_into_numbered_parts():
    sentences = [f"Sentence number {i} says something useful." for i in range(120)]
    text = " ".join(sentences)
    parts = aibutler.split_reply(text)
    assert len(parts) == 4 and all(len(p) <= 1600 for p in parts)
    assert [p.split(" ", 1)[0] for p in parts] == ["(1/4)", "(2/4)", "(3/4)", "(4/4)"]
    assert all(p.endswith(".") for p in parts)  # cut after a sentence, not inside one
    assert " ".join(p.split(" ", 1)[1] for p in parts) == text
    words = aibutler.split_reply("word " * 1000)  # no sentence ends: between words
    assert all(p.endswith("word") for p in words) and len(words) == 4
    assert aibutler.split_reply("short") == ["short"]


def test_config_errors_stop_the_daemon_with_78(daemon, tmp_path):
    def load(text):
        path = tmp_path / "c.ini"
        path.write_text(text)
        return aibutler.load_config(str(path), env={}, data_dir=str(tmp_path))

    for text, words in [
            ("[channels]\nactive = twilio\n", "account_sid is empty"),
            (f"[channels]\nactive = twilio\n[channels.twilio]\naccount_sid = {SID}x\n",
             "Account SID"),
            (f"[channels.twilio]\naccount_sid = {SID}\nreply_wait = 20s\n", "at most 13s"),
            (f"[channels]\nactive = webhook, twilio\n[channels.twilio]\naccount_sid = {SID}\n"
             "path = /webhook/custom\n", "path is taken")]:
        with pytest.raises(aibutler.ConfigError, match=words):
            load(text)
    assert not load("[channels.twilio]\naccount_sid =\n").channel_active("twilio")  # no SID needed
    d = daemon(f"[channels]\nactive = webhook, twilio\n[channels.twilio]\naccount_sid = {SID}\n")
    result = d.cli("run", "--config", str(d.config), "--port", "0", check=False)
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1 and "vault set twilio_auth_token" in result.stderr
    d.config.write_text("[channels]\nactive = webhook, twilio\n")
    result = d.cli("run", "--config", str(d.config), "--port", "0", check=False)
    assert result.returncode == 78 and "account_sid" in result.stderr


# --- through the real daemon ------------------------------------------------------

def test_the_signature_is_checked_against_the_url_twilio_called(daemon):
    d = start(daemon, twilio_config())
    local = d.url + PATH
    first = post(d, sms("what is 2+3?"))
    assert messages(first)  # the builtin agent answers
    assert post(d, sms(), signature="")[0] == 403
    assert post(d, sms(), signature="AAAA" + RequestValidator(TOKEN).compute_signature(
        local, sms())[4:])[0] == 403
    assert post(d, sms(), signed_url="https://elsewhere.example/webhook/twilio")[0] == 403
    tampered = RequestValidator(TOKEN).compute_signature(local, sms("hello"))
    assert post(d, sms("hellO"), signature=tampered)[0] == 403
    d.wait_log(rf"checked against URL {re.escape(local)}")
    assert TOKEN not in d.log

    # X-Forwarded-Proto/-Host are believed from a trusted proxy only
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "butler.example.com"}
    public = "https://butler.example.com" + PATH
    assert post(d, sms(), signed_url=public, headers=proxied)[0] == 403
    reload(d, twilio_config(extra="[server]\ntrusted_proxies = 127.0.0.1\n"), 1)
    assert messages(post(d, sms(sid="SM2" + "0" * 31), signed_url=public, headers=proxied))
    assert messages(post(d, sms(sid="SM3" + "0" * 31)))  # no forwarded headers: the request's own URL

    # public_url, when set, is the URL checked, whatever the request says
    reload(d, twilio_config(twilio=f"public_url = {public}\n"), 2)
    assert messages(post(d, sms(sid="SM4" + "0" * 31), signed_url=public))
    assert post(d, sms(sid="SM5" + "0" * 31))[0] == 403


def test_a_quick_reply_is_twiml_escaped_and_the_model_sees_media_and_metadata(
        daemon, receiver):
    long_reply = " ".join(f"Line {i} of a long answer." for i in range(150))
    model = receiver([ok(openai_text('Hi <there> & "you" 👋')), ok(openai_text(long_reply))])
    d = start(daemon, twilio_config(model))
    form = sms("what's this?", sender="whatsapp:+34600111222", To="whatsapp:+15550001111",
               NumMedia="2", MediaUrl0="https://api.twilio.com/media/ME1",
               MediaContentType0="image/jpeg", MediaUrl1="https://api.twilio.com/media/ME2",
               MediaContentType1="audio/ogg")
    answer = post(d, form)
    assert answer[2].endswith('<Response><Message>Hi &lt;there&gt; &amp; "you" 👋</Message>'
                              '</Response>')
    assert messages(answer) == ['Hi <there> & "you" 👋']
    seen = model.requests[0]["json"]["messages"][-1]["content"]
    assert seen.startswith("what's this?")
    for fact in ('"platform": "twilio-whatsapp"', '"to": "whatsapp:+15550001111"',
                 '"message_sid": "SM' + "a" * 32, '"from_city": "MADRID"', '"from_country": "ES"',
                 "(image/jpeg): https://api.twilio.com/media/ME1",
                 "(audio/ogg): https://api.twilio.com/media/ME2"):
        assert fact in seen
    assert "from_zip" not in seen  # empty location fields are left out

    parts = messages(post(d, sms("tell me more", sid="SM" + "b" * 32)))  # several <Message>s
    assert len(parts) == 3 and [p[:6] for p in parts] == ["(1/3) ", "(2/3) ", "(3/3) "]
    assert " ".join(p[6:] for p in parts) == long_reply


def test_a_slow_reply_goes_through_the_messages_api_and_a_retry_runs_no_second_turn(
        daemon, receiver):
    thinking = threading.Event()
    model = receiver([held(ok(openai_text("Done & dusted")), thinking)])
    api = receiver([CREATED])
    d = start(daemon, twilio_config(model, api, twilio="reply_wait = 300ms\n"))
    form = sms("a slow question")
    assert messages(post(d, form)) == []  # empty <Response/> once reply_wait is over
    status, headers, _ = answer = post(d, form)  # Twilio's retry, same MessageSid
    assert messages(answer) == [] and headers["Idempotent-Replayed"] == "true"
    thinking.set()
    api.wait_for(1)
    path, authorization, sent_form = sent(api)[0]
    assert path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert authorization == "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    assert sent_form == {"To": "+34600111222", "From": "+15550001111", "Body": "Done & dusted"}
    d.wait_log(r"delivered to Twilio's Messages API \(attempt 1\)")
    assert len(model.requests) == 1  # one turn
    assert d.stop() == 0
    assert len(api.requests) == 1


def test_long_reply_via_the_api_in_order_resuming_after_a_500(daemon, receiver):
    long_reply = " ".join(f"Line {i} of a long answer." for i in range(150))
    model = receiver([ok(openai_text(long_reply))])
    api = receiver([CREATED, (500, {}, b"", 0), CREATED])
    d = start(daemon, twilio_config(model, api, twilio="reply_wait = 0\n"))
    assert messages(post(d, sms("tell me everything"))) == []
    api.wait_for(4)
    bodies = [form["Body"] for _, _, form in sent(api)]
    assert [b[:6] for b in bodies] == ["(1/3) ", "(2/3) ", "(2/3) ", "(3/3) "]  # 2 after the 500
    d.wait_log(r"delivered to Twilio's Messages API \(part 3 of 3\) \(attempt 2\)")
    assert " ".join(b[6:] for b in (bodies[0], bodies[2], bodies[3])) == long_reply
    assert d.stop() == 0
    assert len(api.requests) == 4


def test_a_failed_turn_answers_the_apology_and_logs_why(daemon, receiver):
    model = receiver([(400, {"Content-Type": "application/json"},
                       {"error": {"message": "model not found"}}, 0)])
    d = start(daemon, twilio_config(model, twilio="error_reply = Oops <sorry>, try later.\n"))
    assert messages(post(d, sms("hi"))) == ["Oops <sorry>, try later."]
    d.wait_log(r"turn msg-\w+ failed \(provider openai, answered 502\): .*HTTP 400")
