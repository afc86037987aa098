"""The weather tool against loopback fakes of Open-Meteo's two APIs (answering
in their real shapes), the builtin agent answering the page's example, and the
builtin agent recalling remembered facts when asked about them."""

import json
import threading
import time
import types
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import aibutler
from conftest import auth, ok, openai_text, openai_tool_call

PAGE_REQUEST = {"user_id": "user-123", "message": "What's the weather?",
                "metadata": {"platform": "my-chat-app", "location": "Madrid"}}
PAGE_REPLY = "It's currently 18°C and sunny in Madrid."

# Geocoding results as https://geocoding-api.open-meteo.com/v1/search gives them.
PLACE_FIELDS = ("id", "name", "latitude", "longitude", "elevation", "feature_code",
                "country_code", "timezone", "population", "country_id", "country", "admin1")
PLACES = [dict(zip(PLACE_FIELDS, row)) for row in (
    (3117735, "Madrid", 40.4165, -3.70256, 667.0, "PPLC", "ES", "Europe/Madrid", 3255944,
     2510769, "Spain", "Madrid"),
    (3448439, "São Paulo", -23.5475, -46.63611, 769.0, "PPLA", "BR", "America/Sao_Paulo",
     10021295, 3469034, "Brazil", "São Paulo"),
    (5128581, "New York", 40.71427, -74.00597, 10.0, "PPL", "US", "America/New_York", 8175133,
     6252001, "United States", "New York"),
    (2988507, "Paris", 48.85341, 2.3488, 42.0, "PPLC", "FR", "Europe/Paris", 2138551, 3017382,
     "France", "Île-de-France"),
    (4717560, "Paris", 33.66094, -95.55551, 183.0, "PPLA2", "US", "America/Chicago", 24782,
     6252001, "United States", "Texas"))]

# What the forecast API reports now, per (latitude, longitude) rounded to 2 places.
NOW = {
    (40.42, -3.7): dict(t=18.0, feels=17.4, rh=40, code=0, day=1, wind=9.4, offset=3600,
                        tz="Europe/Madrid", time="2026-11-27T10:15"),
    (-23.55, -46.64): dict(t=24.3, feels=26.0, rh=88, code=61, day=1, wind=12.2,
                           offset=-10800, tz="America/Sao_Paulo", time="2026-11-27T06:15"),
    (40.71, -74.01): dict(t=5.0, feels=1.0, rh=70, code=3, day=1, wind=20.5, offset=-18000,
                          tz="America/New_York", time="2026-11-27T04:15"),
}
ELSEWHERE = dict(t=11.0, feels=10.0, rh=60, code=2, day=0, wind=5.0, offset=0, tz="GMT",
                 time="2026-11-27T09:15")


def query_of(request):
    return {k: v[0] for k, v in urllib.parse.parse_qs(
        urllib.parse.urlsplit(request["path"]).query).items()}


def geocoding(request):
    """Open-Meteo's search: an unknown name gets an answer without "results"."""
    query = query_of(request)
    found = [p for p in PLACES if p["name"].casefold() == query.get("name", "").casefold()]
    body = {"generationtime_ms": 0.41}
    if found:
        body["results"] = found[:int(query.get("count", 10))]
    return ok(body)


def forecast(request):
    """Open-Meteo's forecast with current=...: only the variables asked for, in
    the units asked for ("mp/h" is how it writes mph)."""
    query = query_of(request)
    lat, lon = float(query["latitude"]), float(query["longitude"])
    now = NOW.get((round(lat, 2), round(lon, 2)), ELSEWHERE)
    fahrenheit = query.get("temperature_unit") == "fahrenheit"
    mph = query.get("wind_speed_unit") == "mph"

    def temperature(celsius):
        return round(celsius * 9 / 5 + 32, 1) if fahrenheit else celsius
    values = {"temperature_2m": temperature(now["t"]),
              "apparent_temperature": temperature(now["feels"]),
              "relative_humidity_2m": now["rh"], "is_day": now["day"],
              "weather_code": now["code"],
              "wind_speed_10m": round(now["wind"] / 1.609, 1) if mph else now["wind"]}
    units = {"temperature_2m": "°F" if fahrenheit else "°C",
             "apparent_temperature": "°F" if fahrenheit else "°C",
             "relative_humidity_2m": "%", "is_day": "", "weather_code": "wmo code",
             "wind_speed_10m": "mp/h" if mph else "km/h"}
    asked = query.get("current", "").split(",")
    return ok({"latitude": round(lat, 4), "longitude": round(lon, 4),
               "generationtime_ms": 0.05, "utc_offset_seconds": now["offset"],
               "timezone": now["tz"], "timezone_abbreviation": "GMT", "elevation": 650.0,
               "current_units": dict({"time": "iso8601", "interval": "seconds"},
                                     **{k: units[k] for k in asked if k in units}),
               "current": dict({"time": now["time"], "interval": 900},
                               **{k: values[k] for k in asked if k in values})})


