"""The agent: builtin tools, and real model providers behind loopback fake
servers speaking the OpenAI and Anthropic wire formats."""

import json
import logging
import time

import pytest

import aibutler
from conftest import (SECRET, anthropic_text, anthropic_tool_use, auth, make_config, ok,
                      openai_text, openai_tool_call)

KEY = "sk-test-key-never-logged-42"


def test_calculator_is_exact_and_refuses_code():
    assert aibutler.calculate("2 + 3 * 4") == 14
    assert aibutler.calculate("(1 + 2) ^ 3") == 27
    assert aibutler.calculate("10 / 4") == 2.5
    assert aibutler.calculate("0.1 + 0.2") == 0.3
    for bad in ("__import__('os').system('true')", "open('/etc/passwd')", "9 ** 9 ** 9",
                "1 / 0", "x + 1", "[1, 2]", ""):
        with pytest.raises(aibutler.ToolError):
            aibutler.calculate(bad)


def test_current_time_honours_the_senders_timezone(app_for):
    client = app_for()
    body = {"user_id": "u", "message": "what time is it?", "metadata": {"timezone": "Asia/Tokyo"}}
    result = client.simulate_post("/webhook/custom", json=body, headers=auth()).json
    call = result["tool_calls"][0]
    assert call["name"] == "current_time" and call["result"]["timezone"] == "Asia/Tokyo"
    assert call["result"]["iso"].endswith("+09:00")
    assert call["result"]["time"] in result["reply"]
    body["metadata"]["timezone"] = "Mars/Olympus"
    result = client.simulate_post("/webhook/custom", json=body, headers=auth()).json
    assert "unknown time zone" in result["tool_calls"][0]["error"]


def test_memory_is_per_user(app_for):
    client = app_for()
    say = lambda user, text: client.simulate_post(  # noqa: E731
        "/webhook/custom", json={"user_id": user, "message": text}, headers=auth()).json
    say("alice", "remember that my wife's birthday is May 3")
    assert "May 3" in say("alice", "what do you remember?")["reply"]
    assert "May 3" not in say("bob", "what do you remember?")["reply"]


def test_builtin_is_honest_about_having_no_model(app_for):
    client = app_for()
    for question in ("Write me a poem about the sea", "Who won the 1998 World Cup?"):
        result = client.simulate_post("/webhook/custom", headers=auth(), json={
            "user_id": "u", "message": question}).json
        assert "without a language model" in result["reply"]
        # a question is first looked up in what the user told it, then admitted
        assert [call["name"] for call in result["tool_calls"]] in ([], ["recall"])


def agent_client(app_for, vault, provider, url, **agent):
    vault.set(f"{provider}_api_key", KEY)
    return app_for(agent=dict({"provider": provider, "base_url": url, "model": "test-model",
                               "timeout": "5s"}, **agent))


def ask(client, message="What's the weather?", user="user-123", **extra):
    body = dict({"user_id": user, "message": message,
                 "metadata": {"platform": "my-chat-app", "location": "Madrid"}}, **extra)
    return client.simulate_post("/webhook/custom", json=body, headers=auth())


def test_openai_plain_reply_sees_prompt_history_and_metadata(app_for, vault, receiver):
    model = receiver([ok(openai_text("It's currently 18°C and sunny in Madrid."))])
    client = agent_client(app_for, vault, "openai", model.url + "/v1", temperature="0.2")
    result = ask(client)
    assert result.status_code == 200
    assert result.json["reply"] == "It's currently 18°C and sunny in Madrid."
    request = model.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    sent = request["json"]
    assert sent["model"] == "test-model" and sent["temperature"] == 0.2
    assert sent["messages"][0]["role"] == "system" and "Current date" in sent["messages"][0]["content"]
    assert "Madrid" in sent["messages"][-1]["content"]
    assert {t["function"]["name"] for t in sent["tools"]} == {
        "current_time", "calculate", "remember", "recall", "weather"}
    # the next turn carries the history of this session, and only this user's
    ask(client, "And tomorrow?")
    contents = [m["content"] for m in model.requests[1]["json"]["messages"]]
    assert contents[1] == "What's the weather?" and contents[2].startswith("It's currently")
    ask(client, "Hello", user="someone-else")
    assert all("weather" not in (m["content"] or "")
               for m in model.requests[2]["json"]["messages"][1:])


