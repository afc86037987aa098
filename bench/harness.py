"""What every bench scenario shares: starting the floor and aibutler as
subprocesses on loopback, reading their memory and CPU time from /proc, a
callback receiver, and the two load generators (wrk, or a standard-library
keep-alive one). Scenarios live in run.py, slow_model.py, efficiency.py and
checkpoints.py."""

import collections
import configparser
import http.client
import importlib.util
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SECRET = "bench-secret-0123456789"
THREADS = 4
USERS = 1000
PATH = "/webhook/custom"
START_TIMEOUT = 60  # seconds for a daemon to print its port and answer once

# The aibutler.py every daemon the bench starts runs: the checkout's, or the
# file given with `run.py --aibutler PATH` (an older version, say
# `git show 17e1de6:aibutler.py > /tmp/aibutler-17e1de6.py`).
AIBUTLER = os.path.join(ROOT, "aibutler.py")

# Config lines given with `run.py --set`, applied to every aibutler the bench
# starts, so a change behind a new key can be measured before and after.
CONFIG_OVERRIDES = []


# --- /proc ---------------------------------------------------------------------

def rss_mb(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid):
    """User + system CPU time of the whole process (all its threads, also the
    ones that ended), from /proc/PID/stat; resolution one clock tick (10 ms)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """The peak resident memory of a process, sampled every `every` seconds."""

    def __init__(self, pid, every=0.1):
        self.pid = pid
        self.peak = rss_mb(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every):
        while not self._done.wait(every):
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:  # the process is gone
                return

    def stop(self):
        self._done.set()
        self._thread.join()
        return self.peak


# --- servers under test -----------------------------------------------------------

class Server:
    """A subprocess that prints 'listening on http://127.0.0.1:PORT'. `ready`
    (port -> the moment it first answered) defaults to a POST to the webhook."""

    def __init__(self, argv, env=None, cpu=None, cwd=None, ready=None):
        if cpu is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(cpu)] + argv  # taskset execs: same pid
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output = collections.deque(maxlen=500)  # the last lines, for a failure report
        try:
            self.port = self._wait_for_port()
            threading.Thread(target=self._read_output, daemon=True).start()
            self.ready_s = (ready or first_answer)(self.port) - self.started
        except BaseException:
            self.kill()
            raise

    def _wait_for_port(self):
        timer = threading.Timer(START_TIMEOUT, self.proc.kill)  # a silent child cannot hang us
        timer.start()
        try:
            for line in self.proc.stdout:
                self.output.append(line)
                match = re.search(r"listening on http://[\d.]+:(\d+)", line)
                if match:
                    return int(match.group(1))
        finally:
            timer.cancel()
        raise RuntimeError("server did not start:\n" + "".join(self.output))

    def _read_output(self):
        for line in self.proc.stdout:
            self.output.append(line)

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, timeout=30):
        """SIGTERM, then SIGKILL if it has not exited within `timeout`.
        Returns True when it exited by itself."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            self.kill()
            return False

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def first_answer(port):
    """The moment the first POST gets an answer (any status), polling fast."""
    deadline = time.perf_counter() + START_TIMEOUT
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", PATH, body=json.dumps({"user_id": "warm", "message": "hello"}),
                         headers={"Content-Type": "application/json",
                                  "X-Aibutler-Secret": SECRET})
            conn.getresponse().read()
            conn.close()
            return time.perf_counter()
        except OSError:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"nothing answered on port {port}") from None
            time.sleep(0.002)


def first_health(port):
    """The moment GET /healthz first answers 200: ready without running a turn."""
    deadline = time.perf_counter() + START_TIMEOUT
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return time.perf_counter()
            conn.close()
        except OSError:
            pass
        if time.perf_counter() > deadline:
            raise RuntimeError(f"/healthz never answered on port {port}")
        time.sleep(0.002)


def compose_config(*texts):
    """INI texts merged in order (a later key wins), then CONFIG_OVERRIDES:
    aibutler refuses a file that names a section twice."""
    merged = configparser.ConfigParser(interpolation=None)
    merged.optionxform = str
    for text in texts + tuple(override_text(line) for line in CONFIG_OVERRIDES):
        part = configparser.ConfigParser(interpolation=None)
        part.optionxform = str
        part.read_string(text)
        for section in part.sections():
            if not merged.has_section(section):
                merged.add_section(section)
            for key, value in part.items(section):
                merged.set(section, key, value)
    return "".join(f"[{section}]\n" + "".join(f"{key} = {value}\n"
                                             for key, value in merged.items(section))
                   for section in merged.sections())


def override_text(line):
    """'[agent] concurrency = 8' -> an INI fragment; ValueError if it is not that."""
    match = re.fullmatch(r"\s*\[([\w.]+)\]\s*(\w+)\s*=(.*)", line)
    if not match:
        raise ValueError(f"expected '[section] key = value', got {line!r}")
    section, key, value = match.groups()
    return f"[{section}]\n{key} = {value.strip()}\n"


