"""Issue 24 ("Chat UIs in the browser"), streamed replies and CORS, through the
real daemon (aibutler.py copied alone and run as a subprocess):

- Accept: text/event-stream answers 200 text/event-stream: delta {"text"} in
  order, tool_call and tool_result as they happen, then one done whose data is
  the sync reply's object plus message_id (checked against the same message
  sent sync by a twin user), or one error with the usual error object.
- The model servers really stream: loopback fakes asked with "stream": true
  write server-sent events with flushes, held by threading.Events, so a delta
  that reaches the client while the model is still held proves nothing is
  buffered (OpenAI-compatible chunks, tool-call deltas split by index, a
  usage chunk with choices [], [DONE]; Anthropic's message_start ...
  message_stop with pings; the builtin agent word by word).
- Provider quirks: OpenRouter's error chunk (finish_reason "error"),
  Anthropic's `event: error` (overloaded_error), a stream cut before its final
  event: each an error event with the provider's message, never done.
- A client that leaves mid-stream loses nothing; an Idempotency-Key replay of
  a finished stream is one done event; quiet streams get `: keep-alive`
  comments ([channels.webhook] stream_keep_alive); <think> never streams.
- CORS for [channels.webhook] allowed_origins: preflights and every answer,
  errors, the status route and streams included; other origins get nothing.

Daemons are shared by the tests of this module (starting one costs about half
a second); each test has users of its own. Per-user tokens are minted here
with the daemon's key (test_tokens.py checks the `token` command and the
daemon against PyJWT)."""

import http.client
import itertools
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import aibutler
from conftest import SECRET, DaemonProcess, Recorder, openai_text

PATH = "/webhook/custom"
NO_LIMITS = "[limits]\nrate = 0\nuser_rate = 0\n"
ORIGIN = "https://chat.example.com"
WEBHOOK = (f"[channels.webhook]\nallowed_origins = {ORIGIN}, http://localhost:5173\n"
           "stream_keep_alive = 0.1s\n")
ERROR_KEYS = {"status", "title", "description"}
JSON = {"Content-Type": "application/json"}


# --- a model server that streams ------------------------------------------------

class Stream:
    """A streamed answer: parts written in order, each flushed at once. A part
    is bytes or str (written), a threading.Event (waited for), a number
    (seconds slept) or a callable (called)."""

    def __init__(self, *parts, content_type="text/event-stream"):
        self.parts = parts
        self.content_type = content_type


class StreamingModel(ThreadingHTTPServer):
    """A loopback model server answering from a script, one entry per request
    (the last repeated): a Stream, or (status, headers, body) whole. Records
    each request, and when each streamed part was written."""

    daemon_threads = True
    POLL = 0.02

    def __init__(self, answers=()):
        super().__init__(("127.0.0.1", 0), StreamingHandler)
        self.script = list(answers)
        self.requests = []
        self.written = []  # (time.monotonic(), bytes) of each streamed part
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.socket.settimeout(self.POLL)
        threading.Thread(target=self.serve_forever, args=(self.POLL,), daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def serve(self, *answers):
        """A new script, for the next requests."""
        self._release()
        with self.lock:
            self.script, self.requests, self.written = list(answers), [], []
        return self

    def next_answer(self, request):
        with self.lock:
            answer = self.script[min(len(self.requests), len(self.script) - 1)]
            self.requests.append(request)
            self.arrived.notify_all()
        return answer

    def wait_for(self, count, timeout=15):
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"expected {count} model requests, got {len(self.requests)}"
                self.arrived.wait(left)
            return list(self.requests)

    def _release(self):
        for answer in self.script:  # nothing stays held once its test is over
            for part in getattr(answer, "parts", ()):
                if isinstance(part, threading.Event):
                    part.set()

    def close(self):
        self._release()
        self.shutdown()
        self.server_close()


class StreamingHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = {"path": self.path, "headers": self.headers, "json": json.loads(body)}
        answer = self.server.next_answer(request)
        try:
            if not isinstance(answer, Stream):
                status, headers, data = answer
                data = json.dumps(data).encode() if isinstance(data, (dict, list)) else data
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_response(200)  # HTTP/1.0: the answer ends when the connection closes
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.flush()
            for part in answer.parts:
                if isinstance(part, threading.Event):
                    part.wait(20)
                elif isinstance(part, (int, float)):
                    time.sleep(part)
                elif callable(part):
                    part()
                else:
                    data = part.encode() if isinstance(part, str) else part
                    self.wfile.write(data)
                    self.wfile.flush()
                    self.server.written.append((time.monotonic(), data))
        except (BrokenPipeError, ConnectionResetError):
            pass


def whole(body):
    return (200, JSON, body)


def chunk(delta=None, finish=None, **top):
    """One OpenAI-compatible stream chunk, as a server-sent event."""
    data = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1,
            "model": "fake", "choices": [{"index": 0, "delta": delta or {},
                                          "finish_reason": finish}]}
    data.update(top)
    return f"data: {json.dumps(data)}\n\n"