def test_openai_tool_round_trip(app_for, vault, receiver):
    model = receiver([ok(openai_tool_call("calculate", {"expression": "17*23"}, "call_abc")),
                      ok(openai_text("17 times 23 is 391."))])
    result = ask(agent_client(app_for, vault, "openai", model.url), "17*23?")
    assert result.json["reply"] == "17 times 23 is 391."
    assert result.json["tool_calls"] == [{"name": "calculate", "arguments": {"expression": "17*23"},
                                          "result": {"expression": "17*23", "value": 391}}]
    messages = model.requests[1]["json"]["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == "call_abc"
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_abc",
                            "content": json.dumps({"expression": "17*23", "value": 391})}


def test_bad_tool_calls_return_errors_to_the_model(app_for, vault, receiver):
    model = receiver([ok(openai_tool_call("calculate", "{not json", "c1")),
                      ok(openai_tool_call("calculate", {"expr": "1"}, "c2")),
                      ok(openai_tool_call("launch_rockets", {}, "c3")),
                      ok(openai_text("Sorry, I could not do that."))])
    client = agent_client(app_for, vault, "openai", model.url)
    result = ask(client)
    assert result.status_code == 200 and result.json["reply"] == "Sorry, I could not do that."
    # a model inventing tool names cannot grow the metrics without bound
    assert client.butler.metrics.value("aibutler_tool_calls_total",
                                       (("tool", "(unknown)"), ("outcome", "error"))) == 1
    errors = [call["error"] for call in result.json["tool_calls"]]
    assert "not valid JSON" in errors[0]
    assert "arguments.expression is required" in errors[1]
    assert "unknown tool 'launch_rockets'" in errors[2]
    for request, call_id in zip(model.requests[1:], ("c1", "c2", "c3")):
        tool_message = request["json"]["messages"][-1]
        assert tool_message["tool_call_id"] == call_id and "error" in tool_message["content"]


def test_max_steps_bounds_the_loop(app_for, vault, receiver):
    model = receiver([ok(openai_tool_call("recall", {}))])
    result = ask(agent_client(app_for, vault, "openai", model.url, max_steps="3"))
    assert result.status_code == 200 and "max_steps" in result.json["reply"]
    assert len(model.requests) == 3 and len(result.json["tool_calls"]) == 3


def test_anthropic_tool_round_trip(app_for, vault, receiver):
    model = receiver([ok(anthropic_tool_use("remember", {"fact": "likes tea"}, "toolu_9")),
                      ok(anthropic_text("Noted: you like tea."))])
    result = ask(agent_client(app_for, vault, "anthropic", model.url), "I like tea, remember it")
    # all the model wrote in the turn, steps apart: as a streamed reply shows it
    assert result.json["reply"] == "Let me check.\n\nNoted: you like tea."
    assert result.json["tool_calls"][0]["result"] == {"remembered": "likes tea"}
    first, second = model.requests
    assert first["path"] == "/v1/messages"
    assert first["headers"]["x-api-key"] == KEY and "Authorization" not in first["headers"]
    assert first["headers"]["anthropic-version"] == "2023-06-01"
    assert "Current date" in first["json"]["system"]
    assert {t["name"] for t in first["json"]["tools"]} >= {"remember", "recall"}
    assert first["json"]["tools"][0]["input_schema"]["type"] == "object"
    assistant, results = second["json"]["messages"][-2:]
    assert assistant["content"][-1] == {"type": "tool_use", "id": "toolu_9", "name": "remember",
                                        "input": {"fact": "likes tea"}}
    assert results["role"] == "user"
    assert results["content"][0]["tool_use_id"] == "toolu_9"


def test_local_server_without_key_gets_no_auth_header(app_for, vault, receiver):
    model = receiver([ok(openai_text("hi"))])
    client = app_for(agent={"provider": "openai", "base_url": model.url, "model": "llama3"})
    assert ask(client).status_code == 200
    assert "Authorization" not in model.requests[0]["headers"]


def failure(client_status, body_part, result):
    assert result.status_code == client_status, result.text
    error = result.json["error"]
    assert body_part in error["description"]
    assert KEY not in result.text
    return result


def test_unreachable_model_is_502(app_for, vault):
    client = agent_client(app_for, vault, "openai", "http://127.0.0.1:9/v1")
    failure(502, "cannot reach", ask(client))


def test_rejected_key_is_502_naming_the_vault_key(app_for, vault, receiver):
    model = receiver([(401, {}, b'{"error": {"message": "bad key"}}', 0)])
    failure(502, "vault set openai_api_key", ask(agent_client(app_for, vault, "openai", model.url)))
    model = receiver([(403, {}, b"{}", 0)])
    failure(502, "vault set anthropic_api_key",
            ask(agent_client(app_for, vault, "anthropic", model.url)))