def daemon_env(data, extra_config=""):
    config = os.path.join(data, "config.ini")
    with open(config, "w") as handle:
        handle.write(compose_config(
            "[limits]\nrate = 0\nuser_rate = 0\n[server]\n"
            f"threads = {THREADS}\n", extra_config))
    env = dict(os.environ, AIBUTLER_DATA=data, AIBUTLER_WEBHOOK_AUTH_SECRET=SECRET)
    env.pop("AIBUTLER_WEBHOOK_OUTBOUND_URL", None)
    return env, config


def start_aibutler(data, extra_config="", cpu=None, as_script=False, env=None, ready=None):
    """As aibutler.service runs it: `python -m aibutler` with its byte code
    compiled at install; as_script: `python aibutler.py run` (compiles at start).
    `env` adds variables (LD_PRELOAD, say) to the daemon's environment."""
    daemon_vars, config = daemon_env(data, extra_config)
    daemon_vars.update(env or {})
    cwd = None
    if as_script:
        argv = [sys.executable, AIBUTLER]
    else:
        code = os.path.join(data, "code")
        os.makedirs(code)
        shutil.copy(AIBUTLER, os.path.join(code, "aibutler.py"))
        py_compile.compile(os.path.join(code, "aibutler.py"), doraise=True,
                           cfile=importlib.util.cache_from_source(os.path.join(code, "aibutler.py")))
        daemon_vars["PYTHONPATH"] = code
        # `-m` puts the working directory first on sys.path: run from the
        # checkout, it would import the checkout's aibutler.py (compiled at
        # every start) instead of this copy.
        argv, cwd = [sys.executable, "-m", "aibutler"], code
    return Server(argv + ["run", "--config", config, "--port", "0"], env=daemon_vars, cpu=cpu,
                  cwd=cwd, ready=ready)


def load_aibutler(path):
    """The module in the aibutler.py at `path`, imported as `aibutler` (for
    the in-process parts of run.py when --aibutler names another file)."""
    spec = importlib.util.spec_from_file_location("aibutler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["aibutler"] = module
    spec.loader.exec_module(module)
    return module


def start_floor(cpu=None):
    return Server([sys.executable, os.path.join(HERE, "floor.py"), "0", str(THREADS)], cpu=cpu)


# --- callback receiver ----------------------------------------------------------------

class Sink(ThreadingHTTPServer):
    """A loopback callback receiver that counts what arrives."""
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, handler=None):
        super().__init__(("127.0.0.1", 0), handler or SinkHandler)
        self.count = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/callback"

    def received(self, body):
        """Called for each callback's body, under no lock."""
        with self.lock:
            self.count += 1

    def wait_for(self, count, timeout, step=0.01):
        """Until `count` callbacks arrived or `timeout` seconds passed; True if they did."""
        deadline = time.perf_counter() + timeout
        while self.count < count:
            if time.perf_counter() > deadline:
                return False
            time.sleep(step)
        return True

    def close(self):
        self.shutdown()
        self.server_close()


class SinkHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received(body)
        self.send_response(204)
        self.end_headers()


# --- load generation ---------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Aibutler-Secret"] = "%(secret)s"
local counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{"user_id":"user-%%d","message":"what is 2+2?",' ..
    '"metadata":{"platform":"bench"}}', counter %% %(users)d)
  return wrk.format(nil, "%(path)s", nil, body)
end
"""


def to_ms(text):
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def load_wrk(port, seconds, connections, cpu):
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(WRK_SCRIPT % {"secret": SECRET, "users": USERS, "path": PATH})
    script.close()
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name,
            f"http://127.0.0.1:{port}{PATH}"]
    if cpu is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", str(cpu)] + argv
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"\s50%\s+([\d.]+\w+)", out).group(1))
    p99 = to_ms(re.search(r"\s99%\s+([\d.]+\w+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "p50": p50, "p99": p99, "errors": int(bad.group(1)) if bad else 0,
            "requests": total}


def load_python(port, seconds, connections, cpu=None):
    """A standard-library keep-alive load generator (when wrk is missing, and
    where every answer must be counted: each client finishes the request it has
    sent before it stops, so `statuses` holds every answer the server gave).
    A connection the server drops counts as an error and is reopened."""
    latencies, statuses, errors = [], collections.Counter(), [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(index):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        n = index
        mine, codes, failed = [], collections.Counter(), 0
        while time.perf_counter() < stop_at:
            n += connections
            body = json.dumps({"user_id": f"user-{n % USERS}", "message": "what is 2+2?",
                               "metadata": {"platform": "bench"}})
            started = time.perf_counter()
            try:
                conn.request("POST", PATH, body=body, headers={
                    "Content-Type": "application/json", "X-Aibutler-Secret": SECRET})
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            mine.append(time.perf_counter() - started)
            codes[response.status] += 1
            if response.status >= 300:
                failed += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            statuses.update(codes)
            errors[0] += failed
    threads = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()

    def quantile_ms(q):
        return latencies[int(len(latencies) * q)] * 1000 if latencies else 0.0
    return {"rps": len(latencies) / seconds, "p50": quantile_ms(0.5), "p99": quantile_ms(0.99),
            "errors": errors[0], "requests": sum(statuses.values()), "statuses": statuses}


def load(port, seconds, connections, cpu):
    if shutil.which("wrk"):
        return load_wrk(port, seconds, connections, cpu)
    return load_python(port, seconds, connections)
