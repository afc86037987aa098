"""HTTPS through the real daemon: the model, the async callback and Twilio's
Messages API served by loopback HTTPS fakes whose certificate a throwaway test
CA signed, trusted the standard way (SSL_CERT_FILE, which the default SSL
context of urllib honours); and, without that trust, a refused certificate."""

import base64
import hashlib
import hmac
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import urllib.parse

import pytest

import aibutler
from conftest import SECRET, Recorder, http_request, ok, openai_text

KEY = "sk-tls-test-key-never-shown-7"
TOKEN = "twilio-auth-token-for-tls-0123"
SID = "AC" + "fedcba9876543210" * 2
HANDSHAKE_TIMEOUT = 10  # seconds a client gets to finish its TLS handshake

# Extensions as OpenSSL 3 and Python 3.13's VERIFY_X509_STRICT want them: a CA
# that says so (basicConstraints, keyUsage) with a subjectKeyIdentifier, and a
# server certificate for both loopback names with an authorityKeyIdentifier.
OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """{"ca": ca.pem, "cert": server.pem, "key": server.key}: made once per
    session (per xdist worker) by the openssl command line."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("the openssl command line is not installed (apt install openssl): "
                    "it makes the test CA for the HTTPS tests")
    folder = tmp_path_factory.mktemp("pki")
    config = folder / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG)

    def run(*args):
        result = subprocess.run([openssl, *args], cwd=folder, capture_output=True, text=True,
                                timeout=30, env={"OPENSSL_CONF": str(config), "PATH": ""})
        assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-config", str(config), "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=aibutler test CA", "-extensions", "ca")
    run("req", "-config", str(config), "-new", *ec, "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=localhost")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", str(secrets.randbits(63) or 1),
        "-days", "2", "-sha256", "-extfile", str(config), "-extensions", "leaf",
        "-out", "server.pem")
    return {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}


class TLSRecorder(Recorder):
    """The conftest Recorder speaking HTTPS. Each accepted connection is wrapped
    without a handshake; the handshake runs in the connection's own handler
    thread, so a client that stalls or refuses the certificate never holds up
    the accept loop. Handshake failures are recorded, not printed."""

    def __init__(self, context, answers=None, host="127.0.0.1"):
        self.context = context  # before super().__init__: it starts serving
        self.host = host
        self.handshakes = []        # TLS versions of the handshakes that succeeded
        self.handshake_errors = []  # why the others failed
        super().__init__(answers)

    @property
    def url(self):
        return f"https://{self.host}:{self.server_address[1]}"

    def get_request(self):
        sock, address = super().get_request()
        return self.context.wrap_socket(sock, server_side=True,
                                        do_handshake_on_connect=False), address

    def finish_request(self, request, client_address):
        try:
            request.settimeout(HANDSHAKE_TIMEOUT)
            request.do_handshake()
            request.settimeout(None)
        except (ssl.SSLError, OSError) as exc:
            with self.lock:
                self.handshake_errors.append(exc)
                self.arrived.notify_all()
            return
        with self.lock:
            self.handshakes.append(request.version())
            self.arrived.notify_all()
        super().finish_request(request, client_address)

    def wait_for_handshake_error(self, timeout=15):
        with self.lock:
            if not self.arrived.wait_for(lambda: self.handshake_errors, timeout):
                raise AssertionError("no TLS handshake failed")
            return list(self.handshake_errors)


@pytest.fixture
def https(receiver, pki):
    """Start a TLSRecorder: https(script, host="127.0.0.1" or "localhost"). (Not
    receiver(kind=..., script=...): receiver() keeps script for itself.)"""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["cert"], pki["key"])

    def start(script=None, host="127.0.0.1"):
        return receiver(kind=TLSRecorder, context=context, answers=script, host=host)
    return start


def trusting(pki, trust=True):
    """The daemon's environment: the test CA trusted (SSL_CERT_FILE), or nothing
    but the system's own store (whatever the test runner's environment says)."""
    def configure(d):
        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            d.env.pop(name, None)
        d.env["AIBUTLER_OPENAI_API_KEY"] = KEY
        if trust:
            d.env["SSL_CERT_FILE"] = str(pki["ca"])
        return d
    return configure


def model_config(model):
    return (f"[agent]\nprovider = openai\nbase_url = {model.url}/v1\nmodel = test-model\n"
            f"timeout = 20s\n[limits]\nrate = 0\nuser_rate = 0\n")


def assert_tls_only(server):
    assert server.handshakes and all(v.startswith("TLSv1.") for v in server.handshakes)
    assert not server.handshake_errors, server.handshake_errors


# --- the test CA itself ------------------------------------------------------------

def test_the_test_ca_passes_strict_x509_verification(pki, https):
    """What Python 3.13 checks by default (VERIFY_X509_STRICT), checked here on
    any Python: a certificate it would refuse fails here, not in a daemon log."""
    server = https([ok({"fine": True})])
    client = ssl.create_default_context(cafile=str(pki["ca"]))
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    for host in ("127.0.0.1", "localhost"):
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as raw:
            with client.wrap_socket(raw, server_hostname=host) as tls:
                assert tls.getpeercert()["subjectAltName"] == (("IP Address", "127.0.0.1"),
                                                                ("DNS", "localhost"))
    with server.lock:  # the server side of each handshake ends a moment later
        assert server.arrived.wait_for(lambda: len(server.handshakes) == 2, 15)
    assert not server.handshake_errors


# --- through the real daemon ---------------------------------------------------------

def test_the_model_over_https_answers_a_sync_webhook(daemon, https, pki):
    model = https([ok(openai_text("Hello over TLS"))])
    d = trusting(pki)(daemon(model_config(model))).start()
    status, _, answer = d.post({"user_id": "u", "message": "hello"})
    assert status == 200, answer
    assert answer["reply"] == "Hello over TLS"
    request = model.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["json"]["messages"][-1]["content"].startswith("hello")
    assert_tls_only(model)
    assert d.stop() == 0
    assert KEY not in d.log


def test_the_signed_callback_reaches_an_https_receiver(daemon, https, pki):
    callbacks = https(host="localhost")  # the certificate's DNS name, not its IP
    model = https([ok(openai_text("Called back over TLS"))])
    d = trusting(pki)(daemon(
        f"[channels.webhook]\noutbound_url = {callbacks.url}/hooks/butler\n"
        "[delivery]\nretry_schedule = 100ms, 100ms, 100ms\n" + model_config(model))).start()
    status, _, accepted = d.post({"user_id": "u", "message": "ring me back"})
    assert status == 202, accepted
    request = callbacks.wait_for(1)[0]
    message_id = accepted["message_id"]
    assert request["path"] == "/hooks/butler"
    assert request["json"]["message_id"] == message_id
    assert request["json"]["reply"] == "Called back over TLS"
    headers = request["headers"]
    assert headers["webhook-id"] == message_id
    # Standard Webhooks v1, keyed with the secret's bytes
    signed = f"{message_id}.{headers['webhook-timestamp']}.".encode() + request["body"]
    expected = base64.b64encode(hmac.new(SECRET.encode(), signed, hashlib.sha256).digest())
    assert headers["webhook-signature"] == "v1," + expected.decode()
    d.wait_log(rf"delivery {message_id}: delivered .*\(attempt 1\)")
    assert_tls_only(callbacks)
    assert_tls_only(model)
    assert d.stop() == 0
    assert len(callbacks.requests) == 1


def test_a_late_twilio_reply_goes_through_an_https_messages_api(daemon, https, pki):
    model = https([ok(openai_text("Sent by TLS"))])
    api = https([(201, {"Content-Type": "application/json"},
                  {"sid": "SM1", "status": "queued"}, 0)])
    d = trusting(pki)(daemon(
        f"[channels]\nactive = webhook, twilio\n"
        f"[channels.twilio]\naccount_sid = {SID}\napi_base = {api.url}\nreply_wait = 0\n"
        "[delivery]\nretry_schedule = 100ms, 100ms, 100ms\n" + model_config(model)))
    d.vault.set("twilio_auth_token", TOKEN)
    d.start()
    form = {"MessageSid": "SM" + "c" * 32, "AccountSid": SID, "From": "+34600111222",
            "To": "+15550001111", "Body": "answer me later", "NumMedia": "0"}
    url = d.url + "/webhook/twilio"
    # the signature is the one Twilio's RequestValidator computes (test_twilio.py checks it)
    signature = aibutler.twilio_signature(TOKEN, url, list(form.items()))
    status, _, twiml = http_request(url, urllib.parse.urlencode(form).encode(),
                                    {"Content-Type": "application/x-www-form-urlencoded",
                                     "X-Twilio-Signature": signature}, "POST")
    assert status == 200 and "<Message>" not in twiml  # nothing yet: it comes through the API
    request = api.wait_for(1)[0]
    assert request["path"] == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert request["headers"]["Authorization"] == (
        "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode())
    assert dict(urllib.parse.parse_qsl(request["body"].decode())) == {
        "To": "+34600111222", "From": "+15550001111", "Body": "Sent by TLS"}
    d.wait_log(r"delivered to Twilio's Messages API \(attempt 1\)")
    assert_tls_only(api)
    assert_tls_only(model)
    assert d.stop() == 0
    assert len(api.requests) == 1
    assert TOKEN not in d.log


def test_an_untrusted_certificate_is_refused_with_a_502(daemon, https, pki):
    model = https([ok(openai_text("must never be read"))])
    d = trusting(pki, trust=False)(daemon(model_config(model))).start()
    status, _, answer = d.post({"user_id": "u", "message": "hello"})
    assert status == 502, answer
    description = answer["error"]["description"]
    assert re.search(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed", description), \
        description
    assert "127.0.0.1" in description
    assert KEY not in str(answer) and SECRET not in str(answer)
    assert model.requests == []  # no request went out: the key was never sent
    errors = model.wait_for_handshake_error()
    assert any("unknown ca" in str(e).lower() or "alert" in str(e).lower() for e in errors), \
        errors
    assert d.stop() == 0
    assert KEY not in d.log and SECRET not in d.log
