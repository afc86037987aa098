"""Every model server, round two: loopback fakes shaped like each provider's
published documentation, and a real daemon (aibutler.py run as a subprocess)
talking to them through a sync POST /webhook/custom (and one async callback).

Where each shape comes from:
- DeepSeek, "Thinking Mode" guide (api-docs.deepseek.com/guides/thinking_mode):
  reasoning_content sits beside content/tool_calls; for a turn with tool calls
  it must be passed back, else HTTP 400 "The reasoning_content in the thinking
  mode must be passed back to the API."
- Gemini, "Thought signatures" (ai.google.dev/gemini-api/docs/thought-signatures)
  and its OpenAI compatibility: tool_calls[i].extra_content.google.thought_signature,
  only the first of parallel calls is signed; a missing one is a 400 whose body
  is Gemini's JSON *array* [{"error": {code, message, status}}].
- OpenRouter, "Errors and debugging" and the API reference (NonStreamingChoice):
  an error while the model writes comes in a 200, as choices[].error {code,
  message} with finish_reason "error" (the streaming form puts `error` at the
  top level beside choices); other errors are {"error": {code, message}} with
  code the HTTP status (429: rate limited).
- LM Studio answers an unknown route with 200 {"error": "Unexpected endpoint or
  method. (POST /...)"} (lmstudio-bug-tracker #618); its base URL is
  http://localhost:1234/v1, Ollama's http://localhost:11434/v1.
- vLLM (FastAPI) answers an unknown route 404 {"detail": "Not Found"}.
- llama.cpp's llama-server refuses a conversation whose assistant tool call
  arguments are not JSON: 500 "Failed to parse tool call arguments as JSON: ...".
- Mistral refuses tool call ids other than 9 characters a-z, A-Z, 0-9 ("Tool
  call id was X but must be a-z, A-Z, 0-9, with a length of 9.").
- Anthropic, "Stop reasons and fallback": refusal, pause_turn (send the
  assistant content back to continue), model_context_window_exceeded (treat
  the response as truncated).
"""

import http
import json
import re
import socketserver
import threading
import time
import uuid

import pytest

from conftest import DaemonProcess, Recorder, ok, openai_text

OPENAI_KEY = "sk-openai-test-key-never-logged-4242"
ANTHROPIC_KEY = "sk-ant-test-key-never-logged-4343"
ENV = {"AIBUTLER_OPENAI_API_KEY": OPENAI_KEY, "AIBUTLER_ANTHROPIC_API_KEY": ANTHROPIC_KEY}
NINE_ALNUM = re.compile(r"[A-Za-z0-9]{9}")

CUT = "cut"    # headers promise more than is sent, then the connection closes
DROP = "drop"  # the request is read, then the connection closes with no answer


# --- a loopback model server that can also misbehave ------------------------------