USAGE = ("data: " + json.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk",
                                "choices": [], "usage": {"prompt_tokens": 9,
                                                         "completion_tokens": 3,
                                                         "total_tokens": 12}}) + "\n\n")
DONE = "data: [DONE]\n\n"


def openai_stream(*pieces, finish="stop"):
    """A whole OpenAI-compatible streamed answer: each str a content delta; an
    Event or a number among them holds the stream there."""
    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": p}) if isinstance(p, str) else p for p in pieces]
    return Stream(*parts, chunk({}, finish), USAGE, DONE)


class Raw(str):
    """An event written as it is, among text pieces."""


def anthropic_event(name, data):
    return Raw(f"event: {name}\ndata: {json.dumps(dict(data, type=name))}\n\n")


PING = anthropic_event("ping", {})
MESSAGE_START = anthropic_event("message_start", {"message": {
    "id": "msg_s", "type": "message", "role": "assistant", "model": "claude-fake",
    "content": [], "stop_reason": None, "usage": {"input_tokens": 9, "output_tokens": 1}}})


def anthropic_text_block(index, *pieces):
    """content_block_start, a text_delta for each str piece (Raw events, Events
    and numbers as they are), content_block_stop."""
    parts = [anthropic_event("content_block_start", {
        "index": index, "content_block": {"type": "text", "text": ""}})]
    parts += [anthropic_event("content_block_delta", {
        "index": index, "delta": {"type": "text_delta", "text": p}})
        if isinstance(p, str) and not isinstance(p, Raw) else p for p in pieces]
    return parts + [anthropic_event("content_block_stop", {"index": index})]


def anthropic_end(stop_reason):
    return [anthropic_event("message_delta", {"delta": {"stop_reason": stop_reason,
                                                        "stop_sequence": None},
                                              "usage": {"output_tokens": 7}}),
            anthropic_event("message_stop", {})]


# --- clients ------------------------------------------------------------------------

class EventReader:
    """POST with Accept: text/event-stream, read as it comes: events(), or
    next_event() one at a time; raw holds every line read, comments included.
    `source`: the client's loopback address (auth failures count per address)."""

    def __init__(self, d, body, headers=None, secret=True, path=PATH, timeout=20,
                 source="127.0.0.1"):
        self.conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=timeout,
                                               source_address=(source, 0))
        all_headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if secret:
            all_headers["X-Aibutler-Secret"] = SECRET
        all_headers.update(headers or {})
        self.conn.request("POST", path, json.dumps(body).encode(), all_headers)
        self.sock = self.conn.sock
        self.response = self.conn.getresponse()
        self.status, self.headers = self.response.status, self.response.headers
        self.raw = []

    @property
    def is_stream(self):
        return (self.headers["Content-Type"] or "").startswith("text/event-stream")

    def body(self):
        return json.loads(self.response.read())

    def line(self):
        """The next line, or None at the end of the stream."""
        line = self.response.readline()
        if not line:
            return None
        self.raw.append(line.decode().rstrip("\r\n"))
        return self.raw[-1]

    def next_event(self):
        """(event, data as parsed JSON), or None once the stream has ended."""
        event, data = "message", []
        while True:
            line = self.line()
            if line is None:
                return None
            if not line:
                if data:
                    return event, json.loads("\n".join(data))
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)

    def events(self):
        found = []
        for item in iter(self.next_event, None):
            found.append(item)
        return found

    def leave(self):
        """The client goes away mid-stream (a closed tab)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.response.close()
        self.conn.close()


def request(d, method, path, headers=None, body=None, source="127.0.0.1"):
    """(status, headers, raw body) of any request."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=20,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def deltas(events):
    return [data["text"] for name, data in events if name == "delta"]