@pytest.fixture
def open_meteo(receiver):
    geo, weather = receiver([geocoding]), receiver([forecast])
    return types.SimpleNamespace(geo=geo, weather=weather, tools={
        "weather_url": weather.url, "geocoding_url": geo.url})


def say(client, message, user="user-123", metadata=None):
    body = {"user_id": user, "message": message}
    if metadata is not None:
        body["metadata"] = metadata
    result = client.simulate_post("/webhook/custom", json=body, headers=auth())
    assert result.status_code == 200, result.text
    return result.json


def tool_context(metadata):
    return types.SimpleNamespace(user_id="u", session_id="s", metadata=metadata, store=None,
                                 message_id=None)


# --- the page's example, end to end ------------------------------------------

def test_the_pages_request_is_answered_by_the_daemon(daemon, open_meteo):
    d = daemon(f"[tools]\nweather_url = {open_meteo.weather.url}\n"
               f"geocoding_url = {open_meteo.geo.url}\n").start()
    status, _, body = d.post(PAGE_REQUEST)
    assert status == 200 and body["reply"] == PAGE_REPLY
    call = body["tool_calls"][0]
    assert call["name"] == "weather" and call["arguments"] == {}
    assert call["result"]["location"] == "Madrid, Spain"
    assert call["result"]["observed_at"] == "2026-11-27T10:15+01:00"
    assert call["result"]["units"] == {"temperature": "°C", "wind_speed": "km/h", "humidity": "%"}
    (geo,), (weather,) = open_meteo.geo.requests, open_meteo.weather.requests
    assert geo["path"].startswith("/v1/search?")
    assert query_of(geo) == {"name": "Madrid", "count": "1", "language": "en", "format": "json"}
    assert weather["path"].startswith("/v1/forecast?")
    sent = query_of(weather)
    assert (sent["latitude"], sent["longitude"], sent["timezone"]) == ("40.4165", "-3.70256",
                                                                       "auto")
    assert set(sent["current"].split(",")) == {
        "temperature_2m", "apparent_temperature", "relative_humidity_2m", "is_day",
        "weather_code", "wind_speed_10m"}
    assert "temperature_unit" not in sent and "wind_speed_unit" not in sent
    assert d.stop() == 0


def test_a_real_model_calls_weather_with_the_metadata_location(app_for, receiver, open_meteo):
    model = receiver([ok(openai_tool_call("weather", {}, "call_w")), ok(openai_text(PAGE_REPLY))])
    client = app_for(agent={"provider": "openai", "base_url": model.url, "model": "m",
                            "timeout": "5s"}, tools=open_meteo.tools)
    result = client.simulate_post("/webhook/custom", json=PAGE_REQUEST, headers=auth()).json
    assert result["reply"] == PAGE_REPLY
    offered = {t["function"]["name"]: t["function"] for t in model.requests[0]["json"]["tools"]}
    assert set(offered["weather"]["parameters"]["properties"]) == {
        "location", "latitude", "longitude"}
    tool_message = model.requests[1]["json"]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "call_w"
    weather = json.loads(tool_message["content"])
    assert weather["location"] == "Madrid, Spain" and weather["temperature"] == 18.0
    assert weather["condition"] == "sunny" and weather["humidity"] == 40
    assert weather["apparent_temperature"] == 17.4 and weather["wind_speed"] == 9.4
    assert weather["timezone"] == "Europe/Madrid"
    assert query_of(open_meteo.geo.requests[0])["name"] == "Madrid"


