"""Issue 24 ("Chat UIs in the browser"), per-user tokens, through the real
daemon and checked against a real JWT library (PyJWT, test-only) both ways:

- tokens PyJWT mints (HS256, keyed with the UTF-8 bytes of what `vault get
  webhook_token_secret` prints) are accepted; tokens the `token` command
  prints decode with jwt.decode(..., algorithms=["HS256"]) and carry sub, iat
  and exp;
- a token acts only as its sub: user_id may be left out, another one is a 403;
  the status route answers only its user's messages (404 otherwise);
  Idempotency-Keys and sessions are its user's; the operator's routes are not
  a token's;
- alg none, HS384/HS512, RS256, a wrong key, expired, nbf or iat in the future,
  no exp, garbage: each a 401 with a JSON error that says which, never a 500,
  counted by the failure throttle like wrong secrets (429 after
  Authenticator.FAILURES_ALLOWED);
- `vault rotate webhook_token_secret` keeps old tokens working through
  [channels.webhook] previous_secret_grace.

Each test that expects 401s sends them from loopback addresses of its own
(127.0.0.x), so the per-address throttle of one never blocks another."""

import base64
import concurrent.futures
import hashlib
import hmac
import http.client
import json
import time

import pytest

jwt = pytest.importorskip("jwt")  # PyJWT: not on the i386 (Debian bookworm) stage

import aibutler  # noqa: E402
from conftest import SECRET, DaemonProcess, Recorder, ok, openai_text, until  # noqa: E402

PATH = "/webhook/custom"
ORIGIN = "https://chat.example.com"
KEY_NAME = "webhook_token_secret"