def names(events):
    return [name for name, _ in events]


def bearer(d, user):
    """A per-user token for `user`, signed with this daemon's key."""
    key = d.vault.get(aibutler.TOKEN_SECRET_NAME)
    return {"Authorization": "Bearer " + aibutler.mint_token(key, user, 600)}


def no_trouble(d):
    assert "Traceback" not in d.log and " 500 " not in d.log, d.log


# --- shared daemons ---------------------------------------------------------------

@pytest.fixture(scope="module")
def daemons(tmp_path_factory):
    """Two fake model servers and three daemons: openai (sync mode) and
    anthropic (async mode: callbacks to a receiver), both with CORS and a 0.1 s
    keep-alive; builtin (sync, no CORS)."""
    openai_model, anthropic_model, callbacks = StreamingModel(), StreamingModel(), Recorder()
    started = {}
    try:
        for name, config in (
                ("openai", f"[agent]\nprovider = openai\nbase_url = {openai_model.url}\n"
                           + NO_LIMITS + WEBHOOK),
                ("anthropic", f"[agent]\nprovider = anthropic\nbase_url = "
                              f"{anthropic_model.url}\n" + NO_LIMITS + WEBHOOK
                              + f"outbound_url = {callbacks.url}\n"),
                ("builtin", NO_LIMITS)):
            started[name] = DaemonProcess(tmp_path_factory.mktemp(name), config)
        starting = [threading.Thread(target=d.start) for d in started.values()]
        for thread in starting:  # at once: each compiles aibutler.py for a while
            thread.start()
        for thread in starting:
            thread.join(30)
        assert all(getattr(d, "port", None) for d in started.values()), "a daemon did not start"
        started["openai"].model = openai_model
        started["anthropic"].model = anthropic_model
        started["anthropic"].callbacks = callbacks
        yield started
    finally:
        for d in started.values():
            d.kill()
        openai_model.close()
        anthropic_model.close()
        callbacks.close()


USERS = itertools.count()


@pytest.fixture
def users():
    """Fresh user ids for one test: users("ann") -> "ann-17"."""
    number = next(USERS)
    return lambda name="ann": f"{name}-{number}"


@pytest.fixture
def openai(daemons):
    daemons["openai"].model.serve()
    return daemons["openai"]


@pytest.fixture
def anthropic(daemons):
    daemons["anthropic"].model.serve()
    return daemons["anthropic"]


# --- streamed replies ---------------------------------------------------------------

def test_openai_stream_is_real_and_done_is_the_sync_reply(openai, users):
    more = threading.Event()
    openai.model.serve(openai_stream("Hel", "lo", more, " wor", "ld."),
                       whole(openai_text("Hello world.")))
    stream = EventReader(openai, {"user_id": users(), "message": "hi"})
    assert stream.status == 200 and stream.is_stream
    first = [stream.next_event(), stream.next_event()]
    # the model is still holding the rest: these deltas were not buffered anywhere
    assert first == [("delta", {"text": "Hel"}), ("delta", {"text": "lo"})]
    assert not more.is_set()
    more.set()
    events = first + stream.events()
    assert names(events) == ["delta"] * 4 + ["done"]
    done = events[-1][1]
    assert "".join(deltas(events)) == done["reply"] == "Hello world."
    assert stream.headers["Location"] == f"{PATH}/messages/{done['message_id']}"
    asked = openai.model.wait_for(1)[0]["json"]
    assert asked["stream"] is True and asked["messages"][-1]["content"] == "hi"
    # the same message sent sync by a twin user: done is that object plus message_id
    status, _, sync = openai.post({"user_id": users("twin"), "message": "hi"})
    assert status == 200 and "stream" not in openai.model.requests[1]["json"]
    assert set(done) == set(sync) | {"message_id"}
    assert {k: v for k, v in done.items() if k not in ("message_id", "session_id")} == \
        {k: v for k, v in sync.items() if k != "session_id"}
    # the status route has the same reply
    status, _, state = openai.get(stream.headers["Location"], {"X-Aibutler-Secret": SECRET})
    assert status == 200 and state["status"] == "done" and state["reply"] == "Hello world."
    assert state["session_id"] == done["session_id"]
    no_trouble(openai)