class ModelServer(socketserver.ThreadingTCPServer):
    """A raw HTTP/1.1 server on 127.0.0.1: records each request ({method, path,
    headers, body, json}) and answers from a script, the last entry repeated.
    An entry is (status, headers, body, delay) as conftest's `ok` makes, a
    callable taking the request, CUT or DROP."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ModelHandler)
        self.lock = threading.Lock()
        self.requests = []
        self.script = [ok(openai_text("hello"))]
        threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self, *script):
        with self.lock:
            self.requests = []
            self.script = list(script)

    def next_answer(self, request):
        with self.lock:
            answer = self.script[min(len(self.requests), len(self.script) - 1)]
            self.requests.append(request)
        return answer(request) if callable(answer) else answer

    def close(self):
        self.shutdown()
        self.server_close()


class ModelHandler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline(65537).decode("latin-1")
        if not line.strip():
            return
        method, path = line.split()[:2]
        headers = {}
        while True:
            header = self.rfile.readline(65537).decode("latin-1")
            if header in ("\r\n", "\n", ""):
                break
            name, _, value = header.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.rfile.read(int(headers.get("content-length") or 0))
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        answer = self.server.next_answer({"method": method, "path": path, "headers": headers,
                                          "body": body, "json": parsed})
        if answer == DROP:
            return  # closed without a status line
        if answer == CUT:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 4000\r\nConnection: close\r\n\r\n"
                             b'{"id": "chatcmpl-1", "object": "chat.comp')
            return
        status, answer_headers, data, delay = answer
        if delay:
            time.sleep(delay)
        if isinstance(data, (dict, list)):
            data = json.dumps(data).encode()
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
        lines += [f"{name}: {value}" for name, value in answer_headers.items()]
        lines += [f"Content-Length: {len(data)}", "Connection: close", "", ""]
        self.wfile.write("\r\n".join(lines).encode("latin-1") + data)


# --- daemons: one per provider and base_url, shared by the tests of this module -----

def agent_config(provider, base_url, extra=""):
    return (f"[agent]\nprovider = {provider}\nbase_url = {base_url}\nmodel = test-model\n"
            f"timeout = 20s\n[limits]\nrate = 0\nuser_rate = 0\n{extra}")


@pytest.fixture(scope="module")
def fakes():
    servers = {"openai": ModelServer(), "anthropic": ModelServer()}
    yield servers
    for server in servers.values():
        server.close()


@pytest.fixture(scope="module")
def daemons(tmp_path_factory, fakes):
    """daemons(name): a started daemon. All of them start together on first use
    (in parallel: a start takes a third of a second), and stop at the end of the
    module; one that fails to start fails only the tests that use it."""
    callbacks = Recorder([(200, {}, b"", 0)])
    openai, anthropic = fakes["openai"].url, fakes["anthropic"].url
    configs = {
        "openai": agent_config("openai", openai + "/v1"),
        "anthropic": agent_config("anthropic", anthropic),
        # vLLM, Ollama, LM Studio without the /v1 their docs give
        "openai-root": agent_config("openai", openai),
        "openai-endpoint": agent_config("openai", openai + "/v1/chat/completions"),
        "anthropic-v1": agent_config("anthropic", anthropic + "/v1"),
        "anthropic-endpoint": agent_config("anthropic", anthropic + "/v1/messages/"),
        "openai-async": agent_config("openai", openai + "/v1", "[channels.webhook]\n"
                                     f"outbound_url = {callbacks.url}/hook\n"),
    }
    made = {name: DaemonProcess(tmp_path_factory.mktemp(name), config, env=ENV)
            for name, config in configs.items()}
    started = {}

    def start(name):
        try:
            started[name] = made[name].start()
        except BaseException as exc:  # noqa: BLE001 - reported by the test that needs it
            started[name] = exc

    def get(name):
        if not started:
            threads = [threading.Thread(target=start, args=(n,)) for n in made]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        d = started.get(name, AssertionError(f"the {name} daemon did not start in 30 s"))
        if isinstance(d, BaseException):
            raise d
        d.callbacks = callbacks
        return d
    yield get
    running = [d for d in made.values() if d.proc and d.proc.poll() is None]
    for d in running:
        d.proc.terminate()
    for d in running:
        d.wait()
    callbacks.close()


@pytest.fixture
def user():
    return "u-" + uuid.uuid4().hex[:12]


def ask(d, user, message="hello"):
    status, _, body = d.post({"user_id": user, "message": message})
    return status, body


def description(body):
    return body["error"]["description"]


# --- answers shaped like each provider's documentation -------------------------------

def openai_message(message, finish="stop"):
    return {"id": "chatcmpl-9", "object": "chat.completion", "created": 1767225600,
            "model": "test-model", "choices": [{"index": 0, "finish_reason": finish,
                                                "message": dict({"role": "assistant"},
                                                                **message)}]}


def tool_call(name, arguments, call_id="call_1", **extra):
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return dict({"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": args}}, **extra)


def anthropic_message(content, stop):
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "test-model",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5}}


def openai_error(status, message, kind="invalid_request_error"):
    return (status, {"Content-Type": "application/json"},
            {"error": {"message": message, "type": kind, "param": None, "code": None}}, 0)


def assistant_calls(request):
    return [m for m in request["json"]["messages"]
            if m["role"] == "assistant" and m.get("tool_calls")]


# --- 1. DeepSeek thinking mode ------------------------------------------------------

REASONING = "SECRET-REASONING: the user wants 2+2, so I will call calculate."


def test_deepseek_reasoning_content_goes_back_within_the_turn_only(daemons, fakes, user):
    first = openai_message({"content": "", "reasoning_content": REASONING,
                            "tool_calls": [tool_call("calculate", {"expression": "2+2"})]},
                           "tool_calls")

    def deepseek(request):  # DeepSeek's own check on every request
        for message in assistant_calls(request):
            if not message.get("reasoning_content"):
                return openai_error(400, "The reasoning_content in the thinking mode must be "
                                         "passed back to the API.")
        return ok(openai_message({"content": "2+2 is 4.",
                                  "reasoning_content": "SECRET-REASONING: done."}))
    fake = fakes["openai"]
    fake.reset(ok(first), deepseek)
    d = daemons("openai")
    status, body = ask(d, user, "what is 2+2?")
    assert status == 200, body
    assert body["reply"] == "2+2 is 4."
    assert body["tool_calls"][0]["result"] == {"expression": "2+2", "value": 4}
    assert "SECRET-REASONING" not in json.dumps(body)  # reply and tool_calls alike
    follow_up = fake.requests[1]["json"]
    assert assistant_calls(fake.requests[1])[0]["reasoning_content"] == REASONING
    assert follow_up["messages"][-1]["role"] == "tool"

    status, body = ask(d, user, "and 3+3?")  # the next turn: history, no reasoning
    assert status == 200, body
    next_turn = fake.requests[2]["json"]["messages"]
    assert "SECRET-REASONING" not in json.dumps(next_turn)
    assert [m["role"] for m in next_turn] == ["system", "user", "assistant", "user"]
    assert next_turn[2]["content"] == "2+2 is 4."


# --- 2. Gemini 3 thought signatures over the OpenAI compatibility -------------------

SIGNATURE = "CiQBVKhc7vB3xq0nE1gq+Sig/A=="


def test_gemini_thought_signature_comes_back_unchanged_on_its_tool_call(daemons, fakes, user):
    signed = {"google": {"thought_signature": SIGNATURE}}
    # parallel calls: only the first one carries the signature (Gemini's docs)
    first = openai_message({"content": None, "tool_calls": [
        tool_call("calculate", {"expression": "2+2"}, "function-call-1", extra_content=signed),
        tool_call("calculate", {"expression": "3*3"}, "function-call-2")]}, "tool_calls")

    def gemini(request):
        for message in assistant_calls(request):
            for call in message["tool_calls"]:
                if call["id"] == "function-call-1" and call.get("extra_content") != signed:
                    return (400, {"Content-Type": "application/json"}, [{"error": {
                        "code": 400, "status": "INVALID_ARGUMENT",
                        "message": "Function call is missing a thought_signature in "
                                   "functionCall parts. This is required for tools to work "
                                   "correctly, and missing thought_signature may lead to "
                                   "degraded model performance. Additional data, function "
                                   "call `default_api:calculate` , position 2."}}], 0)
        return ok(openai_message({"content": "4 and 9."}))
    fake = fakes["openai"]
    fake.reset(ok(first), gemini)
    status, body = ask(daemons("openai"), user, "2+2 and 3*3?")
    assert status == 200, body
    assert body["reply"] == "4 and 9."
    assert [c["result"]["value"] for c in body["tool_calls"]] == [4, 9]
    assert SIGNATURE not in json.dumps(body)
    calls = assistant_calls(fake.requests[1])[0]["tool_calls"]
    assert calls[0]["extra_content"] == signed
    assert "extra_content" not in calls[1]  # as it came: unsigned


# --- 3. invalid JSON arguments (llama.cpp with a small model) -------------------------

def test_invalid_tool_arguments_are_reported_to_the_model_not_sent_back(daemons, fakes, user):
    broken = '{"expression": "2+2"'
    first = openai_message({"content": None, "tool_calls": [
        tool_call("calculate", broken, "Xk3fQ9a2B")]}, "tool_calls")

    def llama_server(request):
        for message in assistant_calls(request):
            for call in message["tool_calls"]:
                try:
                    json.loads(call["function"]["arguments"])
                except ValueError:
                    return (500, {"Content-Type": "application/json"}, {"error": {
                        "code": 500, "type": "server_error",
                        "message": "Failed to parse tool call arguments as JSON: [json.exception."
                                   "parse_error.101] parse error at line 1, column 21: syntax "
                                   "error while parsing object - unexpected end of input; "
                                   "expected '}'"}}, 0)
        return ok(openai_message({"content": "Sorry, that was malformed; 2+2 is 4."}))
    fake = fakes["openai"]
    fake.reset(ok(first), llama_server)
    status, body = ask(daemons("openai"), user, "2+2?")
    assert status == 200, body
    assert body["reply"] == "Sorry, that was malformed; 2+2 is 4."
    assert "not valid JSON" in body["tool_calls"][0]["error"]
    assert len(fake.requests) == 2  # the follow-up was accepted at once
    follow_up = fake.requests[1]["json"]["messages"]
    assert follow_up[-1]["role"] == "tool" and follow_up[-1]["tool_call_id"] == "Xk3fQ9a2B"
    assert "not valid JSON" in json.loads(follow_up[-1]["content"])["error"]


# --- 4. OpenRouter's errors inside a 200, and LM Studio's -----------------------------

def test_openrouter_error_in_choices_is_a_502_with_its_message(daemons, fakes, user):
    failed = openai_message({"content": ""}, "error")
    failed["choices"][0].update(native_finish_reason="error", error={
        "code": 502, "message": "Upstream model returned an invalid response"})
    fakes["openai"].reset(ok(failed))
    status, body = ask(daemons("openai"), user)
    assert status == 502, body
    assert "Upstream model returned an invalid response" in description(body)
    assert OPENAI_KEY not in json.dumps(body)


def test_openrouter_unified_error_beside_choices_keeps_its_message(daemons, fakes, user):
    # the form OpenRouter documents for an error after generation began:
    # `error` at the top level, choices[0].finish_reason "error"
    failed = openai_message({"content": ""}, "error")
    failed["error"] = {"code": "server_error", "message": "Provider disconnected unexpectedly"}
    fakes["openai"].reset(ok(failed))
    status, body = ask(daemons("openai"), user)
    assert status == 502, body
    assert "Provider disconnected unexpectedly" in description(body)


def test_openrouter_rate_limit_inside_a_200_is_retried(daemons, fakes, user):
    fake = fakes["openai"]
    fake.reset(ok({"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-min."}}),
               ok(openai_text("made it")))
    status, body = ask(daemons("openai"), user)
    assert status == 200, body
    assert body["reply"] == "made it"
    assert len(fake.requests) == 2


def test_lm_studio_unexpected_endpoint_is_a_502_with_its_message(daemons, fakes, user):
    fake = fakes["openai"]
    fake.reset(ok({"error": "Unexpected endpoint or method. (POST /v1/chat/completions)"}))
    status, body = ask(daemons("openai"), user)
    assert status == 502, body
    assert "Unexpected endpoint or method. (POST /v1/chat/completions)" in description(body)
    assert len(fake.requests) == 1  # not a temporary failure


# --- 5. Gemini's error body is a JSON array ------------------------------------------

def test_gemini_error_array_gives_the_message_not_the_raw_text(daemons, fakes, user):
    fakes["openai"].reset((400, {"Content-Type": "application/json"}, [{"error": {
        "code": 400, "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT", "details": [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
            "domain": "googleapis.com"}]}}], 0))
    status, body = ask(daemons("openai"), user)
    assert status == 502, body
    text = description(body)
    assert "API key not valid. Please pass a valid API key." in text
    assert "HTTP 400" in text
    assert "[{" not in text and "INVALID_ARGUMENT" not in text and "@type" not in text


# --- 6. base_url with the endpoint pasted on ------------------------------------------

@pytest.mark.parametrize("name, provider, suffix, path", [
    ("openai-endpoint", "openai", "/chat/completions", "/v1/chat/completions"),
    ("anthropic-v1", "anthropic", "/v1", "/v1/messages"),
    ("anthropic-endpoint", "anthropic", "/v1/messages", "/v1/messages")])
def test_an_endpoint_in_base_url_is_not_doubled(daemons, fakes, user, name, provider, suffix,
                                                path):
    fake = fakes[provider]
    fake.reset(ok(openai_text("hi") if provider == "openai" else
                  anthropic_message([{"type": "text", "text": "hi"}], "end_turn")))
    d = daemons(name)
    start = d.log.split(" listening on ")[0]  # what it said before it listened
    assert re.search(rf"WARNING aibutler: .*base_url ends in {re.escape(suffix)}\b", start), start
    status, body = ask(d, user)
    assert status == 200 and body["reply"] == "hi", body
    assert [r["path"] for r in fake.requests] == [path]


# --- 7. a base_url that reaches something else ------------------------------------------

def test_vllm_404_without_v1_names_the_url_and_suggests_v1(daemons, fakes, user):
    fake = fakes["openai"]
    fake.reset((404, {"Content-Type": "application/json"}, {"detail": "Not Found"}, 0))
    status, body = ask(daemons("openai-root"), user)
    assert status == 502, body
    text = description(body)
    assert f"{fake.url}/chat/completions" in text and "Not Found" in text
    assert f"base_url = {fake.url}/v1" in text
    assert len(fake.requests) == 1


def test_a_200_html_page_names_the_content_type(daemons, fakes, user):
    fakes["openai"].reset((200, {"Content-Type": "text/html; charset=utf-8"},
                           b"<html><body>Sign in to the hotel Wi-Fi</body></html>", 0))
    status, body = ask(daemons("openai-root"), user)
    assert status == 502, body
    text = description(body)
    assert "text/html" in text and "base_url" in text


def test_a_redirect_names_its_location(daemons, fakes, user):
    fake = fakes["openai"]
    fake.reset((302, {"Location": "https://portal.example.net/login?token=abc123"}, b"", 0))
    status, body = ask(daemons("openai-root"), user)
    assert status == 502, body
    text = description(body)
    assert "302" in text and "https://portal.example.net/login" in text
    assert "abc123" not in text  # a query is not shown
    assert len(fake.requests) == 1


# --- 8. one WARNING per failed turn, sync and async -------------------------------------

TURN_FAILED = r"WARNING aibutler: turn ({id}) failed \(provider {provider}, answered 502\): (.*)"


def turn_failures(d, seen):
    """The turn-failure lines logged since len(d.log) was `seen`, once all the
    daemon wrote before a request made now has been read."""
    probe = f"/webhook/custom/messages/msg-probe{uuid.uuid4().hex}"
    assert d.get(probe, {"X-Aibutler-Secret": d.secret})[0] == 404
    d.wait_log(re.escape(probe))
    return [line for line in d.log[seen:].splitlines() if re.search(r" turn \S+ failed ", line)]


@pytest.mark.parametrize("provider, error", [
    ("openai", openai_error(400, "Invalid value for 'model': 'nope' does not exist")),
    ("anthropic", (400, {"Content-Type": "application/json"}, {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: 99999 > 8192, the maximum "
                                                   "allowed for this model"}}, 0))])
def test_a_failed_sync_turn_logs_one_warning(daemons, fakes, user, provider, error):
    fakes[provider].reset(error)
    d = daemons(provider)
    seen = len(d.log)
    status, body = ask(d, user)
    assert status == 502, body
    message = error[2]["error"]["message"]
    d.wait_log(TURN_FAILED.format(id=r"sync-\w+", provider=provider) + re.escape(message))
    lines = turn_failures(d, seen)
    assert len(lines) == 1, lines
    assert "HTTP 400" in lines[0]
    assert OPENAI_KEY not in d.log and ANTHROPIC_KEY not in d.log


def test_a_rejected_key_is_logged_without_the_key(daemons, fakes, user):
    fakes["openai"].reset(openai_error(401, f"Incorrect API key provided: {OPENAI_KEY}. You can "
                                            "find your API key at https://platform.openai.com."))
    d = daemons("openai")
    seen = len(d.log)
    status, body = ask(d, user)
    assert status == 502, body
    d.wait_log(TURN_FAILED.format(id=r"sync-\w+", provider="openai") + ".*HTTP 401")
    assert len(turn_failures(d, seen)) == 1
    assert OPENAI_KEY not in d.log and OPENAI_KEY not in json.dumps(body)


def test_a_failed_async_turn_logs_one_warning_with_its_message_id(daemons, fakes, user):
    fakes["openai"].reset(openai_error(400, "This model's maximum context length is 8192 "
                                            "tokens. However, you requested 9000 tokens."))
    d = daemons("openai-async")
    seen = len(d.log)
    status, _, accepted = d.post({"user_id": user, "message": "hello"})
    assert status == 202, accepted
    message_id = accepted["message_id"]
    line = d.wait_log(TURN_FAILED.format(id=re.escape(message_id), provider="openai")
                      + r".*HTTP 400.*maximum context length is 8192 tokens").group(0)
    assert len(turn_failures(d, seen)) == 1, line
    assert OPENAI_KEY not in d.log
    callback = next(r for r in d.callbacks.wait_for(1)
                    if (r["json"] or {}).get("message_id") == message_id)
    assert "maximum context length is 8192 tokens" in callback["json"]["error"]["description"]


# --- 9. transport: a cut answer, no answer -------------------------------------------------

@pytest.mark.parametrize("failure", [CUT, DROP])
def test_a_broken_connection_is_retried_like_a_503(daemons, fakes, user, failure):
    fake = fakes["openai"]
    fake.reset(failure, ok(openai_text("second time lucky")))
    status, body = ask(daemons("openai"), user)
    assert status == 200, body
    assert body["reply"] == "second time lucky"
    assert len(fake.requests) == 2


# --- 10. replies: ids, empty content, <think>, written tool calls, cuts, Claude's stops ---

def test_tool_calls_without_ids_get_mistral_shaped_ids(daemons, fakes, user):
    call = tool_call("calculate", {"expression": "6*7"})
    del call["id"]
    fake = fakes["openai"]

    def mistral(request):
        for message in request["json"]["messages"]:
            ids = [c["id"] for c in message.get("tool_calls") or ()]
            ids += [message["tool_call_id"]] if message["role"] == "tool" else []
            for given in ids:
                if not NINE_ALNUM.fullmatch(given):
                    return (400, {"Content-Type": "application/json"}, {
                        "object": "error", "type": "invalid_request_error", "param": None,
                        "code": None, "message": f"Tool call id was {given} but must be a-z, "
                                                 "A-Z, 0-9, with a length of 9."}, 0)
        return ok(openai_message({"content": "6*7 is 42."}))
    fake.reset(ok(openai_message({"content": None, "tool_calls": [call]}, "tool_calls")), mistral)
    status, body = ask(daemons("openai"), user, "6*7?")
    assert status == 200, body
    assert body["reply"] == "6*7 is 42."
    messages = fake.requests[1]["json"]["messages"]
    assistant, result = messages[-2], messages[-1]
    assert NINE_ALNUM.fullmatch(assistant["tool_calls"][0]["id"])
    assert result["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert assistant["content"] == ""  # not null, not absent


def test_think_blocks_never_reach_the_user(daemons, fakes, user):
    fake = fakes["openai"]
    fake.reset(ok(openai_text("<think>SECRET-THOUGHT: they want a number.</think>\n\n"
                              "The answer is 4.")))
    d = daemons("openai")
    status, body = ask(d, user, "2+2?")
    assert status == 200, body
    assert body["reply"] == "The answer is 4."
    status, body = ask(d, user, "thanks")
    assert status == 200, body
    assert "SECRET-THOUGHT" not in json.dumps(fake.requests[1]["json"])


def test_a_hermes_tool_call_written_as_text_runs_the_tool(daemons, fakes, user):
    written = ('<tool_call>\n{"name": "calculate", "arguments": {"expression": "6*7"}}\n'
               '</tool_call>')
    fake = fakes["openai"]
    fake.reset(ok(openai_text(written)), ok(openai_text("6*7 is 42.")))
    status, body = ask(daemons("openai"), user, "6*7?")
    assert status == 200, body
    assert body["reply"] == "6*7 is 42."
    assert body["tool_calls"] == [{"name": "calculate", "arguments": {"expression": "6*7"},
                                   "result": {"expression": "6*7", "value": 42}}]
    assistant, result = fake.requests[1]["json"]["messages"][-2:]
    assert assistant["content"] == "" and "<tool_call>" not in json.dumps(assistant)
    assert NINE_ALNUM.fullmatch(assistant["tool_calls"][0]["id"])
    assert result["role"] == "tool" and json.loads(result["content"])["value"] == 42


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])  # DeepSeek/vLLM; OpenRouter
def test_reasoning_that_used_the_whole_budget_is_said(daemons, fakes, user, field):
    fakes["openai"].reset(ok(openai_message({"content": "", field: "SECRET-REASONING " * 50},
                                            "length")))
    status, body = ask(daemons("openai"), user)
    assert status == 200, body
    assert body["truncated"] is True
    assert "reasoning" in body["reply"] and "max_tokens" in body["reply"]
    assert "SECRET-REASONING" not in body["reply"]


def test_claude_context_window_exceeded_says_the_context_is_full(daemons, fakes, user):
    fake = fakes["anthropic"]
    fake.reset(ok(anthropic_message([], "model_context_window_exceeded")),
               ok(anthropic_message([{"type": "text", "text": "The first part of"}],
                                    "model_context_window_exceeded")))
    d = daemons("anthropic")
    status, body = ask(d, user)
    assert status == 200, body
    assert body["truncated"] is True and "context window" in body["reply"]
    status, body = ask(d, user)  # some text came: kept, marked truncated
    assert status == 200, body
    assert body["reply"] == "The first part of" and body["truncated"] is True
    assert fake.requests[0]["headers"]["x-api-key"] == ANTHROPIC_KEY


def test_claude_refusal_after_partial_text_is_a_refusal(daemons, fakes, user):
    fakes["anthropic"].reset(ok(anthropic_message(
        [{"type": "text", "text": "Sure, here is how to build the"}], "refusal")))
    status, body = ask(daemons("anthropic"), user)
    assert status == 200, body
    assert body["reply"] == "(the model declined to answer)"


def test_claude_refused_turn_is_not_sent_again(daemons, fakes, user):
    # "you must reset the conversation context by removing or updating the turn
    # that was refused before continuing" (Anthropic, streaming refusals)
    fake = fakes["anthropic"]
    fake.reset(ok(anthropic_message([{"type": "text", "text": "Step one is"}], "refusal")),
               ok(anthropic_message([{"type": "text", "text": "Hello!"}], "end_turn")))
    d = daemons("anthropic")
    assert ask(d, user, "REFUSED-REQUEST: something dangerous")[0] == 200
    status, body = ask(d, user, "hi")
    assert status == 200 and body["reply"] == "Hello!", body
    assert "REFUSED-REQUEST" not in json.dumps(fake.requests[1]["json"]["messages"])


def test_claude_pause_turn_is_sent_back_and_finished(daemons, fakes, user):
    paused = [{"type": "text", "text": "Let me look that up."},
              {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search",
               "input": {"query": "weather in Paris"}}]

    def continued(request):
        last = request["json"]["messages"][-1]
        if last != {"role": "assistant", "content": paused}:
            return (400, {"Content-Type": "application/json"}, {"type": "error", "error": {
                "type": "invalid_request_error", "message": "expected the paused turn"}}, 0)
        return ok(anthropic_message([{"type": "text", "text": "It is sunny in Paris."}],
                                    "end_turn"))
    fake = fakes["anthropic"]
    fake.reset(ok(anthropic_message(paused, "pause_turn")), continued)
    status, body = ask(daemons("anthropic"), user, "weather in Paris?")
    assert status == 200, body
    assert body["reply"].endswith("It is sunny in Paris.")
    assert len(fake.requests) == 2
    assert fake.requests[1]["json"]["messages"][0]["role"] == "user"
