"""/openapi.json: the published contract describes every route the daemon
answers, with the limits the code checks, and the daemon's answers fit it.
(.ci/run also fuzzes the daemon against it with Schemathesis:
tests/schemathesis/run.)"""

import ast
import functools
import inspect
import json
import re
import socket
import urllib.parse

import aibutler
from conftest import SECRET, auth

MESSAGE = {"user_id": "alice", "message": "What time is it?"}
TWILIO_TOKEN = "twilio-auth-token-for-openapi-tests"


def conforms(value, schema, document, path="$"):
    """The first way value breaks schema (the subset /openapi.json uses), or None."""
    if "$ref" in schema:
        target = document
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return conforms(value, target, document, path)
    kinds = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool,
             "null": type(None), "number": (int, float)}
    allowed = schema.get("type")
    if allowed is not None:
        allowed = [allowed] if isinstance(allowed, str) else allowed
        if not any(isinstance(value, kinds[k]) and not (isinstance(value, bool) and k in (
                "integer", "number")) for k in allowed):
            return f"{path}: {value!r} is not {allowed}"
    if "const" in schema and value != schema["const"]:
        return f"{path}: {value!r} != {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: {value!r} not in {schema['enum']}"
    if "oneOf" in schema:
        matches = [s for s in schema["oneOf"] if conforms(value, s, document, path) is None]
        if len(matches) != 1:
            return f"{path}: matches {len(matches)} of oneOf"
    if isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
            return f"{path}: length {len(value)}"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return f"{path}: {value!r} does not match {schema['pattern']}"
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            return f"{path}: too many items"
        for i, item in enumerate(value):
            problem = conforms(item, schema.get("items", {}), document, f"{path}[{i}]")
            if problem:
                return problem
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                return f"{path}.{name} is required"
        properties = schema.get("properties", {})
        for name, item in value.items():
            extra = schema.get("additionalProperties", True)
            sub = properties.get(name, extra if isinstance(extra, dict) else {})
            if name not in properties and extra is False:
                return f"{path}.{name} is not in the schema"
            problem = conforms(item, sub, document, f"{path}.{name}")
            if problem:
                return problem
    return None


def response_schema(document, path, method, status):
    answer = document["paths"][path][method]["responses"][str(status)]
    if "$ref" in answer:
        answer = document["components"]["responses"][answer["$ref"].split("/")[-1]]
    return next(iter(answer["content"].values()))["schema"]


def assert_fits(document, path, method, status, body):
    assert str(status) in document["paths"][path][method]["responses"], (path, status)
    problem = conforms(body, response_schema(document, path, method, status), document)
    assert problem is None, (path, method, status, problem, body)