def test_openai_tool_call_deltas_split_by_index_are_assembled(openai, users):
    calls = Stream(
        chunk({"role": "assistant", "content": "Let me "}),
        chunk({"content": "work it out."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "calculate", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"expre"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "calculate", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{\"expression\""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "ssion\": \"17*"}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": ": \"2+2\"}"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "23\"}"}}]}),
        chunk({}, "tool_calls"), USAGE, DONE)
    whole_calls = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me work it out.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {
                "name": "calculate", "arguments": "{\"expression\": \"17*23\"}"}},
            {"id": "call_b", "type": "function", "function": {
                "name": "calculate", "arguments": "{\"expression\": \"2+2\"}"}}]}}]}
    openai.model.serve(calls, openai_stream("391 and ", "4."), whole(whole_calls),
                       whole(openai_text("391 and 4.")))
    events = EventReader(openai, {"user_id": users(), "message": "17*23 and 2+2?"}).events()
    assert names(events) == ["delta", "delta", "tool_call", "tool_result", "tool_call",
                             "tool_result", "delta", "delta", "delta", "done"]
    assert events[2][1] == {"name": "calculate", "arguments": {"expression": "17*23"}}
    assert events[3][1]["result"] == {"expression": "17*23", "value": 391}
    assert events[4][1] == {"name": "calculate", "arguments": {"expression": "2+2"}}
    assert events[5][1]["result"]["value"] == 4
    done = events[-1][1]
    assert "".join(deltas(events)) == done["reply"] == "Let me work it out.\n\n391 and 4."
    assert done["tool_calls"] == [events[3][1], events[5][1]]
    second = openai.model.wait_for(2)[1]["json"]
    assert second["stream"] is True
    assistant = [m for m in second["messages"] if m.get("tool_calls")][0]
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in assistant["tool_calls"]] == [
        ("call_a", "calculate", {"expression": "17*23"}),
        ("call_b", "calculate", {"expression": "2+2"})]
    results = {m["tool_call_id"]: json.loads(m["content"]) for m in second["messages"]
               if m["role"] == "tool"}
    assert results == {"call_a": {"expression": "17*23", "value": 391},
                       "call_b": {"expression": "2+2", "value": 4}}
    status, _, sync = openai.post({"user_id": users("twin"), "message": "17*23 and 2+2?"})
    assert status == 200 and set(done) == set(sync) | {"message_id"}
    assert done["reply"] == sync["reply"] and done["tool_calls"] == sync["tool_calls"]
    no_trouble(openai)


def test_anthropic_stream_with_pings_text_and_tool_use(anthropic, users):
    more = threading.Event()
    first = Stream(MESSAGE_START, PING,
                   *anthropic_text_block(0, "Let me", PING, more, " check."),
                   anthropic_event("content_block_start", {"index": 1, "content_block": {
                       "type": "tool_use", "id": "toolu_1", "name": "calculate",
                       "input": {}}}),
                   *[anthropic_event("content_block_delta", {"index": 1, "delta": {
                       "type": "input_json_delta", "partial_json": piece}})
                     for piece in ("", "{\"expres", "sion\": ", "\"6*7\"}")],
                   PING, anthropic_event("content_block_stop", {"index": 1}),
                   *anthropic_end("tool_use"))
    second = Stream(MESSAGE_START, *anthropic_text_block(0, "It is ", "42."), PING,
                    *anthropic_end("end_turn"))
    anthropic.model.serve(first, second)
    stream = EventReader(anthropic, {"user_id": users(), "message": "6*7?"})
    assert stream.status == 200 and stream.is_stream
    assert stream.next_event() == ("delta", {"text": "Let me"})
    more.set()  # that delta came while the model was held
    events = [("delta", {"text": "Let me"})] + stream.events()
    assert names(events) == ["delta", "delta", "tool_call", "tool_result", "delta", "delta",
                             "delta", "done"]
    assert events[2][1] == {"name": "calculate", "arguments": {"expression": "6*7"}}
    assert events[3][1]["result"] == {"expression": "6*7", "value": 42}
    done = events[-1][1]
    assert "".join(deltas(events)) == done["reply"] == "Let me check.\n\nIt is 42."
    assert set(done) == {"reply", "session_id", "tool_calls", "message_id"}
    requests = anthropic.model.wait_for(2)
    assert all(r["json"]["stream"] is True for r in requests)
    assistant = requests[1]["json"]["messages"][1]
    assert assistant["role"] == "assistant" and assistant["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "calculate",
         "input": {"expression": "6*7"}}]
    result = requests[1]["json"]["messages"][2]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "toolu_1"
    no_trouble(anthropic)


