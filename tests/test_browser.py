"""A real browser (Debian's headless Chromium, driven by selenium) against the
real daemon, on loopback only: a page from an allowed origin streams a turn
cross-origin, a page from another origin is blocked before any turn runs, and
the /chat page works end to end under its Content-Security-Policy, at a phone's
size too. One browser for the module; every wait is on something observable."""

import json
import os
import pathlib
import shutil
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import aibutler
from conftest import DaemonProcess

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

missing = [path + " (apt-get install " + package + ")"
           for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver"))
           if not os.access(path, os.X_OK)]
try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    missing.append("the selenium package (pip install selenium)")
if missing:
    pytest.skip("a real-browser test needs " + ", ".join(missing), allow_module_level=True)

WAIT = 20  # seconds: an upper bound for every wait, never a pause

# A page of a site that embeds the daemon: its own origin, its own script (same
# origin, as a strict site would have it), the daemon's address and a token in
# the fragment. What happened is written into the DOM for the test to read.
PAGE_HTML = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>a site</title><link rel="icon" href="data:,">
<script src="page.js" defer></script></head>
<body><pre id="events"></pre><pre id="deltas"></pre><pre id="done"></pre>
<pre id="location"></pre><pre id="unexposed"></pre><pre id="status"></pre><pre id="state"></pre></body></html>
"""
PAGE_JS = b""""use strict";
const params = new URLSearchParams(location.hash.slice(1));
const api = params.get("api"), auth = {"Authorization": "Bearer " + params.get("token")};
const put = (id, text) => { document.getElementById(id).textContent = text; };
const events = [];
async function run() {
  const answer = await fetch(api + "/webhook/custom", {method: "POST",
    headers: {...auth, "Content-Type": "application/json", "Accept": "text/event-stream"},
    body: JSON.stringify({message: params.get("message")})});
  put("location", answer.headers.get("Location") || "");
  put("unexposed", String(answer.headers.get("X-Accel-Buffering")));
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", deltas = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;
      events.push(event);
      put("events", events.join(" "));
      const payload = JSON.parse(data);
      if (event === "delta") put("deltas", deltas += payload.text);
      if (event === "done" || event === "error") put("done", data);
    }
  }
  const location = document.getElementById("location").textContent;
  const status = await fetch(new URL(location, api), {headers: auth});
  put("status", JSON.stringify({status: status.status, body: await status.json()}));
  put("state", "finished");
}
run().catch((error) => put("state", "failed: " + error.name + ": " + error.message));
"""


class PageHandler(BaseHTTPRequestHandler):
    FILES = {"/page.html": ("text/html; charset=utf-8", PAGE_HTML),
             "/page.js": ("text/javascript; charset=utf-8", PAGE_JS)}

    def log_message(self, *args):
        pass

    def do_GET(self):
        kind, body = self.FILES.get(self.path, ("text/plain", None))
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


class PageServer(ThreadingHTTPServer):
    """Another origin on loopback: http://127.0.0.1:<its own port>."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), PageHandler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def origin(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def sites():
    """Two page origins: the daemon allows the first only."""
    servers = PageServer(), PageServer()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def d(tmp_path_factory, sites):
    allowed = sites[0].origin
    daemon = DaemonProcess(tmp_path_factory.mktemp("browser-daemon"),
                           f"[channels.webhook]\nallowed_origins = {allowed}\n"
                           "chat_page = true\n")
    daemon.start()
    yield daemon
    if daemon.proc.poll() is None:
        daemon.proc.kill()
        daemon.wait(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1024,768"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER,
                      log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


@pytest.fixture
def console(browser):
    """The browser console's entries since this test began: console() reads
    those logged since the last call (reading drains chromedriver's buffer)."""
    browser.get("about:blank")
    browser.get_log("browser")
    return lambda: browser.get_log("browser")


def wait_for(browser, condition, what):
    try:
        return WebDriverWait(browser, WAIT).until(lambda driver: condition(driver))
    except TimeoutException:
        raise AssertionError(f"{what}: not within {WAIT} s; the page shows:\n"
                             + browser.find_element(By.TAG_NAME, "body").text) from None


def text_of(browser, element_id):
    return browser.find_element(By.ID, element_id).text


def token_for(d, user):
    """A token as a site's backend would hand it over: the CLI's."""
    return d.cli("token", user, "--ttl", "10m").stdout.strip()


def log_since(d, mark, expected):
    """The daemon's log after mark (a length of d.log), once it holds expected."""
    with d.logged:
        assert d.logged.wait_for(lambda: expected in d.log[mark:], WAIT), \
            f"{expected!r} not logged:\n{d.log[mark:]}"
        return d.log[mark:]


def test_an_allowed_origin_streams_a_turn_reads_location_and_the_status(browser, console,
                                                                         sites, d):
    token = token_for(d, "site-user")
    browser.get(f"{sites[0].origin}/page.html#api={d.url}&token={token}"
                "&message=what is 6 * 7?")
    state = wait_for(browser, lambda b: text_of(b, "state"), "the page's fetch to finish")
    assert state == "finished"

    done = json.loads(text_of(browser, "done"))
    assert text_of(browser, "deltas") == done["reply"] == "6 * 7 = 42"
    events = text_of(browser, "events").split()
    assert events[-1] == "done" and "delta" in events
    assert events.index("tool_call") < events.index("tool_result") < events.index("delta")
    assert done["session_id"].startswith("sess-") and done["message_id"]
    assert done["tool_calls"][0]["name"] == "calculate"

    # Location was exposed to the page, and the status URL answered it cross-origin
    location = text_of(browser, "location")
    assert location == f"/webhook/custom/messages/{done['message_id']}"
    assert text_of(browser, "unexposed") == "null"  # what is not exposed stays hidden
    status = json.loads(text_of(browser, "status"))
    assert status["status"] == 200
    assert status["body"]["status"] == "done"
    assert status["body"]["reply"] == "6 * 7 = 42"
    assert status["body"]["user_id"] == "site-user"
    assert [e for e in console() if e["level"] == "SEVERE"] == []


def test_another_origin_is_blocked_before_any_turn(browser, console, sites, d):
    token = token_for(d, "elsewhere-user")
    mark = len(d.log)
    browser.get(f"{sites[1].origin}/page.html#api={d.url}&token={token}"
                "&message=what is 6 * 7?")
    state = wait_for(browser, lambda b: text_of(b, "state"), "the page's fetch to fail")
    assert state == "failed: TypeError: Failed to fetch"
    assert text_of(browser, "events") == text_of(browser, "location") == ""

    # the browser said why: its preflight had no Access-Control-Allow-Origin
    messages = []
    blocked = (f"from origin '{sites[1].origin}' has been blocked by CORS policy: Response "
               "to preflight request doesn't pass access control check: No "
               "'Access-Control-Allow-Origin' header is present on the requested resource.")
    wait_for(browser, lambda b: messages.extend(
        e["message"] for e in console() if e["level"] == "SEVERE") or any(
        blocked in m for m in messages), f"the console to say {blocked!r}")

    # the daemon saw the preflight only: no POST, so no turn
    seen = log_since(d, mark, "OPTIONS /webhook/custom 204")
    assert "POST " not in seen, seen

    # the same preflight by hand: no CORS header for that origin, whereas the
    # allowed origin gets them
    def preflight(origin):
        request = urllib.request.Request(d.url + "/webhook/custom", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}
    status, headers = preflight(sites[1].origin)
    assert status == 204 and not any(k.startswith("access-control-") for k in headers)
    status, headers = preflight(sites[0].origin)
    assert headers["access-control-allow-origin"] == sites[0].origin


def chat(browser, message):
    box = browser.find_element(By.ID, "message")
    box.send_keys(message)
    box.send_keys(Keys.ENTER)


def bot_replies(browser):
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#log .msg.bot")]


def test_the_chat_page_streams_keeps_the_session_and_logs_no_error(browser, console, d,
                                                                   tmp_path):
    link = d.cli("token", "phone-user", "--url", d.url).stdout.strip()
    assert link.startswith(f"{d.url}/chat#token=")
    browser.get(link)
    wait_for(browser, lambda b: b.execute_script("return document.readyState") == "complete",
             "the chat page to load")
    assert browser.execute_script("return location.hash") == ""  # the token left the bar
    assert browser.current_url == f"{d.url}/chat"
    # the token is held, so the form to paste one is hidden (CSS must not undo `hidden`)
    assert browser.execute_script('return document.getElementById("token-form").hidden')
    assert not browser.find_element(By.ID, "token-form").is_displayed(), \
        "the token form shows although hidden: CHAT_CSS 'header form {display: flex}' " \
        "overrides the hidden attribute; CHAT_CSS needs '[hidden] {display: none !important}'"

    chat(browser, "what is 6 * 7?")
    wait_for(browser, lambda b: bot_replies(b) == ["6 * 7 = 42"], "the first reply")
    tools = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#log .msg.tool")]
    assert tools[0].startswith("⚙ calculate ") and '"6 * 7"' in tools[0]
    assert tools[1].startswith("→ ") and "42" in tools[1]
    user = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#log .msg.user")]
    assert user == ["what is 6 * 7?"]
    session = browser.execute_script('return sessionStorage.getItem("session")')
    assert session and session.startswith("sess-")
    wait_for(browser, lambda b: b.find_element(By.ID, "go").is_enabled(), "Send to be enabled")

    chat(browser, "what is 2 + 3?")
    wait_for(browser, lambda b: len(bot_replies(b)) == 2 and bot_replies(b)[1] == "2 + 3 = 5",
             "the second reply")
    assert browser.execute_script('return sessionStorage.getItem("session")') == session
    assert browser.find_elements(By.CSS_SELECTOR, "#log .msg.error") == []
    assert [e for e in console() if e["level"] == "SEVERE"] == []

    # a phone's screen: everything fits, nothing scrolls sideways
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        layout = wait_for(browser, lambda b: b.execute_script("""
            if (innerWidth !== 390) return null;
            const box = (id) => document.getElementById(id).getBoundingClientRect();
            return {width: innerWidth, height: innerHeight,
                    scrollWidth: document.documentElement.scrollWidth,
                    send: box("send"), go: box("go"), message: box("message"), log: box("log"),
                    bubbles: [...document.querySelectorAll("#log .msg")].map(
                        (e) => e.getBoundingClientRect().right)};"""), "the phone's size")
        assert layout["scrollWidth"] <= 390
        assert layout["send"]["bottom"] <= layout["height"] and layout["send"]["top"] > 0
        assert layout["go"]["right"] <= 390 and layout["message"]["width"] > 200
        assert layout["log"]["bottom"] <= layout["send"]["top"]
        assert max(layout["bubbles"]) <= 390
        shot = tmp_path / "chat-390x844.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("AIBUTLER_CHAT_SCREENSHOT"):  # for the README, by hand
            shutil.copy(shot, os.environ["AIBUTLER_CHAT_SCREENSHOT"])
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert [e for e in console() if e["level"] == "SEVERE"] == []


def test_the_chat_page_content_security_policy_is_enforced(browser, console, d):
    with urllib.request.urlopen(d.url + "/chat", timeout=10) as answer:
        policy = answer.headers["Content-Security-Policy"]
    assert policy.split(";")[0] == "default-src 'none'"
    browser.get(d.url + "/chat")
    wait_for(browser, lambda b: b.execute_script("return document.readyState") == "complete",
             "the chat page to load")
    blocked = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        document.addEventListener("securitypolicyviolation",
                                  (e) => done([e.violatedDirective, window.injected]));
        const script = document.createElement("script");
        script.textContent = "window.injected = true";
        document.body.append(script);""")
    assert blocked == ["script-src-elem", None]
    messages = [e["message"] for e in console() if e["level"] == "SEVERE"]
    # Chromium 156: "Executing inline script violates the following Content Security
    # Policy directive 'script-src 'self''. ... The action has been blocked."
    assert any("inline script" in m and "Content Security Policy directive 'script-src 'self''"
               in m and "blocked" in m for m in messages), messages


def test_the_chat_page_shows_a_refused_token_and_asks_for_another(browser, console, d):
    forged = aibutler.mint_token("not-the-vault-key", "phone-user", 600)
    browser.get(f"{d.url}/chat#token={forged}")
    wait_for(browser, lambda b: b.execute_script(
        'return document.readyState === "complete" && location.hash === ""'),
        "the chat page to load")
    chat(browser, "hello")
    error = wait_for(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#log .msg.error"),
                     "the refusal to show")[0].text
    assert "bad signature" in error
    assert bot_replies(browser) == []
    assert browser.execute_script('return sessionStorage.getItem("token")') is None
    assert browser.execute_script('return document.getElementById("token-form").hidden') is False
    assert browser.find_element(By.ID, "token-form").is_displayed()
    messages = [e["message"] for e in console() if e["level"] == "SEVERE"]
    assert [m for m in messages if "401" not in m] == [], messages