def test_non_json_and_persistent_5xx_are_502(app_for, vault, receiver):
    model = receiver([(200, {}, b"<html>gateway</html>", 0)])
    failure(502, "not JSON", ask(agent_client(app_for, vault, "openai", model.url)))
    model = receiver([(500, {}, b"oops", 0)])
    client = agent_client(app_for, vault, "openai", model.url)
    waits = []
    client.butler.agent.model.sleep = waits.append  # the backoff, without the waiting
    failure(502, "HTTP 500", ask(client))
    assert len(model.requests) == 3 and waits == [0.5, 1.0]  # retried twice, backing off


def test_429_is_retried_honouring_retry_after_then_503(app_for, vault, receiver):
    model = receiver([(429, {"Retry-After": "1"}, b"{}", 0), ok(openai_text("finally"))])
    client = agent_client(app_for, vault, "openai", model.url)
    waits = []
    client.butler.agent.model.sleep = waits.append
    result = ask(client)
    assert result.json["reply"] == "finally" and waits == [1.0]
    model = receiver([(429, {"Retry-After": "30"}, b"{}", 0)])
    result = failure(503, "rate limiting", ask(agent_client(app_for, vault, "openai", model.url)))
    assert result.headers["retry-after"] == "30"


def test_slow_model_is_504_within_the_timeout(app_for, vault, receiver):
    model = receiver([ok(openai_text("late"), delay=5)])
    client = agent_client(app_for, vault, "openai", model.url, timeout="0.3s")
    started = time.monotonic()
    failure(504, "did not answer within 0.3s", ask(client))
    assert 0.3 <= time.monotonic() - started < 2.3


def test_the_key_never_reaches_the_log(app_for, vault, receiver, caplog):
    caplog.set_level(logging.DEBUG)
    model = receiver([(401, {}, b"{}", 0), ok(openai_text("ok"))])
    client = agent_client(app_for, vault, "openai", model.url)
    ask(client)
    ask(client)
    assert KEY not in caplog.text and SECRET not in caplog.text


def test_history_survives_a_daemon_restart(daemon, receiver):
    model = receiver([ok(openai_text("first answer")), ok(openai_text("second answer"))])
    d = daemon(f"[agent]\nprovider = openai\nbase_url = {model.url}\n")
    d.vault.set("openai_api_key", KEY)
    d.start()
    status, _, first = d.post({"user_id": "u", "message": "first question"})
    assert status == 200 and d.stop() == 0
    d.start()
    status, _, second = d.post({"user_id": "u", "message": "second question"})
    assert second["session_id"] == first["session_id"]
    contents = [m["content"] for m in model.requests[1]["json"]["messages"]]
    assert contents[1:3] == ["first question", "first answer"]
    assert model.requests[1]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert d.stop() == 0
    assert KEY not in d.log


def test_model_errors_reach_the_async_callback(daemon, receiver):
    callbacks = receiver()
    d = daemon(f"[agent]\nprovider = openai\nbase_url = http://127.0.0.1:9\n"
               f"[channels.webhook]\noutbound_url = {callbacks.url}\n")
    d.start()
    status, _, accepted = d.post({"user_id": "u", "message": "hi"})
    assert status == 202
    body = callbacks.wait_for(1)[0]["json"]
    assert body["message_id"] == accepted["message_id"] and body["in_reply_to"] == "u"
    assert body["error"]["status"] == 502 and "cannot reach" in body["error"]["description"]
    assert "reply" not in body
    assert d.stop() == 0


def test_tool_names_are_accepted_by_model_apis():
    registry = aibutler.build_tools(aibutler.section_defaults("tools"), aibutler.Metrics(),
                                    notifier=lambda ctx, m: "x")
    for tool in registry.offered():
        assert aibutler.re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", tool.name)
    with pytest.raises(ValueError):
        aibutler.Tool("bad.name", "", {}, None)
    assert make_config().agent.max_steps == 8


def test_a_key_with_a_newline_is_a_502_that_never_shows_the_key(daemon, receiver):
    model = receiver([ok(openai_text("never asked"))])
    broken = "sk-part-one\nsk-part-two"  # as a credential file with two lines would give
    d = daemon(f"[agent]\nprovider = openai\nbase_url = {model.url}\n",
               env={"AIBUTLER_OPENAI_API_KEY": broken})
    d.start()
    status, _, body = d.post({"user_id": "u", "message": "hi"})
    assert status == 502 and "control characters" in body["error"]["description"]
    assert "sk-part" not in str(body) and len(model.requests) == 0
    assert d.stop() == 0
    assert "sk-part" not in d.log