def test_builtin_agent_streams_word_by_word(daemons, users):
    d = daemons["builtin"]
    stream = EventReader(d, {"user_id": users(), "message": "what is 17 * 23?"})
    assert stream.status == 200 and stream.is_stream
    events = stream.events()
    assert names(events)[:2] == ["tool_call", "tool_result"] and names(events)[-1] == "done"
    done = events[-1][1]
    pieces = deltas(events)
    assert "".join(pieces) == done["reply"] and "391" in done["reply"]
    assert len(pieces) == len(done["reply"].split()) > 3
    # a word each (with the space before it: trailing space waits for what follows)
    assert all(re.fullmatch(r"\s?\S+", piece) for piece in pieces), pieces
    status, _, sync = d.post({"user_id": users("twin"), "message": "what is 17 * 23?"})
    assert status == 200 and set(done) == set(sync) | {"message_id"}
    assert done["reply"] == sync["reply"] and done["tool_calls"] == sync["tool_calls"]


def test_think_blocks_are_never_streamed(openai, users):
    openai.model.serve(openai_stream(
        "<thi", "nk>The user greets me; sec", "ret plan.</thi", "nk>\n\nHel", "lo <",
        "b>there</b> ", "<think>more hid", "den</think>", "and bye."))
    events = EventReader(openai, {"user_id": users(), "message": "hi"}).events()
    assert names(events)[-1] == "done"
    assert "".join(deltas(events)) == events[-1][1]["reply"] == "Hello <b>there</b> and bye."
    for delta in deltas(events):
        assert "think" not in delta and "secret" not in delta and "hidden" not in delta


def test_a_hermes_tool_call_written_as_text_is_run_not_streamed(openai, users):
    openai.model.serve(openai_stream("Checking.", " <tool_", "call>{\"name\": \"calculate\", "
                                     "\"arguments\": {\"expression\": \"2+3\"}}</tool_call>"),
                       openai_stream("It is ", "5."))
    events = EventReader(openai, {"user_id": users(), "message": "2+3?"}).events()
    assert names(events) == ["delta", "tool_call", "tool_result", "delta", "delta", "delta",
                             "done"]
    assert "".join(deltas(events)) == events[-1][1]["reply"] == "Checking.\n\nIt is 5."
    assert events[2][1]["result"]["value"] == 5


def test_an_openai_refusal_streams_as_the_sync_reply_has_it(openai, users):
    """OpenAI streams a refusal as delta.refusal pieces; a sync answer has
    message.refusal, which the daemon gives as the reply."""
    refusal = "I'm sorry, I can't help with that."
    openai.model.serve(
        Stream(chunk({"role": "assistant", "content": None, "refusal": ""}),
               chunk({"refusal": "I'm sorry, "}), chunk({"refusal": "I can't help with that."}),
               chunk({}, "stop"), USAGE, DONE),
        whole({"choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": None, "refusal": refusal}}]}))
    events = EventReader(openai, {"user_id": users(), "message": "something bad"}).events()
    status, _, sync = openai.post({"user_id": users("twin"), "message": "something bad"})
    assert status == 200 and sync["reply"] == refusal
    assert names(events)[-1] == "done"
    assert events[-1][1]["reply"] == sync["reply"], events


def test_an_anthropic_refusal_mid_stream_replaces_what_the_deltas_showed(anthropic, users):
    """Claude's streaming classifiers may stop a reply already begun with
    stop_reason "refusal": what was streamed cannot be taken back, so done says
    refused: true and its reply (the note alone) replaces it, as the README
    says; the refused exchange is not kept in history."""
    anthropic.model.serve(Stream(MESSAGE_START, *anthropic_text_block(0, "Sure, here is ",
                                                                      "how to "),
                                 *anthropic_end("refusal")))
    events = EventReader(anthropic, {"user_id": users(), "message": "something bad"}).events()
    assert names(events)[-1] == "done"
    done = events[-1][1]
    assert done.get("refused") is True and done["reply"] == "(the model declined to answer)"
    assert "".join(deltas(events)) == "Sure, here is how to", events