# --- places, phrasings, failures ---------------------------------------------

@pytest.mark.parametrize("message, location", [
    ("What's the weather?", None),
    ("weather in Paris?", "Paris"),
    ("is it raining?", None),
    ("What's the weather like in New York today?", "New York"),
    ("How cold is it in São Paulo right now?", "São Paulo"),
    ("What's the weather at the moment?", None),
    ("Will it rain in my area?", None),
])
def test_builtin_understands_the_usual_phrasings(app_for, open_meteo, message, location):
    result = say(app_for(tools=open_meteo.tools), message, metadata={"location": "Madrid"})
    (call,) = result["tool_calls"]
    assert call["name"] == "weather"
    assert call["arguments"] == ({"location": location} if location else {})
    assert result["reply"].startswith("It's currently ")


def test_place_names_with_accents_and_spaces(app_for, open_meteo):
    client = app_for(tools=open_meteo.tools)
    assert say(client, "What's the weather in São Paulo?")["reply"] == (
        "It's currently 24°C with light rain in São Paulo.")
    assert "name=S%C3%A3o%20Paulo&" in open_meteo.geo.requests[0]["path"]
    assert say(client, "is it raining in new york?")["reply"] == (
        "It's currently 5°C (feels like 1°C) and overcast in New York.")
    assert query_of(open_meteo.geo.requests[1])["name"] == "new york"
    # "Paris, Texas": the Paris in Texas, not the first Paris found
    call = say(client, "weather in Paris, Texas?")["tool_calls"][0]
    assert call["result"]["region"] == "Texas" and call["result"]["country"] == "United States"
    assert query_of(open_meteo.geo.requests[2])["name"] == "Paris"


def test_coordinates_from_the_metadata_skip_geocoding(app_for, open_meteo):
    result = say(app_for(tools=open_meteo.tools), "What's the weather?",
                 metadata={"latitude": 40.4165, "longitude": "-3.70256"})
    assert result["reply"] == "It's currently 18°C and sunny at 40.42, -3.703."
    assert open_meteo.geo.requests == []
    assert query_of(open_meteo.weather.requests[0])["latitude"] == "40.4165"


def test_without_a_location_the_builtin_asks_where_you_are(app_for, open_meteo):
    result = say(app_for(tools=open_meteo.tools), "What's the weather?",
                 metadata={"platform": "my-chat-app"})
    assert result["reply"] == aibutler.BuiltinModel.NO_PLACE
    assert result["tool_calls"][0]["error"] == aibutler.WeatherTool.NO_LOCATION
    assert open_meteo.geo.requests == [] and open_meteo.weather.requests == []


def test_an_unknown_place_is_a_tool_error_and_the_turn_goes_on(app_for, open_meteo):
    result = say(app_for(tools=open_meteo.tools), "weather in Atlantis?")
    error = result["tool_calls"][0]["error"]
    assert error.startswith("no place called 'Atlantis' was found")
    assert result["reply"] == f"Sorry, I couldn't get the weather: {error}."
    assert open_meteo.weather.requests == []


def test_a_service_that_is_down_or_failing_is_a_tool_error(app_for, receiver):
    started = time.monotonic()
    result = say(app_for(tools={"weather_url": "http://127.0.0.1:9",
                                "geocoding_url": "http://127.0.0.1:9"}),
                 "What's the weather?", metadata={"location": "Madrid"})
    error = result["tool_calls"][0]["error"]
    assert "cannot be reached" in error and "internet access" in error
    assert result["reply"].startswith("Sorry, I couldn't get the weather")
    assert time.monotonic() - started < 3
    # Open-Meteo's own error shape: HTTP 400 {"error": true, "reason": ...}
    geo = receiver([geocoding])
    weather = receiver([(400, {}, {"error": True, "reason": "Cannot initialize WeatherVariable "
                                   "from invalid String value"}, 0)])
    result = say(app_for(tools={"weather_url": weather.url, "geocoding_url": geo.url}),
                 "weather in Madrid")
    assert result["tool_calls"][0]["error"] == (
        "the weather service answered HTTP 400: Cannot initialize WeatherVariable from "
        "invalid String value")
    garbage = receiver([(200, {}, b"<html>captive portal</html>", 0)])
    tool = aibutler.WeatherTool(garbage.url, garbage.url)
    with pytest.raises(aibutler.ToolError, match="not JSON"):
        tool(tool_context({"location": "Madrid"}))