def test_the_running_daemon_publishes_its_contract_and_keeps_it(daemon):
    d = daemon("[limits]\nrate = 0\nuser_rate = 0\n[channels.webhook]\nmax_wait = 7s\n").start()
    try:
        assert d.get("/openapi.json")[0] == 401  # for callers with the secret
        status, headers, document = d.get("/openapi.json", {"X-Aibutler-Secret": d.secret})
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert document["openapi"].startswith("3.1.")
        assert document["info"]["version"] == aibutler.__version__
        hook = "/webhook/custom"
        status_path = hook + "/messages/{message_id}"
        message = document["components"]["schemas"]["Message"]

        # the example message is valid, and the reply, the 202 and the status fit
        assert conforms(message["example"], message, document) is None
        status, _, body = d.post(message["example"])
        assert_fits(document, hook, "post", status, body)
        assert status == 200
        status, headers, accepted = d.post(MESSAGE, {"Prefer": "respond-async"})
        assert status == 202 and headers["Preference-Applied"] == "respond-async"
        assert_fits(document, hook, "post", 202, accepted)
        status, _, body = d.get(accepted["status_url"] + "?wait=5",
                                {"X-Aibutler-Secret": SECRET})
        assert status == 200 and body["status"] == "done"
        assert_fits(document, status_path, "get", 200, body)
        for path, headers in (("/healthz", {}), ("/readyz", {}),
                              ("/metrics", {"X-Aibutler-Secret": SECRET})):
            status, answer_headers, body = d.get(path, headers)
            assert status == 200, path
            if path == "/metrics":
                media = document["paths"][path]["get"]["responses"]["200"]["content"]
                assert answer_headers["Content-Type"].split(";")[0] in media
            else:
                assert_fits(document, path, "get", 200, body)

        # errors: one shape, each status documented where it happens
        for body, headers, expected in (
                (b"{", None, 400), (MESSAGE, {"X-Aibutler-Secret": "wrong"}, 401),
                (dict(MESSAGE, session_id="nope"), None, 404),
                (b"user_id=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
                (dict(MESSAGE, user_id=" "), None, 422),
                (MESSAGE, {"Idempotency-Key": ""}, 422)):
            status, _, answer = d.post(body, headers)
            assert status == expected, (body, headers, answer)
            assert_fits(document, hook, "post", status, answer)
        status, _, answer = d.get(hook + "/messages/msg-none", {"X-Aibutler-Secret": SECRET})
        assert status == 404
        assert_fits(document, status_path, "get", 404, answer)
        status, _, answer = d.get(hook + "/messages/msg-none?wait=soon",
                                  {"X-Aibutler-Secret": SECRET})
        assert status == 422 and answer["error"]["field"] == "wait"

        # a request waitress cannot parse is answered, not dropped
        with socket.create_connection(("127.0.0.1", d.port), timeout=5) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
            assert raw.recv(100).split(b"\r\n")[0].endswith(b" 400 Bad Request")
        assert "uncaptured" not in d.log and "Traceback" not in d.log

        # the limits in the document are the code's, max_wait the config's
        fields = message["properties"]
        assert fields["user_id"]["maxLength"] == aibutler.USER_ID_MAX
        assert fields["session_id"]["maxLength"] == aibutler.SESSION_ID_MAX
        assert fields["attachments"]["maxItems"] == aibutler.ATTACHMENTS_MAX
        assert str(aibutler.MAX_NESTING) in fields["metadata"]["description"]
        url = document["components"]["schemas"]["Attachment"]["properties"]["url"]
        assert url["pattern"] == aibutler.ATTACHMENT_URL_PATTERN
        post = document["paths"][hook]["post"]
        key = next(p for p in post["parameters"] if p["name"] == "Idempotency-Key")
        assert key["schema"]["maxLength"] == aibutler.IDEMPOTENCY_KEY_MAX
        wait = document["paths"][status_path]["get"]["parameters"][1]
        assert wait["schema"]["pattern"] == f"^{aibutler.WAIT_PATTERN}$"
        assert "at most 7," in wait["description"]
        assert set(post["callbacks"]["reply"]) == {"{$outbound_url}"}
    finally:
        d.stop()


@functools.cache
def aibutler_classes():
    """aibutler.py read and parsed once: its lines, and where each class starts as
    inspect.findsource says (its first decorator, else its `class` line; from 0)."""
    with open(inspect.getsourcefile(aibutler), encoding="utf-8") as source:
        lines = source.readlines()
    starts = {}

    def walk(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name = scope + child.name
                first = child.decorator_list[0] if child.decorator_list else child
                starts.setdefault(name, first.lineno - 1)  # the first, as findsource
                walk(child, name + ".")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, f"{scope}{child.name}.<locals>.")
            else:
                walk(child, scope)
    walk(ast.parse("".join(lines)), "")
    return lines, starts


def app_routes(app):
    """{path: methods the app answers itself}, from falcon.inspect. It looks up
    each resource's class in its source, and Python before 3.13 parses the whole
    module for every class looked up (seconds for all the apps here): aibutler's
    classes are found in the one parse above instead."""
    import falcon.inspect
    findsource = inspect.findsource

    def find(obj):
        if inspect.isclass(obj) and obj.__module__ == aibutler.__name__:
            lines, starts = aibutler_classes()
            if obj.__qualname__ not in starts:
                raise OSError("could not find class definition")
            return lines, starts[obj.__qualname__]
        return findsource(obj)
    inspect.findsource = find
    try:
        return {route.path: {m.method.lower() for m in route.methods if not m.internal}
                for route in falcon.inspect.inspect_routes(app)}
    finally:
        inspect.findsource = findsource


def test_every_route_of_the_app_is_described_and_nothing_else(app_for):
    twilio = {"channels": {"active": "webhook, twilio"},
              "twilio": {"account_sid": "AC" + "0" * 32, "path": "/in/sms"}}
    for sections in ({}, {"webhook": {"path": "/in/hook"}, "server": {"metrics_public": "true"}},
                     {"channels": {"active": ""}}, twilio, dict(twilio, channels={
                         "active": "twilio"})):
        client = app_for(**sections)
        document = client.simulate_get("/openapi.json", headers=auth()).json
        routes = app_routes(client.app)
        described = {path: set(item) for path, item in document["paths"].items()}
        assert described == routes, sections
        for path, item in document["paths"].items():
            for method, operation in item.items():
                codes = set(operation["responses"])
                if operation.get("security"):  # Twilio's signature is 403, not 401
                    assert "429" in codes and codes & {"401", "403"}, (path, method)
                for ref in json.dumps(operation).split('"$ref": "')[1:]:
                    name = ref.split('"')[0].split("/")
                    assert name[-1] in document["components"][name[-2]], ref
        metrics = document["paths"]["/metrics"]["get"]
        assert (metrics["security"] == []) == bool(sections.get("server"))


def test_the_attachment_url_rule_is_the_published_one(app_for):
    client = app_for()
    pattern = client.simulate_get("/openapi.json", headers=auth()).json[
        "components"]["schemas"]["Attachment"]["properties"]["url"]["pattern"]
    for url, ok in (("https://example.com/a.jpg", True), ("HTTP://h:65535/?q#f", True),
                    ("http://h/é", True), ("http://h:65536/", False), (" http://h/", False),
                    ("http://h/a b", False), ("http://u@h/", False), ("ftp://h/", False),
                    ("http://[::1]/", False), ("http:///x", False)):
        body = dict(MESSAGE, attachments=[{"url": url}])
        status = client.simulate_post("/webhook/custom", json=body, headers=auth()).status_code
        assert (status == 200) == ok == bool(re.search(pattern, url)), url


def test_a_new_channel_is_a_class_its_config_keys_and_one_line_of_wiring(app_for, monkeypatch):
    """The channel seam: an SMS gateway's channel, as the next person would add
    it, gets its route, its part of /openapi.json and the turn loop, and nothing
    else in aibutler.py needs to know about it."""
    class SmsResource:
        def __init__(self, inbox):
            self.inbox = inbox

        def on_post(self, req, resp):
            message = {"user_id": req.get_header("X-From"), "message": req.media["text"]}
            status, body, _ = self.inbox.accept(message, wait=10, channel="sms")
            resp.status, resp.media = status, body

    class SmsChannel(aibutler.Channel):
        name = "sms"

        def routes(self, http):
            return [(self.settings.sms.path, SmsResource(http.inbox))]

        def openapi(self):
            return {"paths": {self.settings.sms.path: {"post": {
                "responses": {"200": {"description": "the reply"}}}}}}
    monkeypatch.setitem(aibutler.CONFIG_SCHEMA, "channels.sms",
                        {"path": ("/sms", aibutler.parse_path)})
    monkeypatch.setattr(aibutler, "CHANNELS", aibutler.CHANNELS + (SmsChannel,))
    client = app_for(channels={"active": "webhook, sms"})
    client.butler.start()
    document = client.simulate_get("/openapi.json", headers=auth()).json
    assert "/sms" in document["paths"] and "/webhook/custom" in document["paths"]
    answer = client.simulate_post("/sms", json={"text": "what is 6 * 7?"},
                                  headers={"X-From": "+15550001111"})
    assert (answer.status_code, answer.json["reply"]) == (200, "6 * 7 = 42")
    assert "/sms" not in app_for().simulate_get("/openapi.json", headers=auth()).json["paths"]  # not active