MID_STREAM_FAILURES = {
    # OpenRouter: an error chunk beside the choices, finish_reason "error"
    "openrouter-error-chunk": ("openai", "Provider disconnected unexpectedly", Stream(
        chunk({"role": "assistant", "content": "Par"}), chunk({"content": "tial"}),
        chunk({"content": ""}, "error", error={
            "code": 502, "message": "Provider disconnected unexpectedly"}), DONE)),
    # Anthropic: event: error, overloaded_error, after some text
    "anthropic-overloaded": ("anthropic", "Overloaded", Stream(
        MESSAGE_START, *anthropic_text_block(0, "Par", "tial")[:3], PING,
        anthropic_event("error", {"error": {"type": "overloaded_error",
                                            "message": "Overloaded"}}))),
    # no finish_reason, no [DONE]: the connection just closes
    "openai-cut-short": ("openai", "ended before the reply did", Stream(
        chunk({"role": "assistant", "content": "Par"}), chunk({"content": "tial"}))),
    # no message_delta, no message_stop
    "anthropic-cut-short": ("anthropic", "ended before the reply did", Stream(
        MESSAGE_START, *anthropic_text_block(0, "Par", "tial"))),
}


@pytest.mark.parametrize("case", sorted(MID_STREAM_FAILURES))
def test_a_model_failing_mid_stream_ends_with_error_not_done(daemons, users, case):
    provider, message, answer = MID_STREAM_FAILURES[case]
    d = daemons[provider]
    d.model.serve(answer)
    stream = EventReader(d, {"user_id": users(), "message": "hi"})
    assert stream.status == 200 and stream.is_stream
    events = stream.events()
    assert names(events) == ["delta", "delta", "error"], events
    assert "".join(deltas(events)) == "Partial"
    error = events[-1][1]
    assert set(error) == {"error"} and set(error["error"]) == ERROR_KEYS
    assert error["error"]["status"] == 502 and message in error["error"]["description"]
    assert d.model.requests[0]["json"]["stream"] is True
    status, _, state = d.get(stream.headers["Location"], {"X-Aibutler-Secret": SECRET})
    assert status == 200 and state["status"] == "failed" and state["error"] == error["error"]
    no_trouble(d)


BEFORE_ANY_TEXT = {
    # OpenRouter's rate limit inside a 200 (code 429), before a word was written:
    # a sync turn retries it (test_model_servers.py), so may a streamed one
    "error chunk": Stream(chunk({"role": "assistant", "content": ""}),
                          chunk({"content": ""}, "error", error={
                              "code": 429, "message": "Rate limit exceeded upstream"}), DONE),
    # the connection closes before any text: a sync answer cut short is retried
    "cut short": Stream(chunk({"role": "assistant", "content": ""})),
}


@pytest.mark.parametrize("case", sorted(BEFORE_ANY_TEXT))
def test_a_stream_failing_before_any_text_is_retried_like_a_sync_turn(openai, users, case):
    """HTTPModel.stream: "Retried as post() is while no text went out"."""
    openai.model.serve(BEFORE_ANY_TEXT[case], openai_stream("Second ", "try."))
    events = EventReader(openai, {"user_id": users(), "message": "hi"}).events()
    assert names(events)[-1] == "done", events
    assert events[-1][1]["reply"] == "Second try." and len(openai.model.requests) == 2


def test_a_client_that_leaves_mid_stream_loses_nothing(openai, users):
    more = threading.Event()
    openai.model.serve(openai_stream("Your locker ", more, "is ", "42."),
                       whole(openai_text("Still 42.")))
    ann = bearer(openai, users())
    stream = EventReader(openai, {"message": "where is my locker?"}, ann, secret=False)
    assert stream.status == 200 and stream.next_event() == ("delta", {"text": "Your locker"})
    location = stream.headers["Location"]
    stream.leave()
    more.set()
    # the turn finished without its reader; its reply is at the status URL
    status, _, state = openai.get(location + "?wait=10", ann)
    assert status == 200 and state["status"] == "done", state
    assert state["reply"] == "Your locker is 42." and state["user_id"] == users()
    # ... for its user only
    assert openai.get(location, bearer(openai, users("bob")))[0] == 404
    # and the exchange is in its history: the next turn's model request has it
    status, _, body = openai.post({"message": "and again?"}, ann, secret=False)
    assert status == 200 and body["session_id"] == state["session_id"]
    history = openai.model.wait_for(2)[1]["json"]["messages"]
    assert [(m["role"], m["content"]) for m in history[1:]] == [
        ("user", "where is my locker?"), ("assistant", "Your locker is 42."),
        ("user", "and again?")]
    no_trouble(openai)