class Trickle(ThreadingHTTPServer):
    """Answers 200 and then one byte every 50 ms, for ten seconds."""

    daemon_threads = True

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "200")
                self.end_headers()
                try:
                    for _ in range(200):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


def test_a_trickling_service_is_cut_off_at_the_deadline():
    server = Trickle()
    try:
        tool = aibutler.WeatherTool(server.url, server.url, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(aibutler.ToolError, match="did not answer within 0.5s"):
            tool(tool_context({"location": "Madrid"}))
        assert time.monotonic() - started < 1.5
    finally:
        server.shutdown()
        server.server_close()


def test_imperial_units(app_for, open_meteo):
    result = say(app_for(tools=dict(open_meteo.tools, units="imperial")), "What's the weather?",
                 metadata={"location": "Madrid"})
    assert result["reply"] == "It's currently 64°F and sunny in Madrid."
    weather = result["tool_calls"][0]["result"]
    assert weather["temperature"] == 64.4 and weather["wind_speed"] == 5.8
    assert weather["units"] == {"temperature": "°F", "wind_speed": "mph", "humidity": "%"}
    sent = query_of(open_meteo.weather.requests[0])
    assert sent["temperature_unit"] == "fahrenheit" and sent["wind_speed_unit"] == "mph"


def test_weather_is_cached_per_place_for_ten_minutes(open_meteo):
    now = [1000.0]
    tool = aibutler.WeatherTool(open_meteo.weather.url, open_meteo.geo.url, clock=lambda: now[0])
    first = tool(tool_context({"location": "Madrid"}))
    assert tool(tool_context({}), location="  madrid ") == first  # the same place
    now[0] += 599
    assert tool(tool_context({"location": "MADRID"})) == first
    assert (len(open_meteo.geo.requests), len(open_meteo.weather.requests)) == (1, 1)
    now[0] += 2  # ten minutes are over
    tool(tool_context({"location": "Madrid"}))
    assert (len(open_meteo.geo.requests), len(open_meteo.weather.requests)) == (2, 2)
    # bounded: the least recently used place goes first
    tool.CACHE_PLACES = 2
    for place in ("São Paulo", "Madrid", "New York"):
        tool(tool_context({"location": place}))
    assert len(tool._cache) == 2
    assert len(open_meteo.weather.requests) == 4  # Madrid was still cached
    tool(tool_context({"location": "Madrid"}))
    assert len(open_meteo.weather.requests) == 4  # and still is
    tool(tool_context({"location": "São Paulo"}))
    assert len(open_meteo.weather.requests) == 5  # São Paulo had made room for New York
    # a failure is not kept: the place may be found once the service is back
    for _ in range(2):
        with pytest.raises(aibutler.ToolError):
            tool(tool_context({"location": "Atlantis"}))
    assert len(open_meteo.geo.requests) == 7


def test_wmo_codes_in_plain_words():
    words = {code: aibutler.weather_condition(code) for code in (0, 1, 2, 3, 45, 48, 51, 56,
                                                                  63, 67, 71, 77, 81, 86, 95, 99)}
    assert words == {0: "sunny", 1: "mostly sunny", 2: "partly cloudy", 3: "overcast", 45: "fog",
                     48: "freezing fog", 51: "light drizzle", 56: "light freezing drizzle",
                     63: "rain", 67: "heavy freezing rain", 71: "light snow", 77: "snow grains",
                     81: "rain showers", 86: "heavy snow showers", 95: "thunderstorms",
                     99: "thunderstorms with heavy hail"}
    assert aibutler.weather_condition(0, is_day=False) == "clear"
    assert aibutler.weather_condition(42) == "unknown conditions (WMO code 42)"


# --- which tools are offered -----------------------------------------------------

def test_tools_enabled_without_weather(app_for, receiver, open_meteo, tmp_path, capsys):
    without = "current_time, calculate, remember, recall"
    model = receiver([ok(openai_text("I can't check the weather."))])
    client = app_for(agent={"provider": "openai", "base_url": model.url},
                     tools=dict(open_meteo.tools, enabled=without))
    say(client, "What's the weather?")
    assert {t["function"]["name"] for t in model.requests[0]["json"]["tools"]} == {
        "current_time", "calculate", "remember", "recall"}
    result = say(app_for(tools=dict(open_meteo.tools, enabled=without)), "What's the weather?",
                 metadata={"location": "Madrid"})
    assert result["reply"] == aibutler.BuiltinModel.WEATHER_OFF and result["tool_calls"] == []
    assert open_meteo.geo.requests == [] and open_meteo.weather.requests == []
    # the default offers every tool; webhook_send only with an outbound URL
    defaults, metrics = aibutler.section_defaults("tools"), aibutler.Metrics()
    registry = aibutler.build_tools(defaults, metrics, notifier=lambda ctx, message: "msg-1")
    assert list(registry.tools) == list(aibutler.TOOL_NAMES)
    assert "webhook_send" not in aibutler.build_tools(defaults, metrics).tools
    # an unknown name stops the daemon with exit 78, naming the key
    config = tmp_path / "config.ini"
    config.write_text("[tools]\nenabled = weather, teleport\n")
    with pytest.raises(aibutler.ConfigError, match=r"\[tools\] enabled.*'teleport'"):
        aibutler.load_config(str(config), env={}, data_dir=str(tmp_path))
    assert aibutler.main(["run", "--config", str(config)]) == aibutler.EXIT_CONFIG
    assert "teleport" in capsys.readouterr().err


# --- the builtin agent remembers like a person -----------------------------------

def test_builtin_answers_questions_from_what_it_remembers(app_for):
    client = app_for()
    for fact in ("my wifi password is hunter2", "my car is parked on level 3",
                 "I am allergic to peanuts", "my bank password is 0000"):
        say(client, f"remember that {fact}")
    result = say(client, "what is my wifi password?")
    assert result["reply"] == "Your wifi password is hunter2."
    assert result["tool_calls"][0]["name"] == "recall"
    assert result["tool_calls"][0]["arguments"] == {"query": "wifi password"}
    assert result["tool_calls"][0]["result"]["facts"][0] == "my wifi password is hunter2"
    assert say(client, "Where is my car parked?")["reply"] == "Your car is parked on level 3."
    assert say(client, "where did I park the car")["reply"] == "Your car is parked on level 3."
    assert say(client, "What am I allergic to?")["reply"] == "You are allergic to peanuts."
    assert say(client, "what are my passwords?")["reply"] == (
        "From what you told me: your bank password is 0000; your wifi password is hunter2.")
    # stop words match nothing; nothing matching is the honest answer
    for question in ("what is my name?", "Who won the 1998 World Cup?"):
        assert "without a language model" in say(client, question)["reply"]
    assert "without a language model" in say(client, "what is my wifi password?",
                                              user="someone-else")["reply"]
    listed = say(client, "what do you remember?")["reply"]
    assert listed.startswith("Here's what I remember:") and listed.count("\n- ") == 4


def test_store_recall_puts_the_best_matches_first(store):
    for fact in ("my wife is wonderful", "the wifi router is in the hall",
                 "my wifi password is hunter2"):
        store.remember("u", fact)
    assert store.recall("u", "wifi password") == ["my wifi password is hunter2",
                                                  "the wifi router is in the hall"]
    assert store.recall("u", "who won?") == []  # "won" is not in "wonderful"
    assert len(store.recall("u", "what is my")) == 3  # no telling words: everything


def test_builtin_help_mentions_the_weather(app_for):
    client = app_for()
    assert "weather" in say(client, "help")["reply"]
    assert "weather" in say(client, "hello")["reply"]
    assert "weather" in aibutler.BuiltinModel.NO_MODEL