def request(d, method, path, headers=None, body=None, source="127.0.0.1"):
    """(status, headers, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=20,
                                      source_address=(source, 0))
    try:
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        all_headers.update(headers or {})
        conn.request(method, path, None if body is None else json.dumps(body).encode(),
                     all_headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, response.headers, json.loads(data)
    except ValueError:
        return response.status, response.headers, data.decode("utf-8", "replace")


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def key_of(d):
    """The token key as an operator gets it: `vault get webhook_token_secret`."""
    return d.cli("vault", "get", KEY_NAME).stdout.rstrip("\n")


def pyjwt(key, sub, ttl=600, **claims):
    now = int(time.time())
    return jwt.encode(dict({"sub": sub, "iat": now, "exp": now + ttl}, **claims), key,
                      algorithm="HS256")


def description(body):
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["status"] in (401, 429)
    return body["error"]["description"]


@pytest.fixture(scope="module")
def model():
    server = Recorder([ok(openai_text("ok"))])
    yield server
    server.close()


@pytest.fixture(scope="module")
def d(tmp_path_factory, model):
    """One daemon for the module: an OpenAI-compatible fake that always says
    "ok" (its requests count the turns), CORS for ORIGIN, no rate limits."""
    daemon = DaemonProcess(tmp_path_factory.mktemp("tokens"), (
        f"[agent]\nprovider = openai\nbase_url = {model.url}\n"
        f"[channels.webhook]\nallowed_origins = {ORIGIN}\n"
        "[limits]\nrate = 0\nuser_rate = 0\n")).start()
    daemon.key = key_of(daemon)
    yield daemon
    daemon.kill()


def test_pyjwt_tokens_are_accepted_and_act_only_as_their_sub(d):
    now = int(time.time())
    alice = bearer(pyjwt(d.key, "alice", nbf=now))
    bob = bearer(jwt.encode({"sub": "bob", "exp": now + 600}, d.key, algorithm="HS256"))
    status, _, body = request(d, "POST", PATH, alice, {"message": "hi"})
    assert status == 200 and body["reply"] == "ok"
    status, _, body = request(d, "POST", PATH, alice, {"user_id": "alice", "message": "hi"})
    assert status == 200
    status, _, body = request(d, "POST", PATH, alice, {"user_id": "bob", "message": "hi"})
    assert status == 403 and body["error"]["field"] == "user_id"
    # the status route: its own messages only
    status, headers, _ = request(d, "POST", PATH, dict(alice, Prefer="respond-async"),
                                 {"message": "later"})
    assert status == 202
    location = headers["Location"]
    status, _, state = request(d, "GET", location + "?wait=10", alice)
    assert status == 200 and state["user_id"] == "alice" and state["status"] == "done"
    assert request(d, "GET", location, bob)[0] == 404
    assert request(d, "GET", location, {"X-Aibutler-Secret": SECRET})[0] == 200  # the operator
    status, headers, _ = request(d, "POST", PATH, {"X-Aibutler-Secret": SECRET,
                                                   "Prefer": "respond-async"},
                                 {"user_id": "bob", "message": "x"})
    assert request(d, "GET", headers["Location"], alice)[0] == 404
    assert request(d, "GET", headers["Location"], bob)[0] == 200
    # the operator's routes are not a token's
    assert request(d, "GET", "/metrics", alice, source="127.0.0.30")[0] == 401
    assert request(d, "GET", "/openapi.json", alice, source="127.0.0.30")[0] == 401
    assert "Traceback" not in d.log


def test_idempotency_keys_and_sessions_are_the_token_users(d, model):
    alice, bob = bearer(pyjwt(d.key, "alice-k")), bearer(pyjwt(d.key, "bob-k"))
    key = {"Idempotency-Key": "same-key"}
    status, _, first = request(d, "POST", PATH, dict(alice, **key), {"message": "hi"})
    assert status == 200
    turns = len(model.requests)
    status, headers, again = request(d, "POST", PATH, dict(alice, **key), {"message": "hi"})
    assert headers["Idempotent-Replayed"] == "true" and again == first
    assert len(model.requests) == turns
    status, headers, other = request(d, "POST", PATH, dict(bob, **key), {"message": "hi"})
    assert status == 200 and headers["Idempotent-Replayed"] is None
    assert len(model.requests) == turns + 1  # bob's key is his own: his turn ran
    assert other["session_id"] != first["session_id"]
    status, _, body = request(d, "POST", PATH, bob, {"message": "hi",
                                                     "session_id": first["session_id"]})
    assert status == 404 and body["error"]["field"] == "session_id"
    status, _, body = request(d, "POST", PATH, alice, {"message": "hi",
                                                       "session_id": first["session_id"]})
    assert status == 200 and body["session_id"] == first["session_id"]


def test_token_command_prints_what_pyjwt_decodes(d, tmp_path):
    fresh = DaemonProcess(tmp_path / "fresh", secret=None)  # never started
    assert fresh.vault.get(KEY_NAME) is None
    calls = {  # at once: each CLI call compiles aibutler.py for a while
        "default": lambda: d.cli("token", "carol"),
        "1h": lambda: d.cli("token", "carol", "--ttl", "1h"),
        "link": lambda: d.cli("token", "carol", "--ttl", "90s", "--url",
                              "http://pi.local:3377/"),
        "empty": lambda: d.cli("token", "", check=False),
        "fresh": lambda: fresh.cli("token", "dave"),
    }
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        done = {name: pool.submit(call) for name, call in calls.items()}
        done = {name: future.result() for name, future in done.items()}
    now = time.time()
    link = done["link"].stdout.strip()
    assert link.startswith("http://pi.local:3377/chat#token=")
    for token, seconds in ((done["default"].stdout.strip(), 3600),
                           (done["1h"].stdout.strip(), 3600),
                           (link.split("#token=", 1)[1], 90)):
        assert jwt.get_unverified_header(token)["alg"] == "HS256"
        claims = jwt.decode(token, d.key, algorithms=["HS256"])
        assert claims["sub"] == "carol" and claims["exp"] - claims["iat"] == seconds
        assert now - 30 <= claims["iat"] <= now + 1
        status, _, body = request(d, "POST", PATH, bearer(token), {"message": "hi"})
        assert status == 200 and body["reply"] == "ok"
    assert done["empty"].returncode == aibutler.EXIT_USAGE
    # the key is generated on first use: a `token` before the daemon ever ran
    key = fresh.vault.get(KEY_NAME)
    assert len(key) >= 32
    assert jwt.decode(done["fresh"].stdout.strip(), key, algorithms=["HS256"])["sub"] == "dave"


def rsa_key():
    try:
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        return None
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_bad_tokens_are_401s_that_say_which_and_are_throttled(d):
    now = int(time.time())
    claims = {"sub": "mallory", "iat": now, "exp": now + 600}
    bad = {  # what each description must name
        ("none",): jwt.encode(claims, None, algorithm="none"),
        ("HS384",): jwt.encode(claims, d.key, algorithm="HS384"),
        ("HS512",): jwt.encode(claims, d.key, algorithm="HS512"),
        ("signature",): jwt.encode(claims, "another key, long enough to be a real one",
                                   algorithm="HS256"),
        ("expired",): jwt.encode(dict(claims, exp=now - 3600), d.key, algorithm="HS256"),
        ("not valid before",): jwt.encode(dict(claims, nbf=now + 3600), d.key,
                                                algorithm="HS256"),
        ("issued",): jwt.encode(dict(claims, iat=now + 3600), d.key, algorithm="HS256"),
        ("exp",): jwt.encode({"sub": "mallory", "iat": now}, d.key, algorithm="HS256"),
        ("malformed",): "garbage",
    }
    private = rsa_key()  # RS256 only where cryptography is installed
    if private is not None:
        bad[("RS256",)] = jwt.encode(claims, private, algorithm="RS256")
    source = "127.0.0.20"
    found = {}
    for words, token in bad.items():
        status, headers, body = request(d, "POST", PATH, dict(bearer(token), Origin=ORIGIN),
                                        {"message": "hi"}, source=source)
        assert status == 401, (words, body)
        assert headers["Access-Control-Allow-Origin"] == ORIGIN
        text = description(body)
        assert all(word.lower() in text.lower() for word in words), (words, text)
        found[words] = text
    assert len(set(found.values())) == len(found), found  # each says which
    # the throttle counts them like wrong secrets: 429 once FAILURES_ALLOWED failed
    failures = len(bad)
    while True:
        status, headers, body = request(d, "POST", PATH, dict(bearer("x.y.z"), Origin=ORIGIN),
                                        {"message": "hi"}, source=source)
        if status != 401:
            break
        failures += 1
        assert failures <= aibutler.Authenticator.FAILURES_ALLOWED
    assert status == 429 and failures == aibutler.Authenticator.FAILURES_ALLOWED
    assert int(headers["Retry-After"]) > 0 and "too many" in description(body)
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    status, _, body = request(d, "POST", PATH, bearer(bad[("expired",)]), {"message": "hi"},
                              source=source)
    assert status == 429
    # a valid token is never refused, as the right secret is not (a proxy's address)
    status, _, body = request(d, "POST", PATH, bearer(pyjwt(d.key, "mallory")),
                              {"message": "hi"}, source=source)
    assert status == 200
    assert "Traceback" not in d.log and " 500 " not in d.log


def signed(key, header, claims):
    """A token with any header and claims text, signed HS256 with `key`."""
    encode = lambda data: base64.urlsafe_b64encode(  # noqa: E731
        data if isinstance(data, bytes) else json.dumps(data).encode()).rstrip(b"=").decode()
    head = f"{encode(header)}.{encode(claims)}"
    signature = hmac.new(key.encode(), head.encode(), hashlib.sha256).digest()
    return f"{head}.{encode(signature)}"


def test_odd_tokens_are_401s_never_500s(d):
    now = int(time.time())
    hs256 = {"alg": "HS256", "typ": "JWT"}
    odd = {
        "empty": "",
        "two parts": "a.b",
        "four parts": "a.b.c.d",
        "not base64url": "e30=.e30=.e30=",
        "not ascii": "é.é.é",
        "header not JSON": signed(d.key, b"not json", {"sub": "m", "exp": now + 60}),
        "header a list": signed(d.key, ["HS256"], {"sub": "m", "exp": now + 60}),
        "alg missing": signed(d.key, {"typ": "JWT"}, {"sub": "m", "exp": now + 60}),
        "alg lowercase": signed(d.key, {"alg": "hs256"}, {"sub": "m", "exp": now + 60}),
        "claims not JSON": signed(d.key, hs256, b"{sub"),
        "claims a list": signed(d.key, hs256, [1, 2]),
        "exp a string": signed(d.key, hs256, {"sub": "m", "exp": str(now + 60)}),
        "exp true": signed(d.key, hs256, {"sub": "m", "exp": True}),
        "nbf a string": signed(d.key, hs256, {"sub": "m", "exp": now + 60, "nbf": "soon"}),
        "iat null": signed(d.key, hs256, {"sub": "m", "exp": now + 60, "iat": None}),
        "sub missing": signed(d.key, hs256, {"exp": now + 60}),
        "sub a number": signed(d.key, hs256, {"sub": 42, "exp": now + 60}),
        "sub empty": signed(d.key, hs256, {"sub": " ", "exp": now + 60}),
        "sub a control character": signed(d.key, hs256, {"sub": "a\x1fb", "exp": now + 60}),
        "sub too long": signed(d.key, hs256, {"sub": "m" * (aibutler.USER_ID_MAX + 1),
                                              "exp": now + 60}),
        "huge": "a" * 6000 + ".b.c",
    }
    wrong = {}
    for number, (name, token) in enumerate(odd.items()):
        headers = {"Authorization": f"Bearer {token}".encode("utf-8").decode("latin-1")}
        status, _, body = request(d, "POST", PATH, headers, {"message": "hi"},
                                  source=f"127.0.1.{number + 1}")
        if status != 401 or not isinstance(body, dict) or body.get("error", {}).get(
                "status") != 401:
            wrong[name] = (status, body)
    assert not wrong, wrong
    assert "Traceback" not in d.log and " 500 " not in d.log


def test_an_exp_that_is_no_time_never_lets_a_token_live_forever(d):
    """NaN and Infinity are not JSON (RFC 8259) nor a NumericDate (RFC 7519),
    but Python's json reads them; a token with one must not be valid for ever
    (PyJWT refuses it too, as an error whose kind depends on its version)."""
    hs256 = {"alg": "HS256", "typ": "JWT"}
    accepted = {}
    for number, exp in enumerate((b"NaN", b"Infinity", b"1e999")):
        token = signed(d.key, hs256, b'{"sub": "m", "exp": ' + exp + b"}")
        with pytest.raises((jwt.DecodeError, OverflowError, ValueError)):
            jwt.decode(token, d.key, algorithms=["HS256"])
        status, _, body = request(d, "GET", f"{PATH}/messages/msg-none", bearer(token),
                                  source=f"127.0.2.{number + 1}")
        if status != 401:
            accepted[exp.decode()] = (status, body)
    assert not accepted, f"accepted with these exp: {accepted}"


def test_rotating_the_key_keeps_old_tokens_through_the_grace(daemon):
    d = daemon("[limits]\nrate = 0\nuser_rate = 0\n").start()
    old_key = d.vault.get(KEY_NAME)  # what `vault get` prints (the module's test uses it)
    old = bearer(pyjwt(old_key, "erin"))
    probe = f"{PATH}/messages/msg-none"  # 404 once authenticated, 401 before

    def answer(token, source):
        return request(d, "GET", probe, token, source=source)[0]
    assert answer(old, "127.0.0.40") == 404
    rotated = d.cli("vault", "rotate", KEY_NAME)
    new_key = rotated.stdout.splitlines()[0]
    assert new_key != old_key and d.vault.get(KEY_NAME) == new_key
    new = bearer(pyjwt(new_key, "erin"))
    until(lambda: answer(new, "127.0.0.41") == 404, timeout=5)  # the daemon re-reads its vault
    assert answer(old, "127.0.0.40") == 404  # within [channels.webhook] previous_secret_grace
    status, _, body = request(d, "POST", PATH, old, {"message": "hi"})
    assert status == 200
    # the grace (24h by default) is over
    d.vault.set(KEY_NAME + "_rotated_at", str(time.time() - 25 * 3600))
    until(lambda: answer(old, "127.0.0.42") == 401, timeout=5)
    status, _, body = request(d, "GET", probe, old, source="127.0.0.43")
    assert status == 401 and "signature" in description(body)
    assert answer(new, "127.0.0.40") == 404