def test_in_async_mode_a_client_that_leaves_mid_stream_gets_its_callback(anthropic, users):
    """The reply a stream could not hand over goes where a 202 sends it: to
    [channels.webhook] outbound_url (the daemon's docstring says as much)."""
    more = threading.Event()
    anthropic.model.serve(Stream(MESSAGE_START, *anthropic_text_block(0, "Your locker ", more,
                                                                       "is 42."),
                                 *anthropic_end("end_turn")))
    stream = EventReader(anthropic, {"user_id": users(), "message": "where is my locker?"})
    assert stream.status == 200 and stream.next_event() == ("delta", {"text": "Your locker"})
    message_id = stream.headers["Location"].rsplit("/", 1)[1]
    stream.leave()
    more.set()  # the turn finishes right after its reader left
    status, _, state = anthropic.get(stream.headers["Location"] + "?wait=10",
                                     {"X-Aibutler-Secret": SECRET})
    assert state["status"] == "done" and state["reply"] == "Your locker is 42."

    def called_back():
        return [r["json"] for r in anthropic.callbacks.requests
                if (r["json"] or {}).get("message_id") == message_id]
    deadline = time.monotonic() + 2
    while not called_back() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert called_back() and called_back()[0]["reply"] == "Your locker is 42.", (
        f"no callback for {message_id}; status route: {state}")


def test_an_idempotent_replay_of_a_finished_stream_is_one_done_event(openai, users):
    openai.model.serve(openai_stream("Hello ", "there."))
    key, user = {"Idempotency-Key": "chat-1"}, users()
    events = EventReader(openai, {"user_id": user, "message": "hi"}, key).events()
    assert names(events)[-1] == "done"
    done = events[-1][1]
    again = EventReader(openai, {"user_id": user, "message": "hi"}, key)
    assert again.status == 200 and again.is_stream
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == f"{PATH}/messages/{done['message_id']}"
    assert again.events() == [("done", done)]
    assert len(openai.model.requests) == 1  # the model was not asked again


def test_a_json_replay_of_a_finished_stream_is_the_finished_reply(openai, users):
    openai.model.serve(openai_stream("Hello ", "there."))
    key, user = {"Idempotency-Key": "chat-1"}, users()
    done = EventReader(openai, {"user_id": user, "message": "hi"}, key).events()[-1][1]
    status, headers, body = openai.post({"user_id": user, "message": "hi"}, key)
    assert headers["Idempotent-Replayed"] == "true" and len(openai.model.requests) == 1
    assert (status, body) == (200, done), "a JSON replay of a finished stream"


def test_a_quiet_stream_gets_keep_alive_comments(openai, users):
    more = threading.Event()
    openai.model.serve(openai_stream(more, "Finally."))
    stream = EventReader(openai, {"user_id": users(), "message": "hi"})
    assert stream.status == 200 and stream.is_stream
    while stream.raw.count(": keep-alive") < 2:  # [channels.webhook] stream_keep_alive = 0.1s
        assert stream.line() in (": keep-alive", ""), stream.raw
    more.set()
    events = stream.events()
    assert names(events) == ["delta", "done"] and events[-1][1]["reply"] == "Finally."


def test_a_stream_refused_before_it_starts_is_a_json_error(daemons, users):
    d = daemons["builtin"]
    stream = EventReader(d, {"user_id": users(), "message": ""})
    assert stream.status == 422 and not stream.is_stream
    assert stream.body()["error"]["field"] == "message"
    stream = EventReader(d, {"user_id": users(), "message": "hi"}, secret=False,
                         source="127.0.0.9")
    assert stream.status == 401 and not stream.is_stream
    assert set(stream.body()["error"]) == ERROR_KEYS


# --- CORS ---------------------------------------------------------------------------

ALLOWED_HEADERS = {"authorization", "content-type", "idempotency-key", "prefer"}
EXPOSED = {"location", "preference-applied", "idempotent-replayed"}


def listed(value):
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


def varies_by_origin(headers):
    return "origin" in listed(", ".join(headers.get_all("Vary") or []))


def assert_cors(headers, origin=ORIGIN):
    assert headers["Access-Control-Allow-Origin"] == origin
    assert varies_by_origin(headers)
    assert EXPOSED <= listed(headers["Access-Control-Expose-Headers"])
    assert headers["Access-Control-Allow-Credentials"] is None  # tokens, not cookies


def no_cors(headers):
    return not [name for name in headers if name.lower().startswith("access-control-")]


def test_preflights_from_an_allowed_origin(openai):
    for origin in (ORIGIN, "http://localhost:5173"):
        for path in (PATH, f"{PATH}/messages/msg-x"):
            status, headers, _ = request(openai, "OPTIONS", path, {
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, "
                                                  "idempotency-key, prefer"})
            assert 200 <= status < 300
            assert headers["Access-Control-Allow-Origin"] == origin
            assert varies_by_origin(headers)
            assert {"get", "post"} <= listed(headers["Access-Control-Allow-Methods"])
            assert ALLOWED_HEADERS <= listed(headers["Access-Control-Allow-Headers"])


def test_every_answer_to_an_allowed_origin_carries_cors_headers(openai, users):
    openai.model.serve(openai_stream("Hi ", "there."), whole(openai_text("Later.")))
    page = dict(JSON, Origin=ORIGIN)
    ann = dict(page, **bearer(openai, users()))
    answers = {  # each error the page may meet
        401: request(openai, "POST", PATH, page, {"user_id": "a", "message": "hi"},
                     source="127.0.0.10"),
        "401 token": request(openai, "POST", PATH, dict(page, Authorization="Bearer x.y.z"),
                             {"message": "hi"}, source="127.0.0.10"),
        403: request(openai, "POST", PATH, ann, {"user_id": "someone-else", "message": "hi"}),
        422: request(openai, "POST", PATH, ann, {"message": ""}),
        404: request(openai, "GET", f"{PATH}/messages/msg-nope", ann),
        415: request(openai, "POST", PATH, dict(ann, **{"Content-Type": "text/plain"}),
                     {"message": "hi"}),
    }
    for expected, (status, headers, _) in answers.items():
        assert status == int(str(expected)[:3])
        assert_cors(headers)
    # a streamed answer, then its status route
    stream = EventReader(openai, {"message": "hi"}, ann, secret=False)
    assert stream.status == 200 and stream.is_stream
    assert_cors(stream.headers)
    assert names(stream.events())[-1] == "done"
    status, headers, data = request(openai, "GET", stream.headers["Location"], ann)
    assert status == 200 and json.loads(data)["reply"] == "Hi there."
    assert_cors(headers)
    # a 202 whose Location and Preference-Applied the page may read
    status, headers, _ = request(openai, "POST", PATH, dict(ann, Prefer="respond-async"),
                                 {"message": "again"})
    assert status == 202 and headers["Location"] and headers["Preference-Applied"]
    assert_cors(headers)


def test_other_origins_get_no_cors_headers(daemons, users):
    d = daemons["openai"]
    d.model.serve(whole(openai_text("Hello.")))
    for origin in ("https://evil.example.com", "https://chat.example.com.evil.net",
                   "http://chat.example.com", "https://chat.example.com:8443", "null"):
        answers = [
            request(d, "OPTIONS", PATH, {"Origin": origin,
                                         "Access-Control-Request-Method": "POST"}),
            request(d, "POST", PATH, dict(JSON, Origin=origin, **bearer(d, users())),
                    {"message": "hi"}),
            request(d, "POST", PATH, dict(JSON, Origin=origin),
                    {"user_id": "ann", "message": "hi"}, source="127.0.0.11"),
        ]
        assert [status for status, _, _ in answers][1:] == [200, 401]
        assert all(no_cors(headers) for _, headers, _ in answers), origin
    # a daemon without allowed_origins sends none either
    _, headers, _ = request(daemons["builtin"], "OPTIONS", PATH, {
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert no_cors(headers)
