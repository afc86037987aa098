#!/usr/bin/env python3
"""aibutler: let anything that can POST JSON talk to an AI agent.

One file, run as a daemon in a terminal, or installed as a systemd service (on
a Raspberry Pi, say):

    python3 aibutler.py run                     # generates a secret on first start
    python3 aibutler.py vault get webhook_auth_secret
    sudo python3 aibutler.py install            # the service; `check` says what is wrong

Then POST {"user_id", "message", "metadata"} with the header
``X-Aibutler-Secret: <secret>`` to http://127.0.0.1:3377/webhook/custom. The
reply comes back in the response, or, when an outbound URL is configured, the
daemon answers 202 at once and POSTs a signed callback when the reply is ready.

Runtime needs: Python 3.9+, falcon 3.1+ and waitress 2.1+ (Debian's
python3-falcon and python3-waitress, or pip). Everything else is the standard
library. ``python3 aibutler.py --help`` lists the commands; the project's
README (installed as /opt/aibutler/README.md) tells the rest.
"""

__version__ = "0.2.0"

import argparse
import ast
import base64
import bisect
import collections
import configparser
import contextlib
import datetime
import errno
import fcntl
import getpass
import hashlib
import hmac
import http.client
import io
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import queue
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus

import zoneinfo

falcon = waitress = None  # imported by load_web_stack(), for serving only


def load_web_stack():
    """Import falcon and waitress on first use: `--help`, `vault` and `deliveries`
    start faster without them, and work where they are not installed."""
    global falcon, waitress
    if falcon is None or waitress is None:
        import falcon as falcon_module
        import waitress as waitress_module
        falcon, waitress = falcon_module, waitress_module

# === Constants ==============================================================

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78
EXIT_CANNOT_LISTEN = 69  # the port is taken: the unit's RestartPreventExitStatus= lists it
USER_ID_MAX, SESSION_ID_MAX, ATTACHMENTS_MAX = 256, 128, 20  # what a message may carry

SECRET_NAME = "webhook_auth_secret"
TOKEN_SECRET_NAME = "webhook_token_secret"  # signs per-user tokens (JWT, HS256)
ROTATED = (SECRET_NAME, TOKEN_SECRET_NAME)  # `vault rotate` keeps the old one for a grace
OUTBOUND_SECRET_NAME = "webhook_outbound_secret"  # callbacks' auth, when set (else SECRET_NAME)
# Each channel's users are its own: a channel other than the webhook prefixes
# its users' ids with its name and this, which no webhook user_id may contain.
CHANNEL_USER = "\x1f"
TWILIO_TOKEN_NAME = "twilio_auth_token"  # the Twilio account's Auth Token, in the vault
USER_AGENT = "aibutler/" + __version__
INSTALL_HINT = ("on Debian or Raspberry Pi OS: sudo apt install python3-falcon "
                "python3-waitress (elsewhere, in a venv: pip install falcon waitress)")

log = logging.getLogger("aibutler")


# === Errors =================================================================

class ConfigError(Exception):
    """The configuration cannot be used; `run` exits 78 so systemd stops retrying."""


class VaultError(Exception):
    """The vault file cannot be read or written."""


class DataDirError(Exception):
    """The data directory, or a file in it, cannot be used (not a directory, a
    symlink where a file should be, a corrupt database). One line, no traceback."""


class ApiError(Exception):
    """A request or a turn failed in a way the sender must hear about: an HTTP
    status, why, and for bad input the field at fault. Sync requests get it as
    the JSON error body, async ones as the `error` of their callback."""

    def __init__(self, status, description, *, field=None, retry_after=None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.field = field
        self.retry_after = retry_after

    def as_dict(self):
        return error_dict(self.status, self.description, field=self.field)


def one_line(exc):
    return " ".join(str(exc).split())


def error_dict(status, description, title=None, field=None):
    """The one error shape, used in HTTP error bodies and in error callbacks."""
    body = {"status": status, "title": title or HTTPStatus(status).phrase,
            "description": description}
    if field:
        body["field"] = field
    return body


# === Files: the data directory ==============================================

def data_dir_from_env(env=None):
    env = os.environ if env is None else env
    path = env.get("AIBUTLER_DATA") or os.path.join(os.path.expanduser("~"), ".aibutler")
    return os.path.abspath(path)


def command_hint(data_dir, *words, env=None):
    """The command line that works where this process runs: this interpreter and
    this file (Debian has no `python`), AIBUTLER_DATA when the data directory is
    not the invoking user's default, and both with sudo under systemd (the
    operator is not the service's user, whoever that is)."""
    env = os.environ if env is None else env
    prefix = []
    if env.get("INVOCATION_ID"):
        prefix = ["sudo", "AIBUTLER_DATA=" + shlex.quote(data_dir)]
    elif data_dir != data_dir_from_env({}):
        prefix = ["AIBUTLER_DATA=" + shlex.quote(data_dir)]
    if os.path.basename(sys.argv[0] or "") == "aibutler":  # pip's console script
        command = ["aibutler", *words]
    else:
        command = [sys.executable or "python3", os.path.abspath(__file__), *words]
    return " ".join(prefix + [shlex.quote(word) for word in command])


def ensure_data_dir(path):
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise DataDirError(f"{path}: cannot use it as the data directory: "
                           f"{exc.strerror or exc}") from None
    if not os.path.isdir(path):
        raise DataDirError(f"{path}: the data directory is not a directory")
    return path


def lock_data_dir(path):
    """One daemon per data directory: an exclusive lock on <data>/aibutler.lock,
    taken before anything else in it is opened for writing and held for the
    process's life; the file names the PID that holds it. A second daemon on
    the same directory stops at once and touches nothing; the CLI takes no lock."""
    lock_path = os.path.join(path, "aibutler.lock")
    fd = open_private(lock_path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataDirError(f"{path} is in use by another aibutler run (PID {holder}); stop "
                           "it first, or give this one its own AIBUTLER_DATA") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def data_dir_warnings(path, fresh):
    """Other users must not write the data directory (nor, on a fresh install
    where no secret exists yet, read it)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o022:
        return [f"the data directory {path} can be written by other users; "
                f"fix it with: chmod 700 {path}"]
    if fresh and mode & 0o044:
        return [f"the data directory {path} can be read by other users; "
                f"fix it with: chmod 700 {path}"]
    return []


def open_private(path, flags=os.O_RDWR | os.O_CREAT):
    """Open a file of the data directory for writing: never through a symlink
    (root runs the CLI on a directory the service user owns, where a planted link
    must not aim root's writes elsewhere), mode 0600 whatever the umask, and,
    when root creates it there, owned by the directory's owner: handed over on
    the open descriptor, never by path. Returns the descriptor."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataDirError(f"{path} is a symbolic link; aibutler does not follow links "
                               "in its data directory: remove it") from None
        raise DataDirError(f"{path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataDirError(f"{path} is not a regular file")
        give_to_directory_owner(fd, path, info)
        if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid in (os.geteuid(), 0):
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def give_to_directory_owner(fd, path, info):
    """`sudo aibutler vault set` on a service's state directory must leave files
    the service user can still use, so root hands what it opens to the owner."""
    if os.geteuid() != 0:
        return
    owner = os.stat(os.path.dirname(os.path.abspath(path)))
    if owner.st_uid != 0 and (info.st_uid, info.st_gid) != (owner.st_uid, owner.st_gid):
        os.fchown(fd, owner.st_uid, owner.st_gid)


# === HTTP client: deadlines, retries, HTTP dates ============================

MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a redirect is reported as the non-2xx status it is


class _DeadlineSocket:
    """A connected socket whose every read and write gets what is left of one
    total deadline as its timeout: a socket timeout alone bounds each read, and a
    server dribbling a byte every few seconds would hold an attempt for minutes."""

    def __init__(self, sock, until):
        self._sock, self._until = sock, until

    def _arm(self):
        left = self._until - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self._sock.settimeout(left)

    def sendall(self, data, *flags):
        self._arm()
        return self._sock.sendall(data, *flags)

    def recv_into(self, buffer, nbytes=0, *flags):
        self._arm()
        return self._sock.recv_into(buffer, nbytes, *flags)

    def makefile(self, mode="rb", buffering=-1, **kwargs):
        """What http.client reads the answer from; like socket.makefile, it keeps
        the socket open until the answer is closed too."""
        self._sock._io_refs += 1
        return io.BufferedReader(socket.SocketIO(self, "rb"))

    def __getattr__(self, name):  # close, fileno, _decref_socketios, ...
        return getattr(self._sock, name)


def _deadline_handlers(until):
    """urllib handlers whose connections keep to `until` (time.monotonic())."""
    def connection_class(base):
        class Connection(base):
            def connect(self):  # connect (and TLS handshake) within what is left, too
                self.timeout = max(0.001, until - time.monotonic())
                super().connect()
                self.sock = _DeadlineSocket(self.sock, until)
        return Connection

    plain, tls = connection_class(http.client.HTTPConnection), connection_class(
        http.client.HTTPSConnection)

    class Plain(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(plain, req)

    class TLS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(tls, req, context=self._context)
    return Plain(), TLS()


def http_request(method, url, body, headers, timeout):
    """One HTTP exchange. Returns (status, headers, body) for every HTTP status;
    raises OSError (URLError, timeouts, broken answers) when no whole answer came
    within `timeout` seconds in total (name resolution aside: the resolver has
    its own timeouts). Redirects are not followed; bodies are read up to
    MAX_RESPONSE_BYTES."""
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    opener = urllib.request.build_opener(_NoRedirect, *_deadline_handlers(
        time.monotonic() + timeout))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.headers, whole_body(response)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, whole_body(exc)
    except http.client.HTTPException as exc:  # IncompleteRead, LineTooLong...: no answer
        raise ConnectionError(f"broken HTTP answer ({type(exc).__name__})") from None
    except (ValueError, UnicodeError) as exc:  # e.g. a header value: its text holds a secret
        raise ConnectionError(f"cannot send the request ({type(exc).__name__})") from None


@contextlib.contextmanager
def http_stream(url, body, headers, timeout):
    """POST, and the answer as it arrives: yields (status, headers, response,
    body) where, for a 2xx, `response` is read as it comes (its readline()
    keeps to the same total deadline) and body is None; for any other status
    response is None and body the whole error body. Raises as http_request."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect, *_deadline_handlers(
        time.monotonic() + timeout))
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            error = exc.code, exc.headers, None, whole_body(exc)
        yield error
        return
    except http.client.HTTPException as exc:
        raise ConnectionError(f"broken HTTP answer ({type(exc).__name__})") from None
    except (ValueError, UnicodeError) as exc:
        raise ConnectionError(f"cannot send the request ({type(exc).__name__})") from None
    with response:
        try:
            yield response.status, response.headers, response, None
        except http.client.HTTPException as exc:  # a chunked stream cut off
            raise ConnectionError(f"the stream broke off ({type(exc).__name__})") from None


SSE_LINE_MAX = 1 << 20  # bytes of one line of a server-sent event stream


def sse_events(response):
    """(event, data) of each server-sent event (the W3C format: data: lines
    joined by newlines, event: its name, default "message"; comments skipped)."""
    event, data = "message", []
    while True:
        line = response.readline(SSE_LINE_MAX)
        if not line:
            return
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value


def whole_body(response):
    """The body up to MAX_RESPONSE_BYTES; a connection closed before the
    Content-Length was read is no answer (read(n) returns what came, quietly)."""
    body = response.read(MAX_RESPONSE_BYTES)
    length = response.headers.get("Content-Length") or ""
    if length.isdigit() and len(body) < min(int(length), MAX_RESPONSE_BYTES):
        raise ConnectionError(f"the answer was cut short ({len(body)} of {length} bytes)")
    return body


def http_post(url, body, headers, timeout):
    return http_request("POST", url, body, headers, timeout)


def http_get(url, headers, timeout):
    return http_request("GET", url, None, headers, timeout)


def is_timeout(exc):
    return isinstance(exc, socket.timeout) or isinstance(getattr(exc, "reason", None),
                                                         socket.timeout)


def network_reason(exc):
    reason = getattr(exc, "reason", exc)
    return one_line(reason) or type(reason).__name__


MAX_RETRY_AFTER = 86400.0  # seconds: a later Retry-After is a server's mistake, not a plan


def parse_retry_after(value, now=None):
    """Seconds to wait from a Retry-After value: delay-seconds (fractions too) or an
    HTTP date, at most MAX_RETRY_AFTER. None when absent, unparsable, zero or in the
    past: the caller then uses its own backoff, never a retry without a pause."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        seconds = seconds_until_http_date(value, now)
    if seconds is None or not seconds > 0:  # also refuses NaN
        return None
    return min(seconds, MAX_RETRY_AFTER)


def retry_after_seconds(headers, now=None):
    """The server's own wait: OpenAI's retry-after-ms first, then Retry-After."""
    try:
        millis = float(headers.get("retry-after-ms") or "nan")
    except ValueError:
        millis = math.nan
    if millis > 0:
        return min(millis / 1000, MAX_RETRY_AFTER)
    return parse_retry_after(headers.get("Retry-After"), now)


UNIX_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def seconds_until_http_date(value, now=None):
    """Seconds from `now` (default: the current time) until an HTTP date, or None.
    HTTP dates are UTC (RFC 9110): a date without a zone is UTC, not local time.
    Aware datetimes only, never the platform's time_t, which ends in 2038 on 32-bit
    systems such as Raspberry Pi OS's armhf userland."""
    import email.utils  # only needed for the rare HTTP-date form
    try:
        parts = email.utils.parsedate_tz(value)
    except Exception:  # noqa: BLE001 - before bpo-45239 (3.9.2) odd input raised anything
        return None  # unparsable: the caller's own backoff, as documented
    if parts is None:
        return None
    try:
        when = datetime.datetime(*parts[:6], tzinfo=datetime.timezone.utc)
        when -= datetime.timedelta(seconds=parts[9] or 0)
    except (ValueError, OverflowError):
        return None
    now = UNIX_EPOCH + datetime.timedelta(seconds=time.time() if now is None else now)
    return (when - now).total_seconds()


def iso_utc(timestamp):
    """A stored Unix time as ISO 8601 UTC, computed without time_t (see above);
    a value no calendar holds is shown as the number it is."""
    try:
        moment = UNIX_EPOCH + datetime.timedelta(seconds=timestamp)
    except (OverflowError, ValueError, TypeError):
        return str(timestamp)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def url_host(url):
    """scheme://host[:port] only: paths and queries of webhook URLs often hold tokens."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


def url_without_query(url):
    """A URL for a log line where the path matters (which URL a signature was
    checked against): its query, where tokens go, is only said to be there."""
    parts = urllib.parse.urlsplit(url)
    shown = parts._replace(query="", fragment="").geturl()
    return shown + ("?<query not shown>" if parts.query else "")


# === Agent: tools ===========================================================

TOOL_TIMEOUT = 5.0  # seconds a tool that goes online (weather) may take per call


class ToolError(Exception):
    """A tool could not do what was asked; the model sees the message and goes on."""


class ToolContext:
    """What a tool knows of the turn it runs in."""

    __slots__ = ("user_id", "session_id", "metadata", "store", "message_id")

    def __init__(self, user_id, session_id, metadata, store, message_id=None):
        self.user_id = user_id
        self.session_id = session_id
        self.metadata = metadata
        self.store = store
        self.message_id = message_id


class Tool:
    def __init__(self, name, description, parameters, func):
        if not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name):
            raise ValueError(f"tool name {name!r} is not accepted by model APIs")
        self.name, self.description, self.parameters, self.func = name, description, parameters, func


def schema_problem(schema, value, path="arguments"):
    """The first way `value` breaks a (small subset of) JSON Schema, or None."""
    kinds = {"object": dict, "string": str, "integer": int, "number": (int, float),
             "boolean": bool, "array": list}
    kind = schema.get("type")
    if kind in kinds:
        if not isinstance(value, kinds[kind]) or (kind in ("integer", "number")
                                                  and isinstance(value, bool)):
            return f"{path} must be of type {kind}"
    if kind == "object":
        for name in schema.get("required", ()):
            if name not in value:
                return f"{path}.{name} is required"
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                problem = schema_problem(properties[name], item, f"{path}.{name}")
                if problem:
                    return problem
            elif schema.get("additionalProperties", True) is False:
                return f"{path}.{name} is not an accepted argument"
    if kind == "string":
        if len(value) < schema.get("minLength", 0):
            return f"{path} must not be empty"
        if len(value) > schema.get("maxLength", math.inf):
            return f"{path} is longer than {schema['maxLength']} characters"
    return None


class ToolRegistry:
    def __init__(self, metrics):
        self.tools = {}
        self.metrics = metrics

    def register(self, tool):
        self.tools[tool.name] = tool

    def offered(self):
        """The tools the model is offered, in registration order."""
        return list(self.tools.values())

    def invoke(self, call, ctx):
        """Run one call the model asked for. Returns the record listed in
        `tool_calls`: {name, arguments, result} or {name, arguments, error}."""
        raw = call.get("arguments")
        record = {"name": call.get("name"), "arguments": raw}
        try:
            args = tool_arguments(raw)
            record["arguments"] = args
            tool = self.tools.get(call.get("name"))
            if tool is None:
                raise ToolError(f"unknown tool {call.get('name')!r}; available: "
                                + ", ".join(sorted(self.tools)))
            problem = schema_problem(tool.parameters, args)
            if problem:
                raise ToolError(problem)
            result = tool.func(ctx, **args)
            strict_json(result)  # a bug's NaN must not reach a strict receiver
            record["result"] = result
        except ToolError as exc:
            record["error"] = str(exc)
        except ValueError as exc:  # the tool's own complaint, passed on as it is
            record["error"] = f"the tool failed: {one_line(exc)}"
        except Exception as exc:  # the turn goes on; the traceback goes to the log
            log.exception("tool %s failed", call.get("name"))
            record["error"] = f"the tool failed: {type(exc).__name__}"
        outcome = "error" if "error" in record else "ok"
        label = record["name"] if record["name"] in self.tools else "(unknown)"  # bounded labels
        self.metrics.inc("aibutler_tool_calls_total", (("tool", label), ("outcome", outcome)))
        return record


def tool_arguments(raw):
    """The model's arguments (a JSON text, or an object some servers send) -> value;
    only this step's failures say "not valid JSON"."""
    if not isinstance(raw, str):
        return raw or {}
    try:
        return loads_json(raw or "{}")
    except (ValueError, RecursionError) as exc:
        raise ToolError(f"arguments are not valid JSON: {exc}") from None


def reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def finite_float(text):
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError(f"{text} is out of range")
    return value


def loads_json(text):
    """json.loads without Python's NaN/Infinity extensions (nor numbers that
    overflow to them), which strict parsers, and so our senders and callback
    receivers, refuse."""
    if not isinstance(text, str) or text.startswith("\ufeff"):  # json.loads says what is wrong
        return json.loads(text, parse_constant=reject_constant, parse_float=finite_float)
    return STRICT_DECODER.decode(text)


def strict_json(value):
    """Standard JSON text of value; ValueError for NaN or Infinity inside."""
    return STRICT_ENCODER.encode(value)


# Built once: json.loads and json.dumps with options build a new one on every call.
STRICT_DECODER = json.JSONDecoder(parse_constant=reject_constant, parse_float=finite_float)
STRICT_ENCODER = json.JSONEncoder(allow_nan=False)
UNICODE_ENCODER = json.JSONEncoder(ensure_ascii=False)  # what falcon's answers use


def tool_current_time(ctx, timezone=None):
    name = timezone or ctx.metadata.get("timezone")
    if name and not isinstance(name, str):
        name = None
    if name:
        try:
            zone = zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ToolError(f"unknown time zone {name!r}; use an IANA name like Europe/Madrid")
        now = datetime.datetime.now(zone)
    else:
        now = datetime.datetime.now().astimezone()
        name = now.tzname()
    return {"iso": now.isoformat(timespec="seconds"), "timezone": name,
            "date": f"{now:%A} {now.day} {now:%B %Y}", "time": f"{now:%H:%M}"}


CALC_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
               ast.Mod: operator.mod, ast.Pow: operator.pow}
CALC_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


CALC_MAX_CHARS = 200


def calculate(expression):
    """Arithmetic on numbers with + - * / // % ** ^ and parentheses; never eval()."""
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/").strip()
    if not text or len(text) > CALC_MAX_CHARS:
        raise ToolError(f"the expression must be 1 to {CALC_MAX_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"{expression!r} is not an arithmetic expression") from None

    def evaluate(node):
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return finite(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in CALC_UNARY:
            return CALC_UNARY[type(node.op)](evaluate(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in CALC_BINARY:
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or abs(left) > 1e100):
                raise ToolError("that power is too large to compute")
            try:
                result = CALC_BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
            except OverflowError:
                raise ToolError("the result is too large") from None
            if isinstance(result, int) and result.bit_length() > 4000:
                raise ToolError("the result is too large")
            if isinstance(result, complex):
                raise ToolError("the result is not a real number")
            return finite(result)
        raise ToolError("only numbers, + - * / // % ** and parentheses are allowed")

    def finite(number):  # inf and nan are not JSON: a strict receiver would drop the reply
        if isinstance(number, float) and not math.isfinite(number):
            raise ToolError("the result is too large")
        return number

    value = evaluate(tree)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return int(value)
        return float(f"{value:.12g}")
    return value


def tool_calculate(ctx, expression):
    return {"expression": expression, "value": calculate(expression)}


def tool_remember(ctx, fact):
    ctx.store.remember(ctx.user_id, fact.strip())
    return {"remembered": fact.strip()}


def tool_recall(ctx, query=""):
    return {"facts": ctx.store.recall(ctx.user_id, query)}


# Open-Meteo's weather codes (WMO 4677, the subset it reports) in plain words, as
# (by day, by night): clear daylight is what people call sunny.
WMO_CONDITIONS = {
    0: ("sunny", "clear"), 1: ("mostly sunny", "mostly clear"), 2: ("partly cloudy",) * 2,
    3: ("overcast",) * 2, 45: ("fog",) * 2, 48: ("freezing fog",) * 2,
    51: ("light drizzle",) * 2, 53: ("drizzle",) * 2, 55: ("dense drizzle",) * 2,
    56: ("light freezing drizzle",) * 2, 57: ("dense freezing drizzle",) * 2,
    61: ("light rain",) * 2, 63: ("rain",) * 2, 65: ("heavy rain",) * 2,
    66: ("light freezing rain",) * 2, 67: ("heavy freezing rain",) * 2,
    71: ("light snow",) * 2, 73: ("snow",) * 2, 75: ("heavy snow",) * 2,
    77: ("snow grains",) * 2, 80: ("light rain showers",) * 2, 81: ("rain showers",) * 2,
    82: ("violent rain showers",) * 2, 85: ("light snow showers",) * 2,
    86: ("heavy snow showers",) * 2, 95: ("thunderstorms",) * 2,
    96: ("thunderstorms with light hail",) * 2, 99: ("thunderstorms with heavy hail",) * 2,
}
WMO_SKY_CODES = (0, 1, 2, 3)  # words about the sky ("and sunny"); the rest fall ("with rain")


def weather_condition(code, is_day=True):
    words = WMO_CONDITIONS.get(code)
    return words[0 if is_day else 1] if words else f"unknown conditions (WMO code {code})"


class WeatherTool:
    """Current weather from Open-Meteo (free, no API key): its geocoding API
    turns a place name into coordinates, its forecast API gives the current
    conditions there. One lookup (both calls) has `timeout` seconds in all;
    answers are kept per place for CACHE_SECONDS, so a chat asking twice costs
    one lookup. Every failure is a ToolError: the model hears it, the turn goes on."""

    CACHE_SECONDS = 600
    CACHE_PLACES = 256
    PLACE_MAX_CHARS = 200   # of a place name
    REASON_MAX_CHARS = 200  # of the service's own error text, passed on
    TIMEOUT = TOOL_TIMEOUT
    CURRENT = ("temperature_2m,apparent_temperature,relative_humidity_2m,is_day,"
               "weather_code,wind_speed_10m")
    NO_LOCATION = ("no location given and the message's metadata has none: ask the user "
                   "where they are (a town or city), then call weather with it")

    def __init__(self, weather_url, geocoding_url, units="metric", timeout=TIMEOUT,
                 clock=time.monotonic):
        self.weather_url = weather_url.rstrip("/")
        self.geocoding_url = geocoding_url.rstrip("/")
        self.imperial = units == "imperial"
        self.timeout = timeout
        self.clock = clock  # for the cache only; the network deadline is real time
        self._cache = collections.OrderedDict()  # place key -> (expires, result), oldest first
        self._lock = threading.Lock()

    def __call__(self, ctx, location=None, latitude=None, longitude=None):
        place = self._place(ctx.metadata, location, latitude, longitude)
        key = (" ".join(place["name"].casefold().split()) if "name" in place
               else (round(place["latitude"], 2), round(place["longitude"], 2)))
        result = self._cached(key)
        if result is None:
            deadline = time.monotonic() + self.timeout
            if "name" in place:
                place = self._geocode(place["name"], deadline)
            result = self._current(place, deadline)
            self._keep(key, result)
        return result

    @classmethod
    def _place(cls, metadata, location=None, latitude=None, longitude=None):
        """{'name'} or {'latitude', 'longitude'}: from the arguments, else from the
        message's metadata.location, else its metadata.latitude and .longitude."""
        if location is not None and location.strip():
            return {"name": location.strip()}
        if latitude is not None or longitude is not None:
            if latitude is None or longitude is None:
                raise ToolError("give both latitude and longitude, or a location name")
            return cls._coordinates(latitude, longitude)
        if isinstance(metadata.get("location"), str) and metadata["location"].strip():
            return {"name": metadata["location"].strip()[:cls.PLACE_MAX_CHARS]}
        try:
            return cls._coordinates(float(metadata["latitude"]), float(metadata["longitude"]))
        except (KeyError, TypeError, ValueError, ToolError):  # none, or none usable
            raise ToolError(cls.NO_LOCATION) from None

    @staticmethod
    def _coordinates(latitude, longitude):
        if not (-90 <= latitude <= 90 and -180 <= longitude <= 180):
            raise ToolError("latitude must be -90 to 90 and longitude -180 to 180")
        return {"latitude": latitude, "longitude": longitude}

    def _cached(self, key):
        with self._lock:
            expires, result = self._cache.get(key, (0, None))
            if expires <= self.clock():
                self._cache.pop(key, None)
                return None
            self._cache.move_to_end(key)  # recently used: evicted last
            return result

    def _keep(self, key, result):
        with self._lock:
            self._cache[key] = (self.clock() + self.CACHE_SECONDS, result)
            self._cache.move_to_end(key)
            while len(self._cache) > self.CACHE_PLACES:
                self._cache.popitem(last=False)

    def _geocode(self, name, deadline):
        """The best match for a place name; 'Paris, France' picks the Paris in France."""
        town, _, within = (part.strip() for part in name.partition(","))
        answer = self._get(self.geocoding_url + "/v1/search", {
            "name": town or name, "count": 10 if within else 1, "language": "en",
            "format": "json"}, deadline)
        found = [r for r in answer.get("results") or ()
                 if isinstance(r, dict) and {"name", "latitude", "longitude"} <= r.keys()]
        if not found:
            raise ToolError(f"no place called {name!r} was found; ask the user for the "
                            "town or city (with its country when the name is ambiguous)")
        inside = [r for r in found if within and within.casefold() in (
            str(r.get(field, "")).casefold() for field in ("country", "admin1", "country_code"))]
        return (inside or found)[0]

    def _current(self, place, deadline):
        query = {"latitude": place["latitude"], "longitude": place["longitude"],
                 "current": self.CURRENT, "timezone": "auto"}
        if self.imperial:
            query.update(temperature_unit="fahrenheit", wind_speed_unit="mph")
        answer = self._get(self.weather_url + "/v1/forecast", query, deadline)
        now, units = answer.get("current"), answer.get("current_units") or {}
        try:
            temperature, code = float(now["temperature_2m"]), int(now["weather_code"])
        except (KeyError, TypeError, ValueError):
            raise ToolError("the weather service answered without current conditions") from None
        is_day = bool(now.get("is_day", 1))
        if "name" in place:
            label = ", ".join(str(place[k]) for k in ("name", "country") if place.get(k))
            where = {"location": label, "place": place["name"], "region": place.get("admin1"),
                     "country": place.get("country")}
        else:
            where = {"location": f"{place['latitude']:.4g}, {place['longitude']:.4g}"}
        degrees = units.get("temperature_2m") or ("°F" if self.imperial else "°C")
        speed = units.get("wind_speed_10m") or ("mph" if self.imperial else "km/h")
        return dict(where, **{
            "latitude": place["latitude"], "longitude": place["longitude"],
            "timezone": answer.get("timezone"),
            "observed_at": self._local_time(now.get("time"), answer.get("utc_offset_seconds")),
            "temperature": temperature, "apparent_temperature": now.get("apparent_temperature"),
            "condition": weather_condition(code, is_day), "weather_code": code,
            "is_day": is_day, "wind_speed": now.get("wind_speed_10m"),
            "humidity": now.get("relative_humidity_2m"),
            "units": {"temperature": degrees, "wind_speed": speed.replace("mp/h", "mph"),
                      "humidity": "%"}})

    @staticmethod
    def _local_time(text, offset):
        """Open-Meteo's local '2026-11-27T10:15' with its UTC offset: '...T10:15+01:00'."""
        try:
            zone = datetime.timezone(datetime.timedelta(seconds=int(offset)))
            return datetime.datetime.fromisoformat(text).replace(tzinfo=zone).isoformat(
                timespec="minutes")
        except (TypeError, ValueError):
            return text

    def _get(self, url, query, deadline):
        """GET url?query, a JSON object, before the deadline."""
        late = ToolError(f"the weather service did not answer within {self.timeout:g}s")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise late
        url_with_query = url + "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        try:
            status, _, body = http_get(url_with_query, {"User-Agent": USER_AGENT,
                                                        "Accept": "application/json"}, remaining)
        except OSError as exc:
            if is_timeout(exc):
                raise late from None
            raise ToolError(f"the weather service at {url_host(url)} cannot be reached "
                            f"({network_reason(exc)}); it needs internet access") from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not 200 <= status < 300:
            reason = answer.get("reason") if isinstance(answer, dict) else None  # Open-Meteo's
            raise ToolError(f"the weather service answered HTTP {status}"
                            + (f": {one_line(str(reason))[:self.REASON_MAX_CHARS]}"
                               if reason else ""))
        if not isinstance(answer, dict):
            raise ToolError("the weather service answered with something that is not JSON")
        return answer


def object_schema(required=(), **properties):
    """A tool's parameters: an object of these properties and no others."""
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


def string_schema(max_length, min_length=0, description=None):
    schema = {"type": "string", "maxLength": max_length}
    if min_length:
        schema["minLength"] = min_length
    if description:
        schema["description"] = description
    return schema


# Every tool the model can be offered, in the order offered; [tools] enabled picks
# among them. make(tools_config, notifier) gives its function, None when it cannot
# work here (webhook_send without an outbound URL); online: it needs the network.
ToolSpec = collections.namedtuple("ToolSpec", "name description parameters make online")
TOOLS = (
    ToolSpec("current_time", "The current date and time, in the sender's time zone when known.",
             object_schema(timezone={"type": "string",
                                     "description": "IANA time zone, e.g. Europe/Madrid"}),
             lambda config, notifier: tool_current_time, online=False),
    ToolSpec("calculate", "Evaluate an arithmetic expression exactly (+ - * / // % ** and "
             "parentheses).",
             object_schema(["expression"], expression=string_schema(CALC_MAX_CHARS, 1)),
             lambda config, notifier: tool_calculate, online=False),
    ToolSpec("remember", "Store a fact about this user for later conversations.",
             object_schema(["fact"], fact=string_schema(2000, 1)),
             lambda config, notifier: tool_remember, online=False),
    ToolSpec("recall", "Look up facts remembered about this user; an empty query lists them "
             "all.", object_schema(query=string_schema(200)),
             lambda config, notifier: tool_recall, online=False),
    ToolSpec("weather", "Current weather (temperature, feels-like, conditions, wind, humidity) "
             "for a place name or coordinates. With no arguments it uses the location in the "
             "message's metadata; if there is none, it says so and you should ask the user.",
             object_schema(location=string_schema(WeatherTool.PLACE_MAX_CHARS, description=(
                               "town or city, e.g. Madrid or Paris, France")),
                           latitude={"type": "number"}, longitude={"type": "number"}),
             lambda config, notifier: WeatherTool(config.weather_url, config.geocoding_url,
                                                  config.units), online=True),
    ToolSpec("webhook_send", "Send a message to the user's system through the outbound "
             "webhook.", object_schema(["message"], message=string_schema(10000, 1)),
             lambda config, notifier: notifier and (lambda ctx, message: {
                 "queued": True, "message_id": notifier(ctx, message)}), online=True),
)
TOOL_NAMES = tuple(spec.name for spec in TOOLS)


def build_tools(tools_config, metrics, notifier=None):
    """The tool registry every provider is offered: those of TOOLS that the
    [tools] section enables and that can work here. `notifier(ctx, message)`
    queues a message to the outbound URL (async mode only)."""
    registry = ToolRegistry(metrics)
    for spec in TOOLS:
        func = spec.name in tools_config.enabled and spec.make(tools_config, notifier)
        if func:
            registry.register(Tool(spec.name, spec.description, spec.parameters, func))
    return registry


# === Config =================================================================

DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
RATE_PERIODS = {"second": 1, "minute": 60, "hour": 3600}


def parse_duration(text):
    """'24h', '1.5s', '100ms', '2m' or a bare number of seconds -> seconds (float)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)?\s*", str(text))
    if not match:
        raise ValueError("expected a duration like 30s, 5m, 24h or 100ms")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def parse_duration_list(text):
    values = [parse_duration(part) for part in str(text).split(",") if part.strip()]
    if not values:
        raise ValueError("expected a comma-separated list of durations")
    return values


def parse_rate(text):
    """'600/minute' -> (600, 60.0); '0' means off -> (0, 1.0)."""
    text = str(text).strip()
    if text in ("0", "off", ""):
        return (0, 1.0)
    match = re.fullmatch(r"(\d+)\s*/\s*(second|minute|hour)", text)
    if not match:
        raise ValueError("expected N/second, N/minute, N/hour or 0 for off")
    return (int(match.group(1)), float(RATE_PERIODS[match.group(2)]))


def parse_bool(text):
    value = configparser.ConfigParser.BOOLEAN_STATES.get(str(text).strip().lower())
    if value is None:
        raise ValueError("expected true or false")
    return value


def whole_number(text, expected):
    """int(text), or a ValueError that says what was expected (not Python's
    "invalid literal for int() with base 10")."""
    try:
        return int(str(text).strip())
    except ValueError:
        raise ValueError(f"expected {expected}") from None


def parse_positive_int(text):
    value = whole_number(text, "a whole number, 1 or more")
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def parse_int_between(low, high):
    def parse(text):
        value = whole_number(text, f"a whole number from {low} to {high}")
        if not low <= value <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return value
    return parse


parse_port = parse_int_between(1, 65535)


def parse_positive_duration(text):
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be more than 0 (e.g. 30s)")
    return value


def parse_choice(*choices):
    def parse(text):
        value = str(text).strip().lower()
        if value not in choices:
            raise ValueError("expected one of: " + ", ".join(choices))
        return value
    return parse


def parse_url(text):
    """An http(s) URL that urllib can use as it is, or empty for none."""
    value = str(text).strip()
    if not value:
        return value
    if re.search(r"[\s\x00-\x1f\x7f]", value):
        raise ValueError("the URL contains whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a usable URL ({one_line(exc).split(':')[0]})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("expected an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    if port == 0:
        raise ValueError("the port must be 1-65535")
    if "@" in parts.netloc:
        raise ValueError("credentials in the URL are not used; see auth_type and auth_user")
    return value


parse_url.redact = True  # URLs hold tokens: errors do not repeat the value


def parse_path(text):
    value = str(text).strip()
    if not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+", value) or "/../" in value + "/":
        raise ValueError("expected a plain absolute path like /webhook/custom")
    return value


def parse_account_sid(text):
    value = str(text).strip()
    if value and not re.fullmatch(r"AC[0-9a-fA-F]{32}", value):
        raise ValueError("expected a Twilio Account SID: AC and 32 hex digits")
    return value


TWILIO_WAIT_MAX = 13.0  # seconds: Twilio gives up on an answer after 15 s


def parse_twilio_wait(text):
    value = parse_duration(text)
    if value > TWILIO_WAIT_MAX:
        raise ValueError(f"must be at most {TWILIO_WAIT_MAX:g}s: Twilio waits 15 s for "
                         "the answer, then gives up on it")
    return value


def parse_text(text):
    value = str(text).strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def parse_optional_float(text):
    if not str(text).strip():
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number from 0 to 2, or empty") from None
    if not 0 <= value <= 2:
        raise ValueError("must be a number from 0 to 2, or empty")
    return value


def parse_networks(text):
    return [ipaddress.ip_network(part.strip(), strict=False)
            for part in str(text).split(",") if part.strip()]


def parse_origins(text):
    """Web origins (scheme://host[:port], comma-separated) whose pages may call."""
    origins = []
    for origin in parse_names(text):
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path \
                or parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(f"{origin!r} is not an origin like https://chat.example.com "
                             "(a scheme and a host, an optional port, nothing after)")
        origins.append(origin.lower())
    return origins


def parse_names(text):
    return [part.strip() for part in str(text).split(",") if part.strip()]


def parse_tool_names(text):
    """'all', or tool names separated by commas ('' = none): unknown names are errors."""
    names = []
    for name in parse_names(str(text).lower()):
        if name == "all":
            names.extend(TOOL_NAMES)
        elif name in TOOL_NAMES:
            names.append(name)
        else:
            raise ValueError(f"unknown tool {name!r}; expected all or some of: "
                             + ", ".join(TOOL_NAMES))
    return list(dict.fromkeys(names))


def parse_base_url(text):
    """An http(s) URL of a service's root, without the trailing slash; never empty."""
    value = parse_url(text).rstrip("/")
    if not value:
        raise ValueError("expected an http:// or https:// URL")
    return value


DEFAULT_SYSTEM_PROMPT = ("You are AI Butler, a helpful assistant reached through a webhook. "
                         "Answer briefly and use the tools when they help.")

# Every key the daemon reads, with its default as written in config.example.ini.
CONFIG_SCHEMA = {
    "server": {
        "host": ("127.0.0.1", str.strip),
        "port": ("3377", parse_port),
        "threads": ("4", parse_int_between(1, 256)),
        "max_body_bytes": ("1048576", parse_positive_int),
        "connection_limit": ("500", parse_int_between(1, 10000)),
        "client_connection_limit": ("20", parse_int_between(0, 10000)),
        "idle_connection_limit": ("200", parse_int_between(1, 10000)),
        "header_timeout": ("10s", parse_positive_duration),
        "request_timeout": ("30s", parse_positive_duration),
        "channel_timeout": ("60s", parse_positive_duration),
        "shutdown_timeout": ("10s", parse_duration),
        "max_waiting": ("200", parse_int_between(0, 10000)),
        "max_waiting_per_address": ("20", parse_int_between(0, 10000)),
        "max_waiting_per_user": ("4", parse_int_between(0, 10000)),
        "trusted_proxies": ("", parse_networks),
        "metrics_public": ("false", parse_bool),
        "openapi_public": ("false", parse_bool),
        "log_level": ("info", parse_choice("debug", "info", "warning", "error")),
    },
    "channels": {
        "active": ("webhook", parse_names),
    },
    "channels.webhook": {
        "enabled": ("true", parse_bool),
        "path": ("/webhook/custom", parse_path),
        "outbound_url": ("", parse_url),
        "auth_type": ("bearer", parse_choice("bearer", "basic", "none")),
        "auth_user": ("aibutler", str.strip),
        "sign": ("true", parse_bool),
        "callback_timeout": ("15s", parse_positive_duration),
        "previous_secret_grace": ("24h", parse_duration),
        "reply_wait": ("0", parse_duration),
        "max_wait": ("25s", parse_duration),
        "allowed_origins": ("", parse_origins),
        "stream_keep_alive": ("15s", parse_positive_duration),
        "chat_page": ("false", parse_bool),
    },
    "channels.twilio": {
        "path": ("/webhook/twilio", parse_path),
        "public_url": ("", parse_url),
        "account_sid": ("", parse_account_sid),
        "reply_wait": ("12s", parse_twilio_wait),
        "api_base": ("https://api.twilio.com", parse_base_url),
        "error_reply": ("Sorry, something went wrong on my side. Please try again in a "
                        "little while.", parse_text),
    },
    "agent": {
        "provider": ("builtin", parse_choice("builtin", "openai", "anthropic")),
        "model": ("", str.strip),
        "base_url": ("", parse_url),
        "api_key_name": ("", str.strip),
        "timeout": ("60s", parse_positive_duration),
        "max_steps": ("8", parse_positive_int),
        "temperature": ("", parse_optional_float),
        "max_tokens": ("4096", parse_positive_int),
        "max_tokens_param": ("auto", parse_choice("auto", "max_tokens",
                                                  "max_completion_tokens")),
        "concurrency": ("64", parse_int_between(1, 1024)),
        "system_prompt": (DEFAULT_SYSTEM_PROMPT, str.strip),
    },
    "sessions": {
        "idle_timeout": ("24h", parse_duration),
        "max_history": ("20", parse_positive_int),
    },
    "limits": {
        "rate": ("600/minute", parse_rate),
        "user_rate": ("60/minute", parse_rate),
    },
    "delivery": {
        "workers": ("2", parse_positive_int),
        "dispatchers": ("2", parse_positive_int),
        "retry_schedule": ("1s, 5s, 30s, 2m, 10m, 30m, 1h, 3h, 6h, 12h, 24h",
                           parse_duration_list),
        "max_pending": ("1000", parse_positive_int),
        "idempotency_ttl": ("24h", parse_duration),
    },
    "tools": {
        "enabled": ("all", parse_tool_names),
        "units": ("metric", parse_choice("metric", "imperial")),
        "weather_url": ("https://api.open-meteo.com", parse_base_url),
        "geocoding_url": ("https://geocoding-api.open-meteo.com", parse_base_url),
    },
}

# What an active channel cannot work without, beyond each key's own parse: keys
# that must not be empty (checked by load_config), vault entries (checked at start).
CHANNEL_NEEDS = {
    "twilio": {
        "keys": {"account_sid": "replies sent later go through the account's Messages API "
                                "(copy the Account SID from Twilio's console)"},
        "vault": {TWILIO_TOKEN_NAME: "the account's Auth Token"}},
}

# Environment variables that override a config key.
ENV_OVERRIDES = {
    "AIBUTLER_WEBHOOK_OUTBOUND_URL": ("channels.webhook", "outbound_url"),
    "AIBUTLER_WEBHOOK_AUTH_TYPE": ("channels.webhook", "auth_type"),
    "AIBUTLER_HOST": ("server", "host"),
    "AIBUTLER_PORT": ("server", "port"),
}


class Config:
    """Typed settings, one namespace per section: config.server.port,
    config.webhook.outbound_url ("channels.webhook" is reached as .webhook)."""

    def __init__(self, values, source=None, warnings=()):
        self.source = source
        self.warnings = list(warnings)
        for section, keys in values.items():
            setattr(self, section.split(".")[-1], types.SimpleNamespace(**keys))

    def channel_active(self, name):
        """Named in [channels] active, and not turned off by its own `enabled`."""
        section = getattr(self, name)
        return name in self.channels.active and getattr(section, "enabled", True)

    @property
    def async_mode(self):
        return bool(self.webhook.outbound_url)


class Settings:
    """The config in force, shared by every part that reads settings: a reload
    (SIGHUP) swaps it here with one assignment, and every part sees the new
    values at its next read. Reads go through: settings.webhook.path. Built once
    at start, and so needing a restart: the listening address and thread
    counts, sync or async mode, and the tools ([tools])."""

    def __init__(self, config):
        self.config = config

    def __getattr__(self, name):
        return getattr(self.config, name)


TURN_SLACK = 5.0    # seconds a turn may take beyond its model and tool calls (sqlite)


def turn_time_limit(settings):
    """The longest a turn can take: every step's model call and tools timing out."""
    agent = settings.agent
    return agent.max_steps * (agent.timeout + TOOL_TIMEOUT) + TURN_SLACK


def section_defaults(section):
    """One section's parsed defaults, for parts built without a Config (tests, tools)."""
    return types.SimpleNamespace(**{key: parse(default) for key, (default, parse)
                                    in CONFIG_SCHEMA[section].items()})


def find_config_file(explicit, env, data_dir):
    """--config, else $AIBUTLER_CONFIG, else <data>/config.ini if present, else None.
    A file that was named but is missing is an error, not a silent default."""
    named = explicit or env.get("AIBUTLER_CONFIG")
    if named:
        if not os.path.isfile(named):
            raise ConfigError(f"{named}: no such config file")
        return named
    candidate = os.path.join(data_dir, "config.ini")
    return candidate if os.path.isfile(candidate) else None


def load_config(explicit=None, env=None, data_dir=None):
    """Read the config file (if any), apply environment overrides, parse every value.
    Raises ConfigError naming the file (or variable), the key and the problem."""
    env = os.environ if env is None else env
    data_dir = data_dir or data_dir_from_env(env)
    path = find_config_file(explicit, env, data_dir)
    raw = {section: {key: default for key, (default, _) in keys.items()}
           for section, keys in CONFIG_SCHEMA.items()}
    origin = {}
    warnings = []
    if path:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except configparser.MissingSectionHeaderError as exc:
            raise ConfigError(f"{path}, line {exc.lineno}: {exc.line.strip()!r} comes before any "
                              "[section]; keys go under one, like [server] or [agent] (see "
                              "config.example.ini)") from None
        except configparser.Error as exc:
            raise ConfigError(f"{path}: {one_line(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read it: {one_line(exc)}") from None
        for section in parser.sections():
            if section not in CONFIG_SCHEMA:
                warnings.append(f"{path}: unknown section [{section}] ignored")
                continue
            for key, value in parser.items(section):
                if key not in CONFIG_SCHEMA[section]:
                    warnings.append(f"{path}: unknown key '{key}' in [{section}] ignored")
                    continue
                raw[section][key] = value
                origin[(section, key)] = f"{path}: [{section}] {key}"
    for variable, (section, key) in ENV_OVERRIDES.items():
        if env.get(variable, "") != "":
            raw[section][key] = env[variable]
            origin[(section, key)] = f"environment variable {variable}"
    values = {}
    for section, keys in CONFIG_SCHEMA.items():
        values[section] = {}
        for key, (_, parse) in keys.items():
            try:
                values[section][key] = parse(raw[section][key])
            except ValueError as exc:
                where = origin.get((section, key), f"[{section}] {key}")
                shown = "" if getattr(parse, "redact", False) else f" = {raw[section][key]!r}"
                raise ConfigError(f"{where}{shown}: {exc}") from None
    config = Config(values, source=path, warnings=warnings)
    check_channels(config, origin)
    return config


def config_changes(old, new):
    """The keys whose values differ, as "[section] key" (values not shown: URLs
    hold tokens)."""
    return [f"[{section}] {key}" for section, keys in CONFIG_SCHEMA.items() for key in keys
            if getattr(getattr(old, section.split(".")[-1]), key)
            != getattr(getattr(new, section.split(".")[-1]), key)]


def check_channels(config, origin):
    """[channels] active names known channels; each active one has a path of its
    own (not the daemon's, not inside another channel's) and the keys it needs."""
    known = [section.split(".", 1)[1] for section in CONFIG_SCHEMA
             if section.startswith("channels.")]
    unknown = [name for name in config.channels.active if name not in known]
    if unknown:
        raise ConfigError(f"[channels] active: unknown channel {unknown[0]!r}; the known "
                          f"channels are: {', '.join(known)}")
    owners = {path: "the daemon" for path in RESERVED_PATHS}
    for name in (name for name in known if config.channel_active(name)):
        path = getattr(config, name).path
        where = origin.get((f"channels.{name}", "path"), f"[channels.{name}] path")
        for taken, owner in owners.items():
            if path == taken or path.startswith(taken + "/") or taken.startswith(path + "/"):
                raise ConfigError(f"{where} = {path!r}: the path is taken by {owner}; "
                                  "choose another path")
        owners[path] = f"the {name} channel"
        for key, why in CHANNEL_NEEDS.get(name, {}).get("keys", {}).items():
            if not getattr(getattr(config, name), key):
                raise ConfigError(f"[channels.{name}] {key} is empty: {name} is in "
                                  f"[channels] active, and {why}")


# create_app adds them (the chat page's when it is on)
RESERVED_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/chat", "/chat.js",
                  "/chat.css")


# === Vault ==================================================================

def has_control_characters(value):
    """A secret with these cannot go into an HTTP header (a newline or tab pasted in)."""
    return any(ord(c) < 32 or ord(c) == 127 for c in value)


class Vault:
    """Named secrets. Lookup order: environment AIBUTLER_<NAME>, then the systemd
    credential $CREDENTIALS_DIRECTORY/<name>, then <data>/vault.json.

    The file is plain JSON with mode 0600, not encrypted; systemd's encrypted
    credentials (LoadCredentialEncrypted=) are the way to encrypt at rest. Writes
    hold a file lock and replace the file atomically, so concurrent `vault set`
    calls lose nothing and a crash never leaves half a file. Reads are cached and
    the file's mtime is checked at most once a second, so a running daemon sees
    changes within a second, without a restart."""

    NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
    # AIBUTLER_<NAME> of these is a setting, not a secret: such entries could never be read.
    RESERVED = {"data", "config"} | {variable[len("AIBUTLER_"):].lower()
                                     for variable in ENV_OVERRIDES}

    STAT_EVERY = 1.0  # seconds between checks of the file for changes

    def __init__(self, path, env=None):
        self.path = path
        self.env = os.environ if env is None else env
        self._cache = (None, {})
        self._checked = -math.inf

    @classmethod
    def valid_name(cls, name):
        return bool(cls.NAME_RE.match(name)) and name not in cls.RESERVED

    def get(self, name):
        return self.lookup(name)[1]

    def source(self, name):
        """Where get(name) finds its value: 'environment', 'credential', 'file' or None."""
        return self.lookup(name)[0]

    def lookup(self, name):
        """(source, value): the one place the lookup order is decided. A source
        that holds an empty value is passed over, as if it were absent."""
        value = (self.env.get("AIBUTLER_" + name.upper()) or "").strip()
        if value:
            return "environment", value
        credential = self._credential_path(name)
        if credential:
            with open(credential, encoding="utf-8") as handle:
                value = handle.read().strip()
            if value:
                return "credential", value
        value = self._read_cached().get(name)
        if isinstance(value, str) and value:
            return "file", value
        return None, None

    def _credential_path(self, name):
        """$CREDENTIALS_DIRECTORY/<name> when systemd provided that credential."""
        cred_dir = self.env.get("CREDENTIALS_DIRECTORY")
        path = os.path.join(cred_dir, name) if cred_dir else None
        return path if path and os.path.isfile(path) else None

    def names(self):
        names = set(self._read_cached())
        cred_dir = self.env.get("CREDENTIALS_DIRECTORY")
        if cred_dir and os.path.isdir(cred_dir):
            names.update(n for n in os.listdir(cred_dir) if self.valid_name(n))
        return sorted(names)

    def set(self, name, value):
        with self._locked() as data:
            data[name] = value

    def update(self, values):
        """Set several entries in one atomic write (used by rotation)."""
        with self._locked() as data:
            data.update(values)

    def delete(self, name):
        with self._locked() as data:
            return data.pop(name, None) is not None

    def _read_cached(self):
        now = time.monotonic()
        if now - self._checked < self.STAT_EVERY:
            return self._cache[1]
        try:
            info = os.lstat(self.path)
            key = (info.st_mtime_ns, info.st_size, info.st_ino)
        except FileNotFoundError:
            key = None
        except OSError as exc:
            raise VaultError(f"{self.path}: cannot read the vault: {exc.strerror}") from None
        if self._cache[0] != key:
            self._cache = (key, self._read_file() if key else {})
        self._checked = now
        return self._cache[1]

    def _read_file(self):
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            why = ("it is a symbolic link, which aibutler does not follow: remove it"
                   if exc.errno == errno.ELOOP else exc.strerror or str(exc))
            raise VaultError(f"{self.path}: cannot read the vault: {why}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO would hang root's command
            os.close(fd)
            raise VaultError(f"{self.path}: cannot read the vault: not a regular file")
        try:
            with os.fdopen(fd, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as exc:
            raise VaultError(f"{self.path}: cannot read the vault: {one_line(exc)}") from None
        if not isinstance(data, dict):
            raise VaultError(f"{self.path}: the vault is not a JSON object")
        return data

    @contextlib.contextmanager
    def _locked(self):
        directory = os.path.dirname(self.path)
        ensure_data_dir(directory)
        lock_fd = self._open(self.path + ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            data = self._read_file()
            yield data
            self._write_atomically(data)
            self._checked = -math.inf
        finally:
            os.close(lock_fd)  # closing releases the lock

    @staticmethod
    def _open(path, flags):
        try:
            return open_private(path, flags)
        except DataDirError as exc:
            raise VaultError(str(exc)) from None

    def _write_atomically(self, data):
        directory = os.path.dirname(self.path)
        tmp = f"{self.path}.{secrets.token_hex(8)}.tmp"  # unpredictable, created exclusively
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, sort_keys=True)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)  # replaces a link itself, never its target
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def ensure_webhook_secret(vault, name=SECRET_NAME):
    """No configuration ever means "open": generate a secret when none is set."""
    if vault.get(name):
        return False
    vault.set(name, secrets.token_hex(32))
    return True


def accepted_secrets(vault, grace, now=None, name=SECRET_NAME):
    """A rotated secret's current value, plus the previous one while its
    rotation grace lasts (the webhook secret, the token key)."""
    current = vault.get(name)
    found = [current] if current else []
    previous = vault.get(name + "_previous")
    rotated_at = vault.get(name + "_rotated_at")
    if previous and rotated_at:
        try:
            if (now or time.time()) < float(rotated_at) + grace:
                found.append(previous)
        except ValueError:
            log.warning("vault: %s_rotated_at is not a number; previous secret ignored", name)
    return found


class TokenError(Exception):
    """A bearer token that cannot be used; the message says which way."""


TOKEN_LEEWAY = 30  # seconds of clock difference allowed on nbf and iat (none on exp)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_token(key, sub, ttl, now=None):
    """A JWT (RFC 7519) signed with HS256, as the site's backend would mint it:
    {sub, iat, exp}, keyed with the UTF-8 bytes of `key`."""
    now = int(time.time() if now is None else now)
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = b64url(json.dumps({"sub": sub, "iat": now, "exp": now + int(ttl)},
                               separators=(",", ":")).encode())
    signature = hmac.new(key.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64url(signature)}"


def verify_token(token, keys, now):
    """The user a token lets its holder act as (its sub), or TokenError: alg
    must be HS256 (never none), the signature one of `keys`' (constant time),
    exp present and not past, nbf and iat (when present) not in the future."""
    try:
        header_text, claims_text, signature_text = token.split(".")
        header = json.loads(b64url_decode(header_text))
        signature = b64url_decode(signature_text)
    except ValueError:
        raise TokenError("malformed token: not a JWT (three base64url parts, a JSON "
                         "header)") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        alg = header.get("alg") if isinstance(header, dict) else None
        raise TokenError(f"the token's alg is {alg!r}; only HS256 is accepted")
    signed = f"{header_text}.{claims_text}".encode()
    if not any(hmac.compare_digest(hmac.new(key.encode(), signed, hashlib.sha256).digest(),
                                   signature) for key in keys):
        raise TokenError("bad signature (signed with another key, or altered)")
    try:
        claims = json.loads(b64url_decode(claims_text))
    except ValueError:
        raise TokenError("malformed token: its claims are not JSON") from None
    if not isinstance(claims, dict):
        raise TokenError("malformed token: its claims are not a JSON object")
    number = lambda name: (isinstance(claims.get(name), (int, float))  # noqa: E731
                           and not isinstance(claims[name], bool)
                           and math.isfinite(claims[name]))
    if not number("exp"):
        raise TokenError("the token has no exp claim (a number: when it expires)")
    if now >= claims["exp"]:
        raise TokenError(f"the token expired at {iso_utc(claims['exp'])}")
    for name, what in (("nbf", "is not valid before"), ("iat", "was issued at")):
        if name in claims and (not number(name) or claims[name] > now + TOKEN_LEEWAY):
            raise TokenError(f"the token {what} {iso_utc(claims.get(name))}: not yet valid "
                             "(or the clocks differ)")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip() or len(sub) > USER_ID_MAX \
            or has_control_characters(sub):
        raise TokenError(f"the token's sub must be a user_id (1 to {USER_ID_MAX} characters)")
    return sub


def check_channel_secrets(config, vault, data_dir, env):
    """At start, before listening: what an active channel cannot check requests
    or send replies without (Twilio's Auth Token)."""
    for name, needs in CHANNEL_NEEDS.items():
        for entry, what in needs.get("vault", {}).items():
            if config.channel_active(name) and not vault.get(entry):
                raise ConfigError(f"{name} is in [channels] active but the vault has no "
                                  f"{entry}; store {what} with: "
                                  + command_hint(data_dir, "vault", "set", entry, env=env))


# === Storage (sqlite) =======================================================

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, created REAL NOT NULL, last_active REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id, last_active);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_id, id);
CREATE TRIGGER IF NOT EXISTS messages_touch_session AFTER INSERT ON messages BEGIN
    UPDATE sessions SET last_active = NEW.created WHERE id = NEW.session_id; END;
CREATE TABLE IF NOT EXISTS memories (
    id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, fact TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS memories_by_user ON memories (user_id, id);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    session_id TEXT NOT NULL, request TEXT NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL, finished REAL);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
    body TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL, last_error TEXT, created REAL NOT NULL, finished REAL);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt);
CREATE TABLE IF NOT EXISTS idempotency (
    user_id TEXT NOT NULL, key TEXT NOT NULL, request_hash TEXT NOT NULL,
    state TEXT NOT NULL, status INTEGER, response TEXT, created REAL NOT NULL,
    PRIMARY KEY (user_id, key));
CREATE TABLE IF NOT EXISTS seen_signatures (
    webhook_id TEXT NOT NULL, timestamp TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (webhook_id, timestamp));
"""


def new_id(prefix):
    """80 bits from the system's CSPRNG: an id shown to one sender (a message,
    a session) is a capability nobody else can guess from the ids they saw."""
    return f"{prefix}-{secrets.token_hex(10)}"


def is_storage_failure(exc):
    """The disk or the file failed (full, read-only, I/O, corrupt, locked), as
    opposed to a bug in a statement: the first is retried later, not a 500."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


UNSYNCED = "committed, not synced:"  # what a failed group-commit fsync says first


def storage_problem(exc):
    """What went wrong, in words an operator (and a sender) can act on."""
    text = str(exc).lower()
    for words, cause in (("full", "the disk is full"), ("readonly", "the database is read-only"),
                         ("locked", "the database is locked by another process"),
                         ("i/o", "a disk I/O error"), ("open", "the database cannot be opened")):
        if words in text:
            return cause
    return "the database cannot be written"


def old_journal_generation(line):
    """The generation named by the first line of an old history journal."""
    with contextlib.suppress(ValueError):
        value = json.loads(line)
        if isinstance(value, dict) and isinstance(value.get("generation"), str):
            return value["generation"]
    return None


def old_journal_record(line):
    """[session_id, user_id, user_text, reply, created, max_history], or None."""
    with contextlib.suppress(ValueError):
        record = json.loads(line)
        if (isinstance(record, list) and len(record) == 6
                and all(isinstance(v, str) for v in record[:4])):
            return record
    log.warning("history: skipped a line of the old journal that is not an exchange")
    return None


class Checkpointer:
    """Copies the WAL back into the database once a second when commits were
    made, from a connection of its own and without blocking writers (a
    PASSIVE checkpoint), so the WAL stays small and no turn waits for it.
    While writes fail (a full disk), it tries a probe write instead, so an idle
    daemon finds out that space was freed."""

    EVERY = 1.0  # seconds
    # Past this many WAL frames left over (about 16 MB: writes on a slow SD card
    # that never let a passive checkpoint catch up), a RESTART checkpoint waits
    # for the writer once, so the WAL starts over instead of growing for ever.
    MOST_FRAMES = 4096
    RESTART_WAIT = 10.0  # seconds it may wait for the writer (busy_timeout)

    def __init__(self, store):
        self.store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoints", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _run(self):
        db = sqlite3.connect(self.store.path, timeout=self.RESTART_WAIT, isolation_level=None)
        try:
            done = self.store.commits()
            while not self._stop.wait(self.EVERY):
                try:
                    if self.store.write_error is not None:  # does writing work again?
                        self.store.probe()
                    elif self.store.commits() != done:
                        done = self.store.commits()
                        _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        if frames - copied > self.MOST_FRAMES or frames > 4 * self.MOST_FRAMES:
                            db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                except sqlite3.Error as exc:  # a full disk: the WAL waits, nothing is lost
                    log.warning("storage: checkpoint failed (%s); trying again in %gs",
                                one_line(exc), self.EVERY)
        finally:
            db.close()


class Store:
    """Everything that must survive a restart, in one sqlite file (WAL mode).

    One connection, used by one thread at a time: each operation holds it for
    a few statements. Threads come and go with the load (TurnGate) and need no
    connection of their own, and no page cache goes stale because another
    connection wrote. Write transactions are BEGIN IMMEDIATE, so claiming a job
    or a delivery is atomic across processes too (the `deliveries` CLI edits the
    same file while the daemon runs)."""

    def __init__(self, path, clock=time.time, fsync=os.fsync):
        self.path = path
        self.clock = clock
        self._db = None
        self._db_lock = threading.RLock()  # a transaction's body may read through it
        # One writer at a time inside this process: threads queue on a lock
        # instead of sleeping in sqlite's busy handler (which costs milliseconds).
        self._write_lock = threading.Lock()
        self.write_error = None  # why the last write failed, until one succeeds
        self._failed_at = -math.inf  # when a write last failed (time.monotonic())
        # Created here, not by sqlite: never through a link, 0600 whatever the
        # umask, and (when root runs the CLI) owned by the service user.
        for suffix in ("", "-shm"):
            os.close(open_private(path + suffix))
        self._wal = open_private(path + "-wal")  # kept open: durable commits fsync it
        self._fsync = fsync
        self._synced = threading.Condition()  # group commit, see _sync_through
        self._committed = self._on_disk = 0   # commits made / known to be on disk
        self._syncing = False
        # While a durable commit waits for a slow disk its thread is parked (as at
        # the TurnGate: Butler sets `parked`), so more accepts join the next fsync.
        self.slow_disk = False
        self.parked = contextlib.nullcontext
        self._checkpoints = None  # the daemon's Checkpointer (the CLI's commits checkpoint)
        self._pending = 0
        try:
            with self.connection() as db:
                db.executescript(SCHEMA)
                self._add_missing_columns(db)
            if self._read_one("PRAGMA user_version")[0] < 1:
                self._keep_channels_apart()
            self._pending = self._count_pending()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise DataDirError(f"{path}: cannot use the database: {exc} (move the file "
                               "aside to start with an empty one)") from None

    # Columns added since the first release: a file made by an older version
    # gets them at start (sqlite's ALTER TABLE ADD COLUMN is instant).
    ADDED_COLUMNS = {"jobs": {"result": "TEXT", "channel": "TEXT NOT NULL DEFAULT 'webhook'"},
                     "deliveries": {"channel": "TEXT NOT NULL DEFAULT 'webhook'"}}

    @staticmethod
    def _add_missing_columns(db):
        for table, columns in Store.ADDED_COLUMNS.items():
            present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def _keep_channels_apart(self):
        """Version 0.1 kept every channel's users in one space (a webhook sender
        could post as a texter and read their memories). A texter's sessions,
        memories, keys, jobs and outbox entries move to their own ids (see
        CHANNEL_USER): every user_id that a Twilio message came from is one."""
        texter = "'twilio' || char(31) || user_id"
        texters = "user_id IN (SELECT user_id FROM jobs WHERE channel='twilio')"
        with self.transaction() as db:
            for table in ("sessions", "memories", "idempotency"):
                db.execute(f"UPDATE {table} SET user_id = {texter} WHERE {texters}")
            for row in db.execute("SELECT seq, request FROM jobs WHERE channel='twilio'"
                                  ).fetchall():
                request = json.loads(row["request"])
                request["reply_to"] = request.get("reply_to", request["user_id"])
                request["user_id"] = "twilio" + CHANNEL_USER + request["reply_to"]
                db.execute("UPDATE jobs SET request=? WHERE seq=?",
                           (json.dumps(request), row["seq"]))
            for table in ("jobs", "deliveries"):
                db.execute(f"UPDATE {table} SET user_id = {texter} WHERE channel='twilio'")
            db.execute("PRAGMA user_version = 1")

    BUSY_TIMEOUT_MS = 10000  # how long a write waits for another process (the CLI)
    SLOW_FSYNC = 0.002  # seconds: an fsync slower than this is a slow disk (SD card)

    @contextlib.contextmanager
    def connection(self):
        """The connection, for one operation. Its commits survive a killed
        process; a power cut only once the WAL is synced (durable transactions
        wait for it)."""
        with self._db_lock:
            if self._db is None:
                self._db = self._connect()
            yield self._db

    def _read(self, sql, params=()):
        with self.connection() as db:
            return db.execute(sql, params).fetchall()

    def _read_one(self, sql, params=()):
        with self.connection() as db:
            return db.execute(sql, params).fetchone()

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_MS / 1000,
                             isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA busy_timeout={self.BUSY_TIMEOUT_MS}")
        return db

    @contextlib.contextmanager
    def transaction(self, durable=False):
        """One write transaction; durable=True: on disk before it returns (a
        promise made to a sender). The in-memory count of pending jobs changes
        only once COMMIT succeeded."""
        with self.connection() as db, self._writer():
            self._pending_change = 0
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._pending += self._pending_change
            self._committed += 1
            mine = self._committed
        if durable:
            self._sync_through(mine)

    def _sync_through(self, commit):
        """Group commit: wait until the WAL is on disk up to `commit`. The first
        thread to need it fsyncs the WAL outside the write lock, for every commit
        made so far; those arriving meanwhile wait for the next fsync and share
        it: one fsync per durable commit on a fast disk, one for all the commits
        made during the last when it takes milliseconds (an SD card), and writers
        never wait for the disk while holding the write lock."""
        with self.parked() if self.slow_disk else contextlib.nullcontext(), self._synced:
            while self._on_disk < commit:
                if self._syncing:
                    self._synced.wait()
                    continue
                self._syncing, covered = True, self._committed
                self._synced.release()
                try:
                    if self._wal is None:
                        raise sqlite3.ProgrammingError("the store is closed")
                    started = time.monotonic()
                    self._fsync(self._wal)
                    self.slow_disk = time.monotonic() - started > self.SLOW_FSYNC
                except OSError as exc:  # a 503 like any failed write, and /readyz says so
                    self._write_failed(exc)
                    raise sqlite3.OperationalError(f"{UNSYNCED} disk I/O error: {exc}") from None
                finally:
                    self._synced.acquire()
                    self._syncing = False
                    self._synced.notify_all()
                self._on_disk = max(self._on_disk, covered)

    @contextlib.contextmanager
    def _writer(self):
        """This process's one writer slot; remembers whether writing works."""
        with self._write_lock:
            try:
                yield
            except sqlite3.Error as exc:
                if is_storage_failure(exc):
                    self._write_failed(exc)
                raise
            self.write_error = None

    def _write_failed(self, exc):
        self.write_error = storage_problem(exc)
        self._failed_at = time.monotonic()

    STORAGE_SETTLE = 3.0  # seconds without a failed write before writing counts as working

    def writable(self):
        """False from the first failed write until a write succeeds and none
        fails for STORAGE_SETTLE seconds: on a disk that is nearly full, small
        writes succeed between failing ones, and /readyz must not flap with
        them. Never waits, never writes (a probe answers at once)."""
        return (self.write_error is None
                and time.monotonic() - self._failed_at >= self.STORAGE_SETTLE)

    def probe(self):
        """A write that changes nothing, to find out whether writing works
        again (the Checkpointer, while the last write failed). Quietly False
        while it does not."""
        try:
            with self.transaction() as db:  # pages really written, then gone
                db.execute("INSERT INTO seen_signatures VALUES ('probe', 'probe', 0)")
                db.execute("DELETE FROM seen_signatures WHERE webhook_id='probe'")
        except sqlite3.Error as exc:
            if not is_storage_failure(exc):
                raise
            return False
        return True

    def checkpoint_in_background(self):
        """The daemon's turns never wait for a checkpoint (on an SD card it
        fsyncs the database, tens of milliseconds): sqlite's automatic one, run
        by whichever commit crosses 1000 pages while holding the connection,
        is off, and a thread of its own checkpoints instead."""
        with self.connection() as db:
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute(f"PRAGMA journal_size_limit={Checkpointer.MOST_FRAMES * 1024}")
        self._checkpoints = Checkpointer(self)
        self._checkpoints.start()

    def close(self):
        """The checkpoints, the connection (sqlite checkpoints and removes the
        WAL), the WAL's descriptor."""
        if self._checkpoints is not None:
            self._checkpoints.stop()
            self._checkpoints = None
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        if self._wal is not None:
            os.close(self._wal)
            self._wal = None

    def commits(self):
        return self._committed

    def import_old_journal(self):
        """Versions up to 0.1 wrote turns' history behind, through <db>-history;
        one killed with exchanges still in it left them there. They go into
        `messages` once, in order, with the file's position in one transaction
        (a crash before the file is removed imports nothing twice); then the
        file and its position go. Returns how many exchanges were imported."""
        path = self.path + "-history"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            with self.transaction() as db:
                db.execute("DROP TABLE IF EXISTS history_journal")
            return 0
        except OSError as exc:
            raise DataDirError(f"{path}: cannot read it: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as handle:
            lines = handle.read().split(b"\0", 1)[0].split(b"\n")[:-1]  # complete lines
        header = old_journal_generation(lines[0]) if lines else None
        with self.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS history_journal (id INTEGER PRIMARY KEY "
                       "CHECK (id = 1), generation TEXT NOT NULL, moved_to INTEGER NOT NULL)")
            row = db.execute("SELECT generation, moved_to FROM history_journal").fetchone()
            moved_to = row["moved_to"] if header and row and row["generation"] == header else 0
            offset, count = (len(lines[0]) + 1, 0) if header else (0, 0)
            for line in lines[1:] if header else lines:
                offset += len(line) + 1
                record = old_journal_record(line) if line and offset > moved_to else None
                if record:
                    session_id, _, user_text, reply, created, max_history = record
                    self.record_exchange(db, session_id, user_text, reply, max_history, created)
                    count += 1
            db.execute("INSERT OR REPLACE INTO history_journal VALUES (1, ?, ?)",
                       (header or "", offset))
        os.unlink(path)
        with self.transaction() as db:
            db.execute("DROP TABLE history_journal")
        return count

    # --- sessions and history ------------------------------------------------

    def resolve_session(self, user_id, session_id, idle_timeout, db=None):
        """The session to use: the one asked for (it must be this user's), else
        the user's current one if active within idle_timeout, else a new one.
        Returns None when session_id names no session of this user. Only a new
        session writes; record_exchange keeps last_active current."""
        now = self.clock()
        read_one = self._read_one if db is None else lambda *q: db.execute(*q).fetchone()
        if session_id:
            row = read_one("SELECT id FROM sessions WHERE id=? AND user_id=?",
                           (session_id, user_id))
            return row["id"] if row else None
        find = ("SELECT id FROM sessions WHERE user_id=? AND last_active>=? "
                "ORDER BY last_active DESC LIMIT 1", (user_id, now - idle_timeout))
        row = read_one(*find)
        if row is not None:
            return row["id"]
        if db is None:
            with self.transaction() as db:
                return self._new_session(db, user_id, find, now)
        return self._new_session(db, user_id, find, now)

    def _new_session(self, db, user_id, find, now):
        row = db.execute(*find).fetchone()  # another thread may have just made it
        if row is not None:
            return row["id"]
        sid = new_id("sess")
        db.execute("INSERT INTO sessions (id, user_id, created, last_active) VALUES (?,?,?,?)",
                   (sid, user_id, now, now))
        return sid

    def history(self, session_id, limit):
        """The newest `limit` messages, from the first user message among them:
        chat templates (Gemma, Mistral) refuse a history that opens with the
        assistant. Tool calls are never stored, so none is split from its result."""
        rows = self._read(
            "SELECT role, content FROM messages WHERE session_id=? ORDER BY id DESC LIMIT ?",
            (session_id, limit))
        window = [{"role": row["role"], "content": row["content"]} for row in reversed(rows)]
        while window and window[0]["role"] != "user":
            window.pop(0)
        return window

    def record_exchange(self, db, session_id, user_text, reply, max_history, created=None):
        """Inside the transaction that finishes a turn (with its idempotency key
        or its job), so a killed process records an exchange once or not at all:
        both messages, then the session trimmed to its newest max_history
        messages (a trigger touches the session)."""
        created = self.clock() if created is None else created
        db.execute("INSERT INTO messages (session_id, role, content, created) "
                   "VALUES (?,'user',?,?), (?,'assistant',?,?)",
                   (session_id, user_text, created, session_id, reply, created))
        self.trim_history(db, max_history, session_id)

    @staticmethod
    def trim_history(db, max_history, session_id=None):
        """Keep the newest max_history messages of one session (or of all)."""
        if session_id:
            db.execute("DELETE FROM messages WHERE session_id=? AND id <= (SELECT id FROM "
                       "messages WHERE session_id=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                       (session_id, session_id, max_history))
        else:
            db.execute("DELETE FROM messages WHERE id IN (SELECT id FROM (SELECT id, "
                       "ROW_NUMBER() OVER (PARTITION BY session_id ORDER BY id DESC) AS n "
                       "FROM messages) WHERE n > ?)", (max_history,))

    # --- per-user memory -------------------------------------------------------

    def remember(self, user_id, fact):
        with self.transaction() as db:
            db.execute("INSERT INTO memories (user_id, fact, created) VALUES (?,?,?)",
                       (user_id, fact, self.clock()))

    def recall(self, user_id, query="", limit=20):
        """This user's facts, newest first; with a query, only those sharing a
        word with it (see words_in), the ones sharing the most first."""
        rows = self._read("SELECT fact FROM memories WHERE user_id=? ORDER BY id DESC",
                          (user_id,))
        words = self.recall_words(query)
        facts = [row["fact"] for row in rows]
        if words:
            scored = [(self.words_in(words, fact), fact) for fact in facts]
            facts = [fact for score, fact in sorted(scored, key=lambda pair: -pair[0]) if score]
        return facts[:limit]

    # Words that would make "what is my wifi password?" match every fact.
    RECALL_STOP_WORDS = frozenset(
        "about again all and any are can could did does done for from had has have her "
        "here him his how its just know let may might mine now our please recall "
        "remember she should some tell than that the their them then there these they "
        "this those was were what whats when where which who whom why will with would "
        "you your yours".split())

    @classmethod
    def recall_words(cls, text):
        """The words of a query that tell facts apart: 3+ letters, not stop words."""
        words = re.findall(r"\w+", text.lower())
        return list(dict.fromkeys(word for word in words
                                  if len(word) > 2 and word not in cls.RECALL_STOP_WORDS))

    @staticmethod
    def word_forms(text):
        """Its words with their plain forms: 'parked keys' -> parked, park, keys, key."""
        forms = set()
        for word in re.findall(r"\w+", text.lower()):
            forms.add(word)
            forms.update(word[:-len(end)] for end in ("s", "es", "ed", "ing")
                         if word.endswith(end) and len(word) - len(end) >= 3)
        return forms

    @classmethod
    def words_in(cls, words, fact):
        """How many of the words the fact has, in some form ('park' is in 'parked')."""
        forms = cls.word_forms(fact)
        return sum(bool(cls.word_forms(word) & forms) for word in words)

    # --- idempotency -------------------------------------------------------------

    def idempotency_begin(self, db, user_id, key, request_hash, ttl):
        """Inside a transaction: claim (user_id, key) or report what is there.
        Returns ('new', None), ('done', row), ('pending', row) or ('mismatch', row)."""
        now = self.clock()
        row = db.execute("SELECT * FROM idempotency WHERE user_id=? AND key=?",
                         (user_id, key)).fetchone()
        if row is not None and row["created"] < now - ttl:
            db.execute("DELETE FROM idempotency WHERE user_id=? AND key=?", (user_id, key))
            row = None
        if row is None:
            db.execute("INSERT INTO idempotency (user_id, key, request_hash, state, created) "
                       "VALUES (?,?,?,'pending',?)", (user_id, key, request_hash, now))
            return "new", None
        if row["request_hash"] != request_hash:
            return "mismatch", row
        return row["state"], row

    def idempotency_finish(self, db, user_id, key, status, response):
        db.execute("UPDATE idempotency SET state='done', status=?, response=? "
                   "WHERE user_id=? AND key=?", (status, json.dumps(response), user_id, key))

    def idempotency_drop(self, user_id, key):
        with self.transaction() as db:
            db.execute("DELETE FROM idempotency WHERE user_id=? AND key=? AND state='pending'",
                       (user_id, key))

    # --- the async queue: jobs in, deliveries out -------------------------------

    def add_job(self, db, message_id, user_id, session_id, request, channel="webhook"):
        db.execute("INSERT INTO jobs (message_id, user_id, session_id, request, state, created, "
                   "channel) VALUES (?,?,?,?,'queued',?,?)",
                   (message_id, user_id, session_id, json.dumps(request), self.clock(), channel))
        self._pending_change += 1

    def pending_jobs(self):
        """Jobs queued or running, counted in memory (only the daemon adds and
        finishes jobs)."""
        return self._pending

    def _count_pending(self):
        return self._read_one("SELECT COUNT(*) FROM jobs WHERE state IN ('queued','running')")[0]

    def claim_job(self, hold):
        """The oldest queued job whose user has no job running (per-user order);
        hold(seq) records the claim while the write lock is still held."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE state='queued' AND user_id NOT IN "
                "(SELECT user_id FROM jobs WHERE state='running') ORDER BY seq LIMIT 1").fetchone()
            if row is not None:
                db.execute("UPDATE jobs SET state='running' WHERE seq=?", (row["seq"],))
                hold(row["seq"])
            return row

    def finish_job(self, job, body, deliver, outgoing=None, exchange=None):
        """The turn is over: keep its result (for GET .../messages/{id}), its
        exchange in history (`exchange`: (user_text, reply, max_history)) and,
        if it is to be delivered, put it (or `outgoing`, what its channel sends)
        in the outbox, in one transaction, so a crash between them cannot lose
        or repeat any."""
        now = self.clock()
        with self.transaction() as db:
            if exchange is not None:
                self.record_exchange(db, job["session_id"], *exchange)
            db.execute("UPDATE jobs SET state='done', finished=?, result=? WHERE seq=?",
                       (now, json.dumps(body), job["seq"]))
            if deliver:
                self.add_delivery(db, job["message_id"], job["user_id"],
                                  body if outgoing is None else outgoing, job["channel"])
            self._pending_change -= 1

    def message(self, message_id):
        """A message's job and its delivery (either may be None)."""
        with self.connection() as db:
            job = db.execute("SELECT * FROM jobs WHERE message_id=?", (message_id,)).fetchone()
            delivery = db.execute("SELECT * FROM deliveries WHERE message_id=?",
                                  (message_id,)).fetchone()
        return job, delivery

    def add_delivery(self, db, message_id, user_id, body, channel="webhook"):
        db.execute("INSERT INTO deliveries (message_id, user_id, body, state, next_attempt, "
                   "created, channel) VALUES (?,?,?,'pending',?,?,?)",
                   (message_id, user_id, json.dumps(body), self.clock(), self.clock(), channel))

    def recover(self):
        """At start: work a killed process left half done goes back in line."""
        with self.transaction() as db:
            jobs = db.execute("UPDATE jobs SET state='queued' WHERE state='running'").rowcount
            sends = db.execute(
                "UPDATE deliveries SET state='pending' WHERE state='sending'").rowcount
            db.execute("DELETE FROM idempotency WHERE state='pending'")
        return jobs, sends

    def requeue(self, table, held):
        """Jobs ('running') or deliveries ('sending') a failed write left behind go
        back in line; held() names those threads still have in hand (asked under
        the write lock, so no claim slips in between). A receiver may see a
        delivery twice, with the same webhook-id."""
        states = {"jobs": ("running", "queued"), "deliveries": ("sending", "pending")}
        stuck, ready = states[table]
        with self.transaction() as db:
            keep = tuple(held())
            return db.execute(f"UPDATE {table} SET state='{ready}' WHERE state='{stuck}' AND "
                              f"seq NOT IN ({','.join('?' * len(keep))})", keep).rowcount

    def claim_delivery(self, hold):
        now = self.clock()
        with self.transaction() as db:
            row = db.execute("SELECT * FROM deliveries WHERE state='pending' AND next_attempt<=? "
                             "ORDER BY next_attempt, seq LIMIT 1", (now,)).fetchone()
            if row is not None:
                db.execute("UPDATE deliveries SET state='sending', attempts=attempts+1 "
                           "WHERE seq=?", (row["seq"],))
                hold(row["seq"])
            return row

    def next_delivery_due(self):
        return self._read_one("SELECT MIN(next_attempt) FROM deliveries WHERE state='pending'")[0]

    def delivery_done(self, seq):
        with self.transaction() as db:
            db.execute("UPDATE deliveries SET state='delivered', finished=?, last_error=NULL "
                       "WHERE seq=?", (self.clock(), seq))

    def delivery_progress(self, seq, body):
        """A delivery sent in parts (Twilio): what is sent so far, so a retry
        or the next start goes on from the first unsent part."""
        with self.transaction() as db:
            db.execute("UPDATE deliveries SET body=? WHERE seq=?", (json.dumps(body), seq))

    def delivery_retry_at(self, seq, when, error):
        with self.transaction() as db:
            db.execute("UPDATE deliveries SET state='pending', next_attempt=?, last_error=? "
                       "WHERE seq=?", (when, error, seq))

    def delivery_failed(self, seq, error):
        with self.transaction() as db:
            db.execute("UPDATE deliveries SET state='failed', finished=?, last_error=? "
                       "WHERE seq=?", (self.clock(), error, seq))

    def list_deliveries(self, failed_only=False, limit=100):
        sql = "SELECT * FROM deliveries"
        if failed_only:
            sql += " WHERE state='failed'"
        return self._read(sql + " ORDER BY seq DESC LIMIT ?", (limit,))

    def retry_deliveries(self, message_id=None):
        """Put failed (or one named) deliveries back in line with a fresh schedule."""
        with self.transaction() as db:
            if message_id:
                cursor = db.execute(
                    "UPDATE deliveries SET state='pending', attempts=0, next_attempt=? "
                    "WHERE message_id=? AND state IN ('failed','pending')",
                    (self.clock(), message_id))
            else:
                cursor = db.execute(
                    "UPDATE deliveries SET state='pending', attempts=0, next_attempt=? "
                    "WHERE state='failed'", (self.clock(),))
            return cursor.rowcount

    def drop_deliveries(self, message_id=None):
        """Forget callbacks not sent yet: one, or every pending one."""
        with self.transaction() as db:
            if message_id:
                return db.execute("DELETE FROM deliveries WHERE message_id=? AND state IN "
                                  "('pending','sending')", (message_id,)).rowcount
            return db.execute("DELETE FROM deliveries WHERE state IN ('pending','sending')"
                              ).rowcount

    def purge_deliveries(self, older_than):
        cutoff = self.clock() - older_than
        with self.transaction() as db:
            return db.execute("DELETE FROM deliveries WHERE state IN ('delivered','failed') "
                              "AND finished < ?", (cutoff,)).rowcount

    def delivery_counts(self):
        rows = self._read("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
        return {state: count for state, count in rows}

    # --- signed inbound requests -----------------------------------------------

    def signature_seen(self, webhook_id, timestamp, window):
        """Record (id, timestamp); True if it was already there (a replay)."""
        now = self.clock()
        with self.transaction() as db:
            db.execute("DELETE FROM seen_signatures WHERE created < ?", (now - window,))
            cursor = db.execute("INSERT OR IGNORE INTO seen_signatures VALUES (?,?,?)",
                                (webhook_id, timestamp, now))
            return cursor.rowcount == 0

    KEEP_FINISHED = 7 * 86400  # seconds finished jobs and delivered callbacks are kept

    def prune(self, idempotency_ttl, max_history, keep_done=KEEP_FINISHED):
        """Keep the file from growing without bound on a device left alone for months."""
        now = self.clock()
        with self.transaction() as db:
            self.trim_history(db, max_history)
            db.execute("DELETE FROM idempotency WHERE state='done' AND created < ?",
                       (now - idempotency_ttl,))
            # a message's result is kept as long as its idempotency key
            db.execute("DELETE FROM jobs WHERE state='done' AND finished < ?",
                       (now - idempotency_ttl,))
            db.execute("DELETE FROM deliveries WHERE state='delivered' AND finished < ?",
                       (now - keep_done,))


# === Metrics (Prometheus text format) =======================================

class Metrics:
    """Counters, histograms and gauges, rendered as Prometheus text at /metrics."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
    DECLARED = {
        "aibutler_http_requests_total": ("counter", "HTTP requests by path and status."),
        "aibutler_http_request_seconds": ("histogram", "HTTP request latency."),
        "aibutler_agent_turns_total": ("counter", "Agent turns by provider and outcome."),
        "aibutler_model_seconds": ("histogram", "Latency of one model call by provider."),
        "aibutler_tool_calls_total": ("counter", "Tool calls by tool and outcome."),
        "aibutler_deliveries_total": ("counter", "Callback attempts by outcome."),
        "aibutler_rate_limited_total": ("counter", "Requests refused by a rate limit, by scope."),
        "aibutler_auth_failures_total": ("counter", "Requests with a missing or wrong secret."),
        "aibutler_auth_tracked_addresses": ("gauge", "Client addresses the auth throttle "
                                                     "remembers (failing or blocked; bounded)."),
        "aibutler_queue_depth": ("gauge", "Async messages accepted and not yet answered."),
        "aibutler_deliveries_pending": ("gauge", "Callbacks waiting to be delivered."),
        "aibutler_turns_running": ("gauge", "Turns under way ([agent] concurrency at most)."),
        "aibutler_turns_waiting": ("gauge", "Turns waiting for a place at the model."),
        "aibutler_requests_waiting": ("gauge", "Requests waiting for a reply (Prefer: wait, "
                                               "long polls of a message's status, a repeat "
                                               "of a request still running)."),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._counters = {}
        self._histograms = {}
        self._gauges = {}

    def _key(self, name, labels):
        if name not in self.DECLARED:  # a typo would be counted and never rendered
            raise KeyError(f"metric {name!r} is not declared in Metrics.DECLARED")
        return (name, tuple(labels))

    def inc(self, name, labels=(), value=1):
        key = self._key(name, labels)
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + value

    def observe(self, name, labels, seconds):
        """Counted in its own bucket only (render adds them up): one bisect, not
        a loop over every bucket, on each request."""
        key = self._key(name, labels)
        bucket = bisect.bisect_left(self.BUCKETS, seconds)  # the first bound >= seconds
        with self._lock:
            counts = self._histograms.get(key)
            if counts is None:
                counts = self._histograms[key] = [0] * (len(self.BUCKETS) + 3)
            counts[bucket] += 1  # index len(BUCKETS): above the last bound
            counts[-2] += seconds
            counts[-1] += 1

    def gauge(self, name, func):
        self._key(name, ())
        self._gauges[name] = func

    def value(self, name, labels=()):
        return self._counters.get((name, tuple(labels)), 0)

    def render(self):
        lines = []
        with self._lock:
            counters = dict(self._counters)
            histograms = {key: list(counts) for key, counts in self._histograms.items()}
        for name, (kind, help_text) in self.DECLARED.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if kind == "counter":
                for (metric, labels), value in sorted(counters.items()):
                    if metric == name:
                        lines.append(f"{name}{format_labels(labels)} {value:g}")
            elif kind == "histogram":
                for (metric, labels), counts in sorted(histograms.items()):
                    if metric != name:
                        continue
                    for bound, count in zip(self.BUCKETS, itertools.accumulate(counts)):
                        lines.append(f"{name}_bucket{format_labels(labels + (('le', f'{bound:g}'),))} {count}")
                    lines.append(f"{name}_bucket{format_labels(labels + (('le', '+Inf'),))} {counts[-1]}")
                    lines.append(f"{name}_sum{format_labels(labels)} {counts[-2]:.6f}")
                    lines.append(f"{name}_count{format_labels(labels)} {counts[-1]}")
            elif name in self._gauges:
                try:
                    lines.append(f"{name} {self._gauges[name]():g}")
                except Exception:  # a gauge must never break the scrape; say why in the log
                    log.exception("metrics: gauge %s failed", name)
        return "\n".join(lines) + "\n"


def format_labels(labels):
    """{key="value",...}: backslash, double quote and line feed escaped as the
    Prometheus text format says; it has no escape for other control characters
    (a CR would go out raw), so they become U+FFFD."""
    if not labels:
        return ""
    escaped = (key + '="' + LABEL_CONTROLS.sub("\ufffd", str(value).replace("\\", "\\\\")
                                               .replace('"', '\\"').replace("\n", "\\n")) + '"'
               for key, value in labels)
    return "{" + ",".join(escaped) + "}"


LABEL_CONTROLS = re.compile("[\x00-\x1f\x7f]")


# === Agent: model providers =================================================

class ModelReply:
    """What one model call gave: text, tool calls ({id, name, arguments, and
    `extra`: fields of the call the provider wants back}), `cut` when the text
    was cut off (CUT_NOTES says why), and `echo`: fields of the assistant
    message the provider requires back within the turn (DeepSeek's
    reasoning_content), never shown to the user nor kept in history."""

    CUT_NOTES = {
        "max_tokens": "the reply was cut off at [agent] max_tokens; raise it for complete "
                      "answers",
        "reasoning": "the model spent all of [agent] max_tokens on its reasoning and wrote no "
                     "reply; raise max_tokens (reasoning models need several thousand)",
        "context": "the conversation no longer fits the model's context window (raising "
                   "max_tokens will not help); start a new session"}

    def __init__(self, text="", tool_calls=(), cut=None, echo=None, refused=False):
        self.text = text or ""
        self.tool_calls = list(tool_calls)
        self.cut = cut
        self.echo = echo or {}
        self.refused = refused  # Anthropic: the turn must not go back to the model

    @property
    def truncated(self):
        return self.cut is not None


CALL_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def mint_call_id():
    """An id for a tool call a server sent without one: 9 letters and digits,
    what Mistral's API requires and every other accepts."""
    return "".join(secrets.choice(CALL_ID_ALPHABET) for _ in range(9))


class BuiltinModel:
    """The offline default: a small rule-based stand-in for a language model. It
    speaks the same protocol as the real providers (asks for tools, then answers
    from their results), so the turn loop, tools and history are the same code."""

    name = "builtin"
    NO_MODEL = ("I'm running without a language model, so I can only greet you, tell the "
                "time and date, give the current weather, do arithmetic, and remember or "
                "recall facts. To answer anything else, connect a model: set [agent] "
                "provider = openai (OpenAI, Ollama, llama.cpp...) or anthropic in config.ini "
                "and store the key with `python3 aibutler.py vault set openai_api_key` "
                "(see the README).")
    HELP_TEXT = ("I'm AI Butler. Without a language model I can: tell the time and date "
                 "(\"what time is it?\"), give the current weather (\"what's the weather "
                 "in Madrid?\"), calculate (\"what is 17 * 23?\"), remember facts "
                 "(\"remember that my locker is 42\") and recall them (\"what is my "
                 "locker?\", \"what do you remember?\").")
    NO_PLACE = ("Where are you? Tell me a town or city (\"what's the weather in Madrid?\") "
                "and I'll look it up.")
    WEATHER_OFF = ("I can't look up the weather here: the weather tool is turned off "
                   "([tools] enabled).")
    GREETING = re.compile(r"^\s*(hi|hello|hey|hiya|howdy|greetings|good (morning|afternoon|"
                          r"evening|day))\b", re.I)
    ASKS_FOR_HELP = re.compile(r"\b(help|what can you do)\b", re.I)
    REMEMBER = re.compile(r"^\s*(please\s+)?remember(\s+that)?\s+(?P<fact>.+?)\s*\.?\s*$",
                          re.I | re.S)
    RECALL = re.compile(r"\b(what do you (remember|know)|what did i tell you|recall)\b"
                        r"(\s+about)?(?P<query>[^?]*)", re.I)
    TIME = re.compile(r"\b(what time|the time|time is it|the date|today's date|what day|"
                      r"date today)\b", re.I)
    EXPRESSION = re.compile(r"[-+(]*\d[\d\s.+\-*/%^()×÷]*")
    WEATHER = re.compile(r"\b(weather|forecast|what(['’]?s| is) the temperature|how (hot|cold|"
                         r"warm|windy) is it|is it (raining|snowing|sunny|cloudy|windy|foggy|"
                         r"cold|hot|warm|freezing|stormy)|(will|going to) (it )?(rain|snow))\b",
                         re.I)
    # "... in Paris", "... for São Paulo today?": the place is the end of the sentence.
    PLACE = re.compile(r"\b(in|for|at|near)\s+(?P<place>[^?!;]+?)[\s?!.]*$", re.I)
    PLACE_TAIL = re.compile(r"\s+(right now|now|today|currently|at the moment|tonight|"
                            r"tomorrow|this (morning|afternoon|evening|week)|in the (morning|"
                            r"afternoon|evening)|like|please)$", re.I)
    NOT_A_PLACE = re.compile(r"^(the )?(moment|now|today|tonight|tomorrow|weekend|morning|"
                             r"afternoon|evening|here|me|us|area|outside)$|^(my|our|this) ", re.I)
    QUESTION = re.compile(r"\?\s*$|^\s*(what|where|when|who|which|why|how|do|does|did|is|"
                          r"are|was|were|can|could|tell me|remind me)\b", re.I)

    def complete(self, system, messages, tools, on_text=None):
        """The reply decided by rules; with on_text, given to it word by word."""
        reply = self._decide(messages, tools)
        for word in re.findall(r"\S+\s*", reply.text) if on_text else ():
            on_text(word)
        return reply

    def _decide(self, messages, tools):
        last = messages[-1]
        if last["role"] == "tool":
            return ModelReply(self._answer_from_tools(messages))
        text = last.get("text", last["content"]).strip()
        available = {tool.name for tool in tools}

        def call(name, **arguments):
            if name not in available:
                return ModelReply(self.WEATHER_OFF if name == "weather" else self.NO_MODEL)
            return ModelReply("", [{"id": mint_call_id(), "name": name,
                                    "arguments": json.dumps(arguments)}])

        match = self.REMEMBER.match(text)
        if match:
            return call("remember", fact=match.group("fact"))
        match = self.RECALL.search(text)
        if match:
            return call("recall", query=match.group("query").strip(" .?"))
        expression = self._expression(text)
        if expression:
            return call("calculate", expression=expression)
        match = self.WEATHER.search(text)
        if match:
            place = self._place(text[match.end():])
            return call("weather", location=place) if place else call("weather")
        if self.TIME.search(text):
            return call("current_time")
        if self.GREETING.match(text):
            return ModelReply("Hello! " + self.HELP_TEXT)
        if self.ASKS_FOR_HELP.search(text):
            return ModelReply(self.HELP_TEXT)
        words = Store.recall_words(text)
        if words and self.QUESTION.search(text):  # maybe something the user told us
            return call("recall", query=" ".join(words))
        return ModelReply(self.NO_MODEL)

    def _expression(self, text):
        for candidate in sorted(self.EXPRESSION.findall(text), key=len, reverse=True):
            candidate = candidate.strip()
            if re.search(r"\d\s*[-+*/%^×÷]+\s*[-+(]*\d", candidate):
                return candidate
        return None

    def _place(self, text):
        match = self.PLACE.search(text)
        if not match:
            return None
        place = match.group("place").strip()
        while self.PLACE_TAIL.search(place):
            place = self.PLACE_TAIL.sub("", place)
        return None if self.NOT_A_PLACE.search(place) else place

    def _answer_from_tools(self, messages):
        results = []
        for message in reversed(messages):
            if message["role"] != "tool":
                break
            results.append((message["name"], json.loads(message["content"])))
        question = next(m.get("text", m["content"]) for m in reversed(messages)
                        if m["role"] == "user")
        sentences = []
        for name, result in reversed(results):
            if "error" in result and name == "weather":
                sentences.append(self.NO_PLACE if result["error"] == WeatherTool.NO_LOCATION
                                 else f"Sorry, I couldn't get the weather: {result['error']}.")
            elif "error" in result:
                sentences.append(f"Sorry, {name.replace('_', ' ')} failed: {result['error']}.")
            elif name == "current_time":
                sentences.append(f"It's {result['time']} on {result['date']} ({result['timezone']}).")
            elif name == "calculate":
                sentences.append(f"{result['expression']} = {result['value']}")
            elif name == "remember":
                sentences.append(f"OK, I'll remember that {result['remembered']}.")
            elif name == "recall" and not self.RECALL.search(question):
                sentences.append(self._answer_from_memory(question, result["facts"]))
            elif name == "recall":
                facts = result["facts"]
                sentences.append("Here's what I remember:\n" + "\n".join(f"- {f}" for f in facts)
                                 if facts else "I don't remember anything about that yet.")
            elif name == "weather":
                sentences.append(self._weather_sentence(result))
            else:
                sentences.append(f"Done: {name}.")
        return " ".join(sentences)

    def _answer_from_memory(self, question, facts):
        """A question answered from the facts sharing the most words with it."""
        if not facts:
            return self.NO_MODEL
        words = Store.recall_words(question)
        most = max(Store.words_in(words, fact) for fact in facts)
        best = [self._said_back(f) for f in facts if Store.words_in(words, f) == most][:3]
        if len(best) == 1:
            return best[0][:1].upper() + best[0][1:] + "."
        return "From what you told me: " + "; ".join(best) + "."

    @staticmethod
    def _said_back(fact):
        """A fact in the user's words, said back to them: 'my car is on level 3'
        becomes 'your car is on level 3'."""
        text = re.sub(r"\bI (am|was)\b", lambda m: "you " + {"am": "are", "was": "were"}[
            m.group(1).lower()], fact.strip().rstrip(".!"), flags=re.I)
        text = re.sub(r"\bI(['’])m\b", r"you\1re", text, flags=re.I)
        return re.sub(r"\b(I|me|my|mine|myself)\b", lambda m: {
            "i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself"}[
            m.group(1).lower()], text, flags=re.I)

    @staticmethod
    def _weather_sentence(weather):
        """The page's style: "It's currently 18°C and sunny in Madrid." """
        unit = weather["units"]["temperature"]
        said = f"{round(weather['temperature'])}{unit}"
        feels = weather.get("apparent_temperature")
        if isinstance(feels, (int, float)) and abs(feels - weather["temperature"]) >= 3:
            said += f" (feels like {round(feels)}{unit})"
        joined = "and" if weather["weather_code"] in WMO_SKY_CODES else "with"
        where = (f"in {weather['place']}" if weather.get("place")
                 else f"at {weather['location']}")
        return f"It's currently {said} {joined} {weather['condition']} {where}."


class TextOut:
    """on_text for one model call, remembering whether any text went out: a
    stream that breaks after that cannot be tried again (the sender saw it)."""

    def __init__(self, on_text):
        self.on_text = on_text
        self.sent = False

    def __call__(self, piece):
        if piece:
            self.sent = True
            self.on_text(piece)


class HTTPModel:
    """Shared plumbing of the HTTP providers: key lookup, deadline, retries and
    the mapping of every failure to the status the sender sees, with the
    provider's own message and, for a misconfiguration, what to check."""

    name = default_base_url = default_model = default_key_name = None
    MAX_ATTEMPTS = 3  # per model call, whatever the server asks for
    BACKOFF = 0.5     # seconds before the 2nd attempt, doubled for each one after
    RETRIED = frozenset({408, 429}) | frozenset(range(500, 600))
    TEMPORARY = frozenset({429, 503, 529})  # 529: Anthropic's overloaded_error
    # base_url endings that are an endpoint, not the root the provider adds it to
    ENDPOINT_SUFFIXES = ()

    def __init__(self, agent_config, vault, clock=time.monotonic, sleep=time.sleep):
        self.agent = agent_config  # the [agent] section
        self.vault = vault
        self.clock = clock
        self.sleep = sleep
        self.base_url = self.root_url(agent_config.base_url or self.default_base_url)
        self.model = agent_config.model or self.default_model
        self.key_name = agent_config.api_key_name or self.default_key_name

    @classmethod
    def root_url(cls, url):
        """[agent] base_url without an endpoint pasted onto it (…/chat/completions,
        …/v1/messages): the daemon adds the endpoint, and said so at start."""
        url = url.rstrip("/")
        for suffix in cls.ENDPOINT_SUFFIXES:
            if url.endswith(suffix):
                root = url[:-len(suffix)]
                log.warning("agent: [agent] base_url ends in %s, which the daemon adds itself; "
                            "using %s (set it so to silence this)", suffix, url_host(root)
                            + urllib.parse.urlsplit(root).path)
                return root
        return url

    def api_key(self):
        key = self.vault.get(self.key_name)
        if key and has_control_characters(key):
            # http.client would refuse the header and quote it, key and all, into the log
            raise ApiError(502, f"the vault's {self.key_name} holds control characters (a "
                                "newline in the value?); store it again")
        return key

    def post(self, url, payload, headers):
        """POST JSON and return the parsed answer; every failure is an ApiError.
        Network failures, 408, 429, 5xx and a 200 whose body is an error with
        such a code are retried (as the official SDKs do), honouring the
        server's Retry-After, within [agent] timeout in all."""
        data, headers = self._request(payload, headers)

        def attempt(remaining):
            status, answer_headers, body = http_post(url, data, headers, remaining)
            return status, answer_headers, self._answer(url, status, answer_headers, body)
        return self._with_retries(url, attempt)

    def stream(self, url, payload, headers, read_events, out):
        """post() with "stream": true: read_events(events) turns the server-sent
        events into the ModelReply. Retried as post() is while no text went out
        (read_events raises once some did); a server that answers with plain
        JSON anyway gives that JSON, as post() would."""
        data, headers = self._request(dict(payload, stream=True), headers)

        def attempt(remaining):
            with http_stream(url, data, headers, remaining) as (status, answer_headers,
                                                                 response, body):
                kind = (answer_headers.get("Content-Type") or "").lower()
                if response is not None and "text/event-stream" in kind:
                    try:
                        return status, answer_headers, read_events(sse_events(response))
                    except OSError as exc:
                        if not out.sent:
                            raise  # nothing went out yet: tried again
                        raise ApiError(502, f"the {self.name} model server's stream broke off "
                                            f"after the reply began: {network_reason(exc)}"
                                       ) from None
                    except ApiError as failed:  # in the stream: like a failed answer,
                        if out.sent:            # tried again while nothing went out
                            raise
                        return None, answer_headers, failed
                if response is not None:
                    body = whole_body(response)
                return status, answer_headers, self._answer(url, status, answer_headers, body)
        return self._with_retries(url, attempt)

    def _request(self, payload, headers):
        return json.dumps(payload).encode(), dict(headers, **{
            "Content-Type": "application/json", "User-Agent": USER_AGENT})

    def _with_retries(self, url, attempt):
        """attempt(seconds left) -> (status, headers, answer or the ApiError
        it amounts to), until an answer, a failure not worth retrying, or the
        deadline."""
        deadline = self.clock() + self.agent.timeout
        for number in range(1, self.MAX_ATTEMPTS + 1):
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise self._timeout()
            try:
                status, answer_headers, answer = attempt(remaining)
            except OSError as exc:  # no whole answer: refused, reset, cut short
                if is_timeout(exc):
                    raise self._timeout() from None
                status, answer_headers, answer = None, {}, ApiError(
                    502, f"cannot reach the {self.name} model server at {url_host(url)}: "
                         f"{network_reason(exc)}")
            if not isinstance(answer, ApiError):
                return answer
            code = getattr(answer, "upstream", None) or status  # None: no answer at all
            if code is not None and code not in self.RETRIED:
                raise answer
            wait = retry_after_seconds(answer_headers)
            if wait is None:
                wait = self.BACKOFF * 2 ** (number - 1)
            if number == self.MAX_ATTEMPTS or self.clock() + wait >= deadline:
                raise self._gave_up(status, answer, number, wait)
            self.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _answer(self, url, status, headers, body):
        """The parsed answer of a 2xx, else the ApiError it amounts to (its
        `upstream` the status to decide a retry by, when it is one)."""
        shown = url_without_query(url)
        if 300 <= status < 400:
            return ApiError(502, f"the {self.name} model server answered {shown} with a "
                                 f"redirect (HTTP {status}) to "
                                 f"{url_without_query(headers.get('Location') or '?')}; "
                                 "check [agent] base_url")
        if status == 401 or (status == 403 and not self.refused_for_content(body)):
            log.warning("agent: the %s provider rejected the API key; store a valid one "
                        "with: %s", self.name, command_hint(
                            os.path.dirname(self.vault.path), "vault", "set", self.key_name))
            return ApiError(502, f"the {self.name} provider rejected the API key "
                                 f"(HTTP {status}); the operator must store a valid one "
                                 f"with `vault set {self.key_name}`")
        if status == 404:
            return ApiError(502, f"the {self.name} model server answered 404 for {shown}: "
                                 f"{provider_message(body)}{self.not_found_hint()}")
        if not 200 <= status < 300:
            return ApiError(502, f"the {self.name} model server refused the request "
                                 f"(HTTP {status}): {provider_message(body)}")
        kind = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            answer = loads_json(body)
        except (ValueError, RecursionError):
            return ApiError(502, f"the {self.name} model server at {shown} answered with "
                                 f"{kind or 'something'} that is not JSON (a captive portal, "
                                 "or another service?); check [agent] base_url")
        error, when = answer_error(answer)
        if error is None:
            return answer
        code = error.get("code") if isinstance(error, dict) else None
        message = provider_message(json.dumps({"error": error}))
        failed = ApiError(502, f"the {self.name} model server {when}: {message}"
                               + (self.not_found_hint() if "endpoint" in message.lower() else ""))
        failed.upstream = int(code) if str(code).isdigit() else None  # retried like that status
        return failed

    def not_found_hint(self):
        return "; check [agent] base_url and model"

    @staticmethod
    def refused_for_content(body):
        """A 403 about the request, not the key (OpenRouter's moderation and
        guardrails): passed on with the provider's words."""
        return any(word in provider_message(body).lower()
                   for word in ("moderation", "flagged", "guardrail", "policy"))

    def _gave_up(self, status, failed, attempts, wait):
        status = getattr(failed, "upstream", None) or status
        detail = f"after {attempts} attempt(s): {failed.description}"
        if status in self.TEMPORARY:
            return ApiError(503, f"the {self.name} provider is overloaded or rate limiting "
                                 f"requests (HTTP {status} {detail}); try again later",
                            retry_after=max(1, math.ceil(wait)))
        return ApiError(502, f"the {self.name} model server failed (HTTP {status or '-'} "
                             f"{detail})")

    def _timeout(self):
        return ApiError(504, f"the {self.name} model did not answer within "
                             f"{self.agent.timeout:g}s ([agent] timeout)")


PROVIDER_MESSAGE_MAX = 300  # characters of a model server's error passed on


def answer_error(answer):
    """(the error, how it came) of a 200 that is a failure: a body that is an
    error ({"error": ...}: OpenRouter, LM Studio), or a choice that failed while
    it was written (OpenRouter: choices[0].error, finish_reason "error", the
    error also at the top); else (None, None)."""
    if not isinstance(answer, dict):
        return None, None
    choices = answer.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    if isinstance(choice, dict) and (choice.get("error") or choice.get("finish_reason") == "error"):
        return choice.get("error") or answer.get("error") or {}, "failed while writing the reply"
    if answer.get("error") and not (choices or answer.get("content")):
        return answer["error"], "reported an error"
    return None, None


def provider_message(body):
    """The provider's own error message, short, for the sender to act on: from
    {"error": {"message"}}, {"error": "..."}, {"detail": ...} (vLLM, FastAPI),
    or Gemini's list of them; else the text itself."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError, TypeError):
        data = None
    if isinstance(data, list) and data:  # Gemini: [{"error": {...}}]
        data = data[0]
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data))
        text = (error.get("message") or error.get("detail") or json.dumps(error)
                if isinstance(error, dict) else str(error))
    elif isinstance(body, bytes):
        text = body.decode("utf-8", "replace")
    else:
        text = str(body)
    return one_line(text or "")[:PROVIDER_MESSAGE_MAX] or "no details"


THINKING = re.compile(r"<think>.*?(</think>|\Z)", re.S)
TEXT_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(</tool_call>|\Z)", re.S)


def reply_text_and_calls(text):
    """A reply as a model served without a reasoning or tool parser writes it
    (llama.cpp, Ollama): <think>…</think> is dropped (the user never sees the
    reasoning), and Hermes-style <tool_call>{"name", "arguments"}</tool_call>
    blocks become tool calls instead of text; a block that does not parse is
    dropped too."""
    text = THINKING.sub("", text)
    calls = []
    for match in TEXT_TOOL_CALL.finditer(text):
        with contextlib.suppress(ValueError, RecursionError):
            call = loads_json(match.group(1))
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                calls.append({"id": mint_call_id(), "name": call["name"],
                              "arguments": call.get("arguments", call.get("parameters", {}))})
    return TEXT_TOOL_CALL.sub("", text).strip() if calls or "<tool_call>" in text else text, calls


def json_arguments(arguments):
    """A tool call's arguments as the JSON text servers take back: a model's
    invalid JSON is sent as {} (llama-server refuses the turn otherwise; the
    tool result has told the model what was wrong)."""
    if not isinstance(arguments, str):
        return json.dumps(arguments)
    try:
        loads_json(arguments or "{}")
    except (ValueError, RecursionError):
        return "{}"
    return arguments or "{}"


class OpenAIModel(HTTPModel):
    """Any OpenAI-compatible Chat Completions server: OpenAI, Ollama, llama.cpp,
    vLLM, LM Studio, OpenRouter, Groq, DeepSeek, Gemini's compatible endpoint."""

    name = "openai"
    default_base_url = "https://api.openai.com/v1"
    default_model = "gpt-4o-mini"
    default_key_name = "openai_api_key"
    ENDPOINT_SUFFIXES = ("/chat/completions",)
    # OpenAI's reasoning models (o1, o3, o4-mini, gpt-5...) refuse max_tokens.
    REASONING_MODEL = re.compile(r"^(o\d|gpt-5)", re.I)
    FILTERED = "(the model's content filter withheld the reply)"
    # Fields of an assistant message that servers require back within the turn:
    # DeepSeek's thinking mode refuses a tool result without its reasoning_content,
    # OpenRouter documents reasoning_details. Others (Groq's `reasoning`) are refused.
    ECHOED = ("reasoning_content", "reasoning_details", "extra_content")
    CALL_ECHOED = ("extra_content",)  # Gemini 3: extra_content.google.thought_signature

    def token_limit_key(self):
        """max_completion_tokens for api.openai.com and reasoning models, max_tokens
        for the rest (Ollama's /v1 knows only that one); [agent] max_tokens_param
        forces either."""
        forced = self.agent.max_tokens_param
        if forced != "auto":
            return forced
        official = urllib.parse.urlsplit(self.base_url).hostname == "api.openai.com"
        reasoning = self.REASONING_MODEL.match(self.model.rsplit("/", 1)[-1])
        return "max_completion_tokens" if official or reasoning else "max_tokens"

    def not_found_hint(self):
        if not urllib.parse.urlsplit(self.base_url).path.rstrip("/").endswith("/v1"):
            return (f"; OpenAI-compatible servers (Ollama, LM Studio, vLLM) serve under /v1: "
                    f"try [agent] base_url = {self.base_url}/v1")
        return f"; check [agent] base_url and that the server has the model {self.model!r}"

    def complete(self, system, messages, tools, on_text=None):
        """One model call; with on_text, streamed: text goes to on_text as it comes."""
        payload = {"model": self.model, "messages": self._messages(system, messages),
                   self.token_limit_key(): self.agent.max_tokens}
        if self.agent.temperature is not None:
            payload["temperature"] = self.agent.temperature
        if tools:
            payload["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}}
                for t in tools]
        headers = {}
        key = self.api_key()
        if key:
            headers["Authorization"] = "Bearer " + key
        url = self.base_url + "/chat/completions"
        if on_text is None:
            data = self.post(url, payload, headers)
        else:
            out = TextOut(on_text)
            data = self.stream(url, payload, headers, lambda events: self._read(events, out), out)
            if isinstance(data, ModelReply):
                return data
        try:
            choice = data["choices"][0]
            return self._reply(choice["message"], choice.get("finish_reason"))
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise ApiError(502, "the openai model server answered in an unexpected "
                                "shape (no usable choices[0].message)") from None

    def _read(self, events, out):
        """A streamed answer: chunks of content (to `out`), of the fields echoed
        back, and of tool calls (by index: id, name and arguments in pieces),
        to the finish_reason and [DONE]; an error inside it fails the turn."""
        message, calls, finish, done = {"content": ""}, {}, None, False
        for _, data in events:
            if data.strip() == "[DONE]":
                done = True
                break
            try:
                chunk = loads_json(data)
            except (ValueError, RecursionError):
                raise ApiError(502, "the openai model server sent a stream event that is not "
                                    "JSON") from None
            if not isinstance(chunk, dict):
                continue
            failed, _ = answer_error(chunk)
            if failed is None and chunk.get("error"):  # an error event alone
                failed = chunk["error"]
            for choice in chunk.get("choices") or ():  # none in a usage chunk
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str):
                    message["content"] += delta["content"]
                    out(delta["content"])
                for key in self.ECHOED + ("reasoning", "refusal"):
                    if isinstance(delta.get(key), (str, list)):
                        message[key] = message.get(key, delta[key][:0]) + delta[key]
                for call in delta.get("tool_calls") or ():
                    slot = calls.setdefault(call.get("index", len(calls)), {
                        "function": {"name": "", "arguments": ""}})
                    slot.update((k, call[k]) for k in ("id",) + self.CALL_ECHOED if call.get(k))
                    function = call.get("function") or {}
                    for key in ("name", "arguments"):
                        slot["function"][key] += function.get(key) or ""
                finish = choice.get("finish_reason") or finish
            if failed is not None or finish == "error":  # OpenRouter, mid-generation
                error = ApiError(502, "the openai model server failed while writing the "
                                      "reply: " + provider_message(json.dumps({
                                          "error": failed or {}})))
                code = failed.get("code") if isinstance(failed, dict) else None
                error.upstream = int(code) if str(code).isdigit() else None
                raise error
        if not done and finish is None:
            raise ApiError(502, "the openai model server's stream ended before the reply did")
        message["tool_calls"] = [calls[index] for index in sorted(calls)]
        return self._reply(message, finish)

    def _reply(self, message, finish):
        calls = [{"id": c.get("id") or mint_call_id(), "name": str(c["function"]["name"]),
                  "arguments": c["function"].get("arguments") or "{}",
                  "extra": {k: c[k] for k in self.CALL_ECHOED if c.get(k)}}
                 for c in message.get("tool_calls") or ()]
        text = content_text(message.get("content"))
        text, written = reply_text_and_calls(text)
        calls = calls or written
        if not text and isinstance(message.get("refusal"), str):
            text = message["refusal"]  # the model's own words for why it will not answer
        if not text and not calls and finish == "content_filter":
            text = self.FILTERED
        reasoned = message.get("reasoning_content") or message.get("reasoning")
        cut = ("reasoning" if not text and not calls and reasoned else "max_tokens"
               ) if finish == "length" else None
        return ModelReply(text, calls, cut=cut,
                          echo={k: message[k] for k in self.ECHOED if message.get(k)})

    @staticmethod
    def _messages(system, messages):
        out = [{"role": "system", "content": system}]
        for m in messages:
            if m["role"] == "tool":
                out.append({"role": "tool", "tool_call_id": m["tool_call_id"],
                            "content": m["content"]})
            elif m.get("tool_calls"):
                out.append(dict(m.get("echo") or {}, **{
                    # "" where a server refuses null; every one takes "" with tool_calls
                    "role": "assistant", "content": m["content"] or "",
                    "tool_calls": [dict(c.get("extra") or {}, **{
                        "id": c["id"], "type": "function", "function": {
                            "name": c["name"], "arguments": json_arguments(c["arguments"])}})
                        for c in m["tool_calls"]]}))
            else:
                out.append({"role": m["role"], "content": m["content"]})
        return out


def content_text(content):
    """Message content as text: a string, or (some servers and proxies) a list of
    parts whose text parts are joined. Anything else is not a reply."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and part.get("type") == "text"
                       and isinstance(part.get("text"), str))
    raise ValueError("content is neither text nor a list of parts")


class AnthropicModel(HTTPModel):
    """Anthropic's Messages API with tool use."""

    name = "anthropic"
    default_base_url = "https://api.anthropic.com"
    default_model = "claude-sonnet-4-5"
    default_key_name = "anthropic_api_key"
    ENDPOINT_SUFFIXES = ("/v1/messages", "/v1")
    API_VERSION = "2023-06-01"
    CUTS = {"max_tokens": "max_tokens", "model_context_window_exceeded": "context"}
    REFUSED = "(the model declined to answer)"
    PAUSES = 3  # pause_turn continuations of one model call (server tools), at most

    def complete(self, system, messages, tools, on_text=None):
        """One model call; with on_text, streamed: text goes to on_text as it comes."""
        payload = {"model": self.model, "system": system, "max_tokens": self.agent.max_tokens,
                   "messages": self._messages(messages)}
        if self.agent.temperature is not None:
            payload["temperature"] = self.agent.temperature
        if tools:
            payload["tools"] = [{"name": t.name, "description": t.description,
                                 "input_schema": t.parameters} for t in tools]
        headers = {"anthropic-version": self.API_VERSION}
        key = self.api_key()
        if key:
            headers["x-api-key"] = key
        blocks, url, out = [], self.base_url + "/v1/messages", TextOut(on_text)
        for _ in range(self.PAUSES + 1):
            data = (self.post(url, payload, headers) if on_text is None else
                    self.stream(url, payload, headers, lambda events: self._read(events, out),
                                out))
            try:
                blocks += list(data["content"])
                stop = data.get("stop_reason")
            except (KeyError, TypeError):
                raise ApiError(502, "the anthropic model server answered in an unexpected "
                                    "shape (no content blocks)") from None
            if stop != "pause_turn":
                break
            # a long server-tool turn paused: sent back as it is, the model goes on
            payload["messages"] = payload["messages"] + [{"role": "assistant",
                                                          "content": data["content"]}]
        try:
            text = "".join(b["text"] for b in blocks if b.get("type") == "text")
            calls = [{"id": b["id"], "name": str(b["name"]), "arguments": b.get("input") or {}}
                     for b in blocks if b.get("type") == "tool_use"]
        except (KeyError, TypeError, AttributeError):
            raise ApiError(502, "the anthropic model server answered in an unexpected "
                                "shape (content blocks)") from None
        if stop == "refusal":  # text before it was no answer; the turn is not kept
            return ModelReply(self.REFUSED, refused=True)
        return ModelReply(text, calls, cut=self.CUTS.get(stop))

    def _read(self, events, out):
        """A streamed answer as the Messages API would have sent it whole: its
        content blocks (text to `out` as it comes, tool inputs from their JSON
        pieces) and stop_reason; ping events skipped, an error event fails
        the turn, and so does a stream without message_stop."""
        blocks, stop, done = {}, None, False
        for name, data in events:
            try:
                event = loads_json(data)
            except (ValueError, RecursionError):
                raise ApiError(502, "the anthropic model server sent a stream event that is "
                                    "not JSON") from None
            kind = event.get("type", name) if isinstance(event, dict) else name
            if kind == "error":
                raise ApiError(502, "the anthropic model server failed while writing the "
                                    f"reply: {provider_message(data)}")
            if kind == "content_block_start":
                blocks[event["index"]] = dict(event["content_block"], partial="")
            elif kind == "content_block_delta":
                block = blocks.setdefault(event["index"], {"type": "text", "partial": ""})
                delta = event.get("delta") or {}
                if delta.get("type") == "text_delta":
                    block["text"] = block.get("text", "") + delta["text"]
                    out(delta["text"])
                elif delta.get("type") == "input_json_delta":
                    block["partial"] += delta.get("partial_json", "")
            elif kind == "message_delta":
                stop = (event.get("delta") or {}).get("stop_reason") or stop
            elif kind == "message_stop":
                done = True
        if not done:
            raise ApiError(502, "the anthropic model server's stream ended before the reply "
                                "did")
        for block in blocks.values():
            partial = block.pop("partial")
            if block.get("type") == "tool_use" and partial:
                block["input"] = json.loads(json_arguments(partial))
        return {"content": [blocks[index] for index in sorted(blocks)], "stop_reason": stop}

    def not_found_hint(self):
        return f"; check [agent] base_url (the API's root) and model {self.model!r}"

    @staticmethod
    def _messages(messages):
        out = []
        for m in messages:
            if m["role"] == "tool":
                block = {"type": "tool_result", "tool_use_id": m["tool_call_id"],
                         "content": m["content"]}
                if m.get("is_error"):
                    block["is_error"] = True
                if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                    out[-1]["content"].append(block)  # results of one step share a message
                else:
                    out.append({"role": "user", "content": [block]})
            elif m.get("tool_calls"):
                # Claude may put "\n\n" before a tool_use; the API refuses it back.
                text = m["content"] if (m["content"] or "").strip() else None
                content = [{"type": "text", "text": text}] if text else []
                for c in m["tool_calls"]:
                    arguments = json.loads(json_arguments(c["arguments"]))
                    content.append({"type": "tool_use", "id": c["id"], "name": c["name"],
                                    "input": arguments if isinstance(arguments, dict) else {}})
                out.append({"role": "assistant", "content": content})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        return out


def build_model(agent_config, vault):
    if agent_config.provider == "openai":
        return OpenAIModel(agent_config, vault)
    if agent_config.provider == "anthropic":
        return AnthropicModel(agent_config, vault)
    return BuiltinModel()


# === Agent: the turn loop ===================================================

def render_user_message(request):
    """The new message as the model sees it: the text, then what the sender
    attached (metadata such as a location, and attachment URLs)."""
    parts = [request["message"]]
    if request.get("metadata"):
        parts.append("Metadata from the sender's platform: "
                     + UNICODE_ENCODER.encode(request["metadata"]))
    for item in request.get("attachments") or ():
        label = " ".join(x for x in (item.get("name"), f"({item['type']})"
                                     if item.get("type") else None) if x)
        parts.append(f"Attachment {label}: {item['url']}")
    return "\n\n".join(parts)


def visible_text(raw, final=False):
    """What of a step's text the user sees: no <think> nor <tool_call> block
    (reply_text_and_calls); while it is still being written, not the start of
    such a tag either."""
    text = TEXT_TOOL_CALL.sub("", THINKING.sub("", raw))
    if not final:
        for tag in ("<think>", "<tool_call>"):
            for length in range(len(tag) - 1, 0, -1):
                if text.endswith(tag[:length]):
                    return text[:-length]
    return text


class ReplyWriter:
    """The reply as the model writes it: each step's text (without <think> and
    <tool_call> blocks, stripped), steps joined by a blank line. With `emit`,
    each new part goes out as a "delta" as it comes, held back while it may
    still become such a block or is only trailing space: the deltas joined are
    the reply, exactly."""

    def __init__(self, emit=None):
        self.emit = emit
        self.parts = []  # the steps' texts so far
        self.raw = self.sent = ""  # this step's: as written, and as sent

    def write(self, piece):
        self.raw += piece
        shown = visible_text(self.raw).strip()
        if shown.startswith(self.sent) and len(shown) > len(self.sent):
            self._send(shown[len(self.sent):])

    def end_step(self, text):
        """The step's text as the turn keeps it; what did not go out yet does now."""
        text = text.strip()
        if self.emit is not None and text.startswith(self.sent):
            self._send(text[len(self.sent):])
        if text:
            self.parts.append(text)
        self.raw = self.sent = ""

    def _send(self, piece):
        if not piece or self.emit is None:
            return
        if not self.sent and self.parts:
            self.emit("delta", {"text": "\n\n"})
        self.sent += piece
        self.emit("delta", {"text": piece})

    @property
    def reply(self):
        return "\n\n".join(self.parts)


class Agent:
    """One turn: the model sees the system prompt, the session's history and the
    new message; it may call tools (results go back to it) until it answers or
    max_steps model calls are used. Only the user's message and the final reply
    are kept in the session's history."""

    def __init__(self, model, tools, store, settings, metrics):
        self.model = model
        self.tools = tools
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._prompts = {}  # (zone, prompt, minute) -> the system prompt

    PROMPTS_KEPT = 64  # zones in one minute; more and the cache starts over

    def system_prompt(self, metadata):
        """The configured prompt and the time in the sender's zone, to the minute:
        made once a minute per zone, not on every turn (a tenth of a builtin
        turn's CPU time)."""
        zone = metadata.get("timezone") if isinstance(metadata.get("timezone"), str) else None
        key = (zone, self.settings.agent.system_prompt, int(time.time() // 60))
        prompt = self._prompts.get(key)
        if prompt is None:
            if len(self._prompts) >= self.PROMPTS_KEPT:
                self._prompts = {}
            prompt = self._prompts[key] = self._make_system_prompt(zone)
        return prompt

    def _make_system_prompt(self, zone):
        try:
            now = datetime.datetime.now(zoneinfo.ZoneInfo(zone)) if zone else None
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            now = None
        now = now or datetime.datetime.now().astimezone()
        return (f"{self.settings.agent.system_prompt}\n\n"
                f"Current date and time: {now:%A} {now.isoformat(timespec='minutes')}.")

    def run_turn(self, request, session_id, message_id=None, emit=None):
        """Returns {"reply", "session_id", "tool_calls"} (and "truncated": true when the
        token limit cut the reply off); raises ApiError. The caller records the
        exchange (record_exchange) in the transaction that finishes the turn.
        emit(event, data), when given, hears the turn as it runs: "delta" (pieces
        of the reply, which joined are the reply), "tool_call", "tool_result"."""
        agent, sessions = self.settings.agent, self.settings.sessions
        metadata = request.get("metadata") or {}
        ctx = ToolContext(request["user_id"], session_id, metadata, self.store, message_id)
        messages = self.store.history(session_id, sessions.max_history)
        messages.append({"role": "user", "content": render_user_message(request),
                         "text": request["message"]})
        system = self.system_prompt(metadata)
        tools = self.tools.offered()
        records = []
        outcome = "error"
        cut = refused = None
        writer = ReplyWriter(emit)
        try:
            for _ in range(agent.max_steps):
                started = time.monotonic()
                try:
                    answer = self.model.complete(system, messages, tools,
                                                 writer.write if emit else None)
                finally:
                    self.metrics.observe("aibutler_model_seconds", (("provider", agent.provider),),
                                         time.monotonic() - started)
                cut, refused = answer.cut, answer.refused
                if refused:  # nothing the model wrote in this turn stands
                    writer.parts = []
                writer.end_step(answer.text if answer.text.strip() or not cut or answer.tool_calls
                                else f"({ModelReply.CUT_NOTES[cut]})")
                if not answer.tool_calls:
                    break
                messages.append({"role": "assistant", "content": answer.text,
                                 "tool_calls": answer.tool_calls, "echo": answer.echo})
                for call in answer.tool_calls:
                    if emit:
                        arguments = call["arguments"]
                        with contextlib.suppress(ToolError):
                            arguments = tool_arguments(arguments)
                        emit("tool_call", {"name": call["name"], "arguments": arguments})
                    record = self.tools.invoke(call, ctx)
                    records.append(record)
                    if emit:
                        emit("tool_result", record)
                    content = ({"error": record["error"]} if "error" in record
                               else record["result"])
                    messages.append({"role": "tool", "tool_call_id": call["id"],
                                     "name": call["name"], "is_error": "error" in record,
                                     "content": json.dumps(content, ensure_ascii=False)})
            else:
                writer.end_step(f"I stopped after {agent.max_steps} model calls without reaching "
                                "an answer ([agent] max_steps). Please try a simpler request.")
            if not writer.reply:
                writer.end_step("(the model returned an empty reply)")
            reply = writer.reply
            outcome = "ok"
        except ApiError as exc:  # the operator sees why, sync or async: one line
            log.warning("turn %s failed (provider %s, answered %d): %s", message_id or "-",
                        agent.provider, exc.status, exc.description)
            raise
        finally:
            self.metrics.inc("aibutler_agent_turns_total",
                             (("provider", agent.provider), ("outcome", outcome)))
        result = {"reply": reply, "session_id": session_id, "tool_calls": records}
        if refused:  # kept out of history: Anthropic refuses a conversation that holds it
            result["refused"] = True
        if cut:
            log.warning("agent: turn %s of model %s: %s ([agent] max_tokens = %d)",
                        message_id or "-", getattr(self.model, "model", "?"),
                        ModelReply.CUT_NOTES[cut], agent.max_tokens)
            result["truncated"] = True
        return result


# === Delivery: inbox, turn workers, callback dispatcher =====================
#
# How many turns run at once is decided by the model server, not by threads.
# Every turn, sync or async, passes the TurnGate: at most [agent] concurrency
# turns talk to the model at once, the others wait in arrival order, and one
# user's turns run one at a time, in order. A thread that waits at the gate or
# for a model server is "parked": its pool (waitress's request threads, or the
# turn workers) starts a spare thread meanwhile, so [server] threads and
# [delivery] workers count only threads that are free for quick work (accepts,
# builtin turns), and 50 slow turns take 50 parked threads (about 15 kB each),
# not a queue; health probes find a free request thread however many senders
# wait. An async message is committed before its 202; durable commits share
# their fsync (Store._sync_through), so a slow SD card costs one fsync per
# batch of accepts, not one each. A turn's exchange is recorded in the
# transaction that finishes it (its idempotency key, its job), so a killed
# process records it once or not at all.
#
# The daemon's locks, outermost first: a thread holding one takes only locks
# listed after it (and logging's handler lock, taken by every log line).
#   Handover._lock         a result handed to its waiting request; Store.finish_job
#                          runs inside it (never the reverse: see Inbox.accept)
#   WorkerPool._rescue_lock  one rescue of stranded items at a time; Store.requeue inside
#   Store._db_lock         the one sqlite connection (re-entrant: a transaction reads)
#   Store._write_lock      this process's one writer; sqlite's own write lock (BEGIN
#                          IMMEDIATE, shared with the CLI) is taken inside it
#   Authenticator._lock    failing addresses; Metrics._lock inside
#   Store._synced, TurnGate._lock, Inbox._finished, WorkerPool._threads_lock,
#   WaitLimits._lock, RequestThreads._lock (waitress's dispatcher lock inside),
#   RateLimiter._lock, WeatherTool._lock, Daemon._inflight_lock, Metrics._lock:
#   each taken alone.
# Store._synced is taken after the transaction's locks are let go, so no thread
# waits for the disk while another waits for the connection. The Checkpointer
# has a connection of its own and takes none of these.

def sign_payload(secret, message_id, timestamp, body):
    """Standard Webhooks v1: base64 HMAC-SHA256 of "id.timestamp.body", keyed
    with the UTF-8 bytes of the secret."""
    digest = hmac.new(secret.encode(), f"{message_id}.{timestamp}.".encode() + body,
                      hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def request_fingerprint(request):
    canonical = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


QUEUE_FULL_RETRY_AFTER = 30     # seconds a sender waits when max_pending is reached
MODEL_BUSY_RETRY_AFTER = 30     # ... when a sync turn waited its whole time at the gate
STILL_RUNNING_RETRY_AFTER = 10  # ... when a repeat outwaited the first request (409)


class TurnGate:
    """[agent] concurrency: at most that many turns at the model at once; the
    others wait, and start in the order their messages arrived (an async job's
    acceptance, a sync request's arrival); a user's turn also waits for the
    same user's earlier ones. `pools` is per thread: the pool (with park() and
    unpark()) that the current thread belongs to, if any."""

    def __init__(self, settings, remote):
        self.settings = settings
        self.remote = remote  # () -> True when turns wait on a model server
        self.pools = threading.local()
        self._lock = threading.Lock()
        self._waiting = []  # [arrived, tiebreak, user_id, Event, granted, message_id], sorted
        self._tiebreak = itertools.count()
        self._users = set()  # users with a turn in progress
        self.running = 0

    @contextlib.contextmanager
    def turn(self, user_id, arrived, timeout=None, while_waiting=contextlib.nullcontext,
             message_id=None):
        """Hold a place for one turn of user_id, whose message arrived at
        `arrived` (time.time()). A wait longer than timeout raises 503 (only
        sync turns have a sender waiting); the wait happens inside
        while_waiting()."""
        waiter = None
        with self._lock:
            if self._may_start(user_id, arrived):
                self._start(user_id)
            else:
                waiter = [arrived, next(self._tiebreak), user_id, threading.Event(), False,
                          message_id]
                bisect.insort(self._waiting, waiter)
        try:
            with self.parked() if waiter is not None or self.remote() else contextlib.nullcontext():
                if waiter is not None:
                    with while_waiting():
                        self._wait(waiter, timeout)
                yield
        finally:
            if waiter is None:
                self._finish(user_id)
            else:
                self._leave(waiter)

    def _leave(self, waiter):
        """A turn that waited is over, or gave up waiting (timed out, or its
        thread failed before its place came): its place, if it got one, goes on."""
        with self._lock:
            if waiter[4]:
                self.running -= 1
                self._users.discard(waiter[2])
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            self._grant()

    @contextlib.contextmanager
    def parked(self):
        """The current thread waits on something slow: its pool may start a spare."""
        pool = getattr(self.pools, "pool", None)
        if pool is None:
            yield
            return
        pool.park()
        try:
            yield
        finally:
            pool.unpark()

    def waiting(self):
        return len(self._waiting)

    def is_waiting(self, message_id):
        """Whether this message's turn waits for a place (its status: queued)."""
        return any(waiter[5] == message_id for waiter in list(self._waiting))

    def regrant(self):
        """After a reload: a larger limit lets waiting turns start now."""
        with self._lock:
            self._grant()

    def _may_start(self, user_id, arrived):
        if self.running >= self.settings.agent.concurrency or user_id in self._users:
            return False
        # With room left, whoever waits is held back by a turn of their own user.
        return not any(waiter[2] == user_id and waiter[0] <= arrived for waiter in self._waiting)

    def _start(self, user_id):
        self.running += 1
        self._users.add(user_id)

    def _wait(self, waiter, timeout):
        if waiter[3].wait(timeout):
            return
        with self._lock:
            if waiter[4]:  # granted just as the wait ran out
                return
            running, others = self.running, len(self._waiting) - 1
        raise ApiError(503, f"the model is busy: {running} turns are running and {others} "
                            "more are waiting ([agent] concurrency); try again later",
                       retry_after=MODEL_BUSY_RETRY_AFTER)

    def _finish(self, user_id):
        with self._lock:
            self.running -= 1
            self._users.discard(user_id)
            self._grant()

    def _grant(self):
        """Start waiting turns, earliest first, while there is room; a user with
        a turn in progress, or an earlier one waiting, keeps later ones waiting."""
        passed = set()
        for waiter in list(self._waiting):
            if self.running >= self.settings.agent.concurrency:
                return
            user_id = waiter[2]
            if user_id in self._users or user_id in passed:
                passed.add(user_id)
                continue
            self._waiting.remove(waiter)
            self._start(user_id)
            waiter[4] = True
            waiter[3].set()


class Handover:
    """Senders waiting inside their HTTP request for a message's result
    (Prefer: wait, Twilio's reply_wait) and pollers waiting for it to be done
    (GET .../messages/{id}?wait=N). A turn worker stores the result under the
    same lock as it hands it over: a reply that went out in a 200 is never also
    sent as a callback, and one whose sender stopped waiting always is. A
    finished turn wakes the waiters of its own message only."""

    def __init__(self):
        self._lock = threading.Lock()
        self._takers = {}  # message_id -> (Event, [result]) until its sender stops waiting
        self._streams = {}  # message_id -> queue.Queue of (event, data) for a streamed answer
        self._watchers = collections.defaultdict(set)  # message_id -> pollers' Events
        self._released = threading.Event()  # stopping: nobody waits any more
        self.waiting = 0  # requests waiting here now (a gauge in /metrics)

    def release(self):
        """The daemon stops: waiting senders answer now (202, or the status as it is)."""
        with self._lock:
            self._released.set()
            for events in self._streams.values():
                events.put(("release", None))
            for done, _ in self._takers.values():
                done.set()
            for events in self._watchers.values():
                for event in events:
                    event.set()

    def expect(self, message_id, stream=False):
        """Before the message is committed: its result will be waited for; or,
        with stream, its turn's events read from stream_of() as they come. A
        stream takes nothing: the result goes where a 202's goes as well (a
        client that left unnoticed must not cost the callback)."""
        with self._lock:
            if stream:
                self._streams[message_id] = queue.Queue()
            else:
                self._takers[message_id] = (threading.Event(), [])

    def stream_of(self, message_id):
        return self._streams.get(message_id)

    def emitter(self, message_id):
        """emit(event, data) for a turn: to its streamed answer while one reads it."""
        events = self._streams.get(message_id)
        if events is None:
            return None
        return lambda event, data: events.put((event, data))

    def take(self, message_id, seconds):
        """The result of an expected message if it comes within `seconds`, else
        None (and from then on it goes where it would have gone anyway)."""
        slot = self._takers.get(message_id)
        if slot is None:
            return None
        self._waited(+1)
        try:
            if not self._released.is_set():
                slot[0].wait(seconds)
        finally:
            self._waited(-1)
        with self._lock:
            if self._takers.get(message_id) is slot:
                del self._takers[message_id]
            return slot[1][0] if slot[1] else None

    def forget(self, message_id):
        """Nobody takes this message's result (a waiter stops waiting at once)."""
        with self._lock:
            slot = self._takers.pop(message_id, None)
            self._streams.pop(message_id, None)
        if slot is not None:
            slot[0].set()

    def finish(self, message_id, body, store):
        """store(taken) keeps the result, with its delivery unless a sender took it."""
        with self._lock:
            # left in place: a quick turn may finish before its sender calls take()
            slot = self._takers.get(message_id)
            store(slot is not None)
            if slot is not None:
                slot[1].append(body)
                slot[0].set()
            if message_id in self._streams:
                self._streams[message_id].put(("finish", body))
            for event in self._watchers.get(message_id, ()):
                event.set()

    def watch(self, message_id, done, seconds):
        """Wait until done() (a look at the store) or `seconds` pass; woken only
        when this message's turn finishes."""
        deadline = time.monotonic() + seconds
        event = threading.Event()
        with self._lock:
            self._watchers[message_id].add(event)
        self._waited(+1)
        try:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0 or self._released.is_set() or not event.wait(left):
                    return False
                event.clear()
            return True
        finally:
            self._waited(-1)
            with self._lock:
                self._watchers[message_id].discard(event)
                if not self._watchers[message_id]:
                    del self._watchers[message_id]

    def _waited(self, change):
        with self._lock:
            self.waiting += change


class Inbox:
    """Where a valid message goes: a turn run now (sync) or a job committed to
    sqlite before 202 is answered (async). A repeated Idempotency-Key (or
    webhook-id) from the same user returns the stored answer instead of running
    the agent and its tools again."""

    RECHECK_EVERY = 0.5  # seconds between looks at a repeat's first request, at most

    def __init__(self, settings, store, agent, gate, workers, handover):
        self.settings = settings
        self.store = store
        self.agent = agent
        self.gate = gate
        self.workers = workers
        self.handover = handover
        self._finished = threading.Condition()
        self.waiting = 0  # repeats waiting for their first request (a gauge in /metrics)

    def run_sync(self, request, key=None):
        """Returns (status, body, replayed)."""
        arrived = time.time()
        user_id = request["user_id"]
        if key:
            replay = self._claim_key(request, key)
            if replay:
                return replay
        try:
            session_id = self.store.resolve_session(user_id, request.get("session_id"),
                                                    self.settings.sessions.idle_timeout)
            if session_id is None:
                raise unknown_session()
            with self.gate.turn(user_id, arrived, timeout=turn_time_limit(self.settings)):
                result = self.agent.run_turn(request, session_id, new_id("sync"))
            with self.store.transaction() as db:  # the exchange and the key: both or neither
                if not result.get("refused"):
                    self.store.record_exchange(db, session_id, request["message"],
                                               result["reply"], self.settings.sessions.max_history)
                if key:
                    self.store.idempotency_finish(db, user_id, key, 200, result)
        except BaseException:
            if key:
                self.store.idempotency_drop(user_id, key)  # a retry may run it again
            raise
        finally:
            if key:
                self._announce()
        return 200, result, False

    def accept(self, request, key=None, wait=0, channel="webhook", status_path=None,
               key_field="Idempotency-Key", stream=False):
        """Commit the message durably; answer 202, or with wait > 0 the turn's
        result (200, or its error) if it is done within `wait` seconds. Returns
        (status, body, replayed)."""
        user_id = request["user_id"]
        delivery = self.settings.delivery
        message_id = new_id("msg")
        replay = None
        if wait > 0 or stream:
            self.handover.expect(message_id, stream)
        try:
            with self.store.transaction(durable=True) as db:
                if key:
                    state, row = self.store.idempotency_begin(db, user_id, key,
                                                              request_fingerprint(request),
                                                              delivery.idempotency_ttl)
                    if state == "mismatch":
                        raise key_reused(key_field)
                    if state == "pending":  # a sync request with this key is running
                        raise still_running()
                    if state == "done":
                        replay = row["status"], json.loads(row["response"])
                if replay is None:
                    body = self._add(db, request, message_id, channel, status_path)
                    if key:
                        self.store.idempotency_finish(db, user_id, key, 202, body)
        except BaseException:
            self.handover.forget(message_id)
            raise
        if replay is not None:
            # Never called inside the transaction: Handover.finish takes its lock
            # first and the database's second. A sender that retried may have
            # given up on the first request, still waiting for the reply: the
            # reply goes where a 202 sends it (callback, Messages API) instead.
            self.handover.forget(message_id)
            self.handover.forget(replay[1].get("message_id"))
            return replay + (True,)
        self.workers.notify()
        if wait > 0:
            try:
                with self.gate.parked():
                    result = self.handover.take(message_id, wait)
            except BaseException:
                self.handover.forget(message_id)
                raise
            if result is not None:
                return result_answer(result) + (False,)
        return 202, body, False

    def finished(self, message_id):
        """A message's result once its turn is done (for a repeat), else None."""
        job, _ = self.store.message(message_id) if message_id else (None, None)
        if job is None or job["state"] != "done":
            return None
        return dict(json.loads(job["result"] or "{}"), message_id=message_id)

    def _add(self, db, request, message_id, channel, status_path):
        """Inside accept's transaction: the job, and the 202's body."""
        user_id, delivery = request["user_id"], self.settings.delivery
        if self.store.pending_jobs() >= delivery.max_pending:
            raise ApiError(503, f"the queue is full ({delivery.max_pending} messages "
                                "waiting); try again later", retry_after=QUEUE_FULL_RETRY_AFTER)
        session_id = self.store.resolve_session(user_id, request.get("session_id"),
                                                self.settings.sessions.idle_timeout, db)
        if session_id is None:
            raise unknown_session()
        self.store.add_job(db, message_id, user_id, session_id, request, channel)
        body = {"status": "accepted", "session_id": session_id, "message_id": message_id}
        if status_path:
            body["status_url"] = status_path(message_id)
        return body

    def _claim_key(self, request, key):
        """Own the key (returns None) or return the stored answer, waiting while
        the first request with this key is still running."""
        user_id = request["user_id"]
        fingerprint = request_fingerprint(request)
        deadline = time.monotonic() + turn_time_limit(self.settings)
        with self.gate.parked():  # the first may take minutes: other requests go on
            return self._wait_for_key(user_id, key, fingerprint, deadline)

    def _wait_for_key(self, user_id, key, fingerprint, deadline):
        while True:
            with self.store.transaction() as db:
                state, row = self.store.idempotency_begin(db, user_id, key, fingerprint,
                                                          self.settings.delivery.idempotency_ttl)
            if state == "new":
                return None
            if state == "mismatch":
                raise key_reused()
            if state == "done":
                return row["status"], json.loads(row["response"]), True
            if time.monotonic() > deadline:
                raise still_running()
            with self._finished:
                self.waiting += 1
                self._finished.wait(self.RECHECK_EVERY)
                self.waiting -= 1

    def _announce(self):
        with self._finished:
            self._finished.notify_all()


def result_answer(result):
    """(status, body) of a finished turn as a sync request answers it."""
    if "error" in result:
        return result["error"]["status"], {"error": result["error"]}
    body = {key: result[key] for key in ("reply", "session_id", "tool_calls", "truncated",
                                         "refused", "message_id") if key in result}
    return 200, body


def unknown_session():
    """404, as for any id that names nothing: the message itself was valid."""
    return ApiError(404, "session_id does not name a session of this user_id; leave it out "
                         "to continue the current session", field="session_id")


def still_running():
    return ApiError(409, "a request with this idempotency key is still being processed; "
                         "try again later", retry_after=STILL_RUNNING_RETRY_AFTER)


def key_reused(field="Idempotency-Key"):
    return ApiError(422, f"this {field} was already used for a different request",
                    field=field)


class WorkerPool:
    """Threads that each run `work()` until stop: claim an item of `table` with
    `claim(hold)` and `handle(item)` it; with nothing to claim the thread sleeps
    until notified (or `poll` seconds pass). Tracks what each thread is doing,
    for the watchdog.

    A thread that waits on something slow (a model server) may park(): the
    pool then starts a spare thread so that `count` threads stay free, up to
    `most` threads in all; a spare left over after unpark() ends once its item
    is done.

    An item whose state a failed write could not record (a full disk) stays
    'running' or 'sending' in sqlite; `rescue(held)` puts such items back in
    line after rescue_delay(), and again until a write succeeds."""

    # Seconds before stranded items go back in line, doubled while writes keep
    # failing; at most RESCUE_MAX, so work resumes within seconds of space freed.
    RESCUE_FIRST, RESCUE_MAX, RESCUE_DOUBLINGS = 1.0, 4.0, 2
    # Set by each kind of pool: its Store, its table and claim(hold) -> item or None.
    store = table = claim = None

    def __init__(self, name, count, poll=1.0, most=None):
        self.name = name
        self.count = count
        self.most = most or (lambda: count)  # () -> the most threads at once
        self.poll = poll
        # A release with nobody waiting is kept for the next acquire, so work that
        # arrives between a poll and a wait is not left for the poll interval.
        self.wakeups = threading.Semaphore(0)
        self._stopping = threading.Event()
        self._threads = []
        self._threads_lock = threading.Lock()
        self._parked = 0
        self._started = 0  # threads ever started: names stay unique
        self._busy_since = {}
        self._holding = {}  # thread name -> the item (seq) it has in hand
        self._stranded_at = None
        self._failures_in_a_row = 0
        self._rescue_lock = threading.Lock()
        self._drain_until = None

    def start(self):
        self._stopping.clear()
        with self._threads_lock:
            for _ in range(self.count):
                self._start_thread()

    def _start_thread(self):
        thread = threading.Thread(target=self._loop, name=f"{self.name}-{self._started}",
                                  daemon=True)
        self._started += 1
        thread.start()
        self._threads.append(thread)

    def park(self):
        """This thread is about to wait a long time: start a spare if allowed
        (if the system will not start one, the pool just has one free thread less)."""
        with self._threads_lock:
            self._parked += 1
            if (not self._stopping.is_set() and len(self._threads) - self._parked < self.count
                    and len(self._threads) < self.most()):
                try:
                    self._start_thread()
                except RuntimeError as exc:  # "can't start new thread": out of memory
                    log.warning("%s: no spare thread: %s", self.name, exc)

    def unpark(self):
        with self._threads_lock:
            self._parked -= 1

    @contextlib.contextmanager
    def unwatched(self):
        """A wait in line is not being wedged: the clock restarts after it."""
        me = threading.current_thread().name
        self._busy_since.pop(me, None)
        try:
            yield
        finally:
            self._busy_since[me] = time.monotonic()

    def _retire_spare(self):
        """True when this thread is one too many now that others unparked."""
        with self._threads_lock:
            if len(self._threads) - self._parked <= self.count:
                return False
            self._threads.remove(threading.current_thread())
            return True

    def notify(self):
        self.wakeups.release()

    def hold(self, seq):
        """Called by work() once it has claimed an item."""
        self._holding[threading.current_thread().name] = seq

    def stop(self, deadline, drain=False):
        """Finish the items in hand; with drain, keep taking items that are ready
        until none is or the deadline passes. What is left stays in sqlite."""
        self._drain_until = deadline if drain else None
        self._stopping.set()
        self.wakeups.release(max(1, len(self._threads)))
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = sorted(name for name in list(self._holding)
                      if any(t.name == name and t.is_alive() for t in threads))
        if busy:
            log.warning("%s: still busy at shutdown, left for the next start: %s",
                        self.name, ", ".join(busy))
        with self._threads_lock:
            self._threads = []

    def healthy(self, wedged_after):
        """All threads alive and none stuck on one item for longer than wedged_after."""
        now = time.monotonic()
        with self._threads_lock:
            threads = list(self._threads)
        if len(threads) < self.count or not all(t.is_alive() for t in threads):
            return False
        return all(now - since < wedged_after for since in list(self._busy_since.values()))

    def _loop(self):
        """Whatever fails in a round (a full disk, a bug), the thread logs it and
        goes on, waiting rescue_delay() while rounds keep failing: a failing
        write is tried again at the back-off, never in a tight loop."""
        me = threading.current_thread().name
        while not self._should_exit():
            did_work = False
            try:
                did_work = self._round(me)
            except Exception:  # noqa: BLE001 - even the error handling failed: log, go on
                log.exception("%s: unexpected error", me)
                self._failures_in_a_row += 1
            if did_work and self._retire_spare():
                return
            if not did_work:
                if self._stopping.is_set():
                    break
                wait = self.rescue_delay() if self._failures_in_a_row else self.next_wait()
                self.wakeups.acquire(timeout=wait)

    def _round(self, me):
        """Rescue what failed writes stranded, then claim and handle one item."""
        self._rescue_stranded()
        try:
            self._busy_since[me] = time.monotonic()
            did_work = self.work()
            if did_work:
                self._failures_in_a_row = 0
            return did_work
        except Exception as exc:  # keep the thread alive; the item stays in sqlite
            self._failures_in_a_row += 1
            self._stranded_at = time.monotonic()
            if isinstance(exc, sqlite3.Error) and is_storage_failure(exc):
                log.error("%s: cannot write the database (%s); what it had in hand goes "
                          "back in line in %gs", me, storage_problem(exc), self.rescue_delay())
            else:
                log.exception("%s: unexpected error", me)
            return False
        finally:
            self._busy_since.pop(me, None)
            self._holding.pop(me, None)

    def rescue_delay(self):
        """1 s after a failure, doubling while items keep failing (each retry of a
        turn is another model call), at most RESCUE_MAX: capped before it is
        computed, however long the failures go on."""
        doublings = min(max(0, self._failures_in_a_row - 1), self.RESCUE_DOUBLINGS)
        return min(self.RESCUE_FIRST * 2 ** doublings, self.RESCUE_MAX)

    def _rescue_stranded(self):
        failed_at = self._stranded_at
        if failed_at is None or time.monotonic() - failed_at < self.rescue_delay():
            return
        with self._rescue_lock:
            if self._stranded_at != failed_at:
                return  # another thread did it, or a newer failure waits its turn
            try:
                count = self.rescue(lambda: set(self._holding.values()))
            except sqlite3.Error as exc:
                self._failures_in_a_row += 1
                log.error("%s: still cannot write the database (%s); trying again in %gs",
                          self.name, storage_problem(exc), self.rescue_delay())
                self._stranded_at = time.monotonic()
                return
            if self._stranded_at == failed_at:  # a failure meanwhile waits for its turn
                self._stranded_at = None
        if count:
            log.info("%s: %d item(s) back in line after a failed write", self.name, count)
            self.wakeups.release(count)

    def _should_exit(self):
        if not self._stopping.is_set():
            return False
        return self._drain_until is None or time.monotonic() >= self._drain_until

    def next_wait(self):
        return self.poll

    def work(self):
        """Claim one item and handle it; False when there was none."""
        item = self.claim(self.hold)
        if item is None:
            return False
        self.handle(item)
        return True

    def handle(self, item):
        raise NotImplementedError

    def rescue(self, held):
        return self.store.requeue(self.table, held)


class TurnWorkers(WorkerPool):
    """Run queued async turns, one user's messages in arrival order, and put
    each reply (or error) in the outbox for the dispatcher."""

    def __init__(self, settings, store, agent, gate, dispatcher, handover, channels):
        # Up to [agent] concurrency turns at the model, and `workers` free threads.
        count = settings.delivery.workers
        super().__init__("turn-worker", count,
                         most=lambda: count + settings.agent.concurrency)
        self.settings = settings
        self.handover = handover
        self.store = store
        self.agent = agent
        self.gate = gate
        self.dispatcher = dispatcher
        self.channels = channels  # name -> Channel: what becomes of a finished turn
        self.table, self.claim = "jobs", store.claim_job

    def _loop(self):
        self.gate.pools.pool = self
        super()._loop()

    def handle(self, job):
        request = json.loads(job["request"])
        body = {"session_id": job["session_id"], "in_reply_to": job["user_id"],
                "message_id": job["message_id"]}
        try:
            with self.gate.turn(job["user_id"], job["created"], while_waiting=self.unwatched,
                                message_id=job["message_id"]):
                result = self.agent.run_turn(request, job["session_id"], job["message_id"],
                                             self.handover.emitter(job["message_id"]))
            body.update(reply=result["reply"], tool_calls=result["tool_calls"])
            body.update((flag, True) for flag in ("truncated", "refused") if result.get(flag))
        except ApiError as exc:  # Agent.run_turn logged why
            body["error"] = exc.as_dict()
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) and is_storage_failure(exc):
                raise  # not the sender's problem: the job goes back in line
            log.exception("turn %s failed unexpectedly", job["message_id"])
            body["error"] = error_dict(500, "the agent failed unexpectedly; the daemon's log "
                                            "has the details")
        channel = self.channels[job["channel"]]
        deliver = channel.delivers()  # unless its waiting request took it
        outgoing = channel.outgoing(request, body)
        exchange = (None if "error" in body or body.get("refused") else
                    (request["message"], body["reply"], self.settings.sessions.max_history))
        self.handover.finish(job["message_id"], body, lambda taken: self.store.finish_job(
            job, body, deliver and not taken, outgoing, exchange))
        self.dispatcher.notify()
        self.notify()  # this user's next message, if any, may start now


class SendLater(Exception):
    """A channel cannot send now (no outbound URL yet): the entry waits, and
    is looked at again after CallbackDispatcher.SEND_LATER_AFTER."""


def attempt_error(exc, setting):
    """Why an attempt failed, without the URL: its user info, path and query
    often hold tokens, and some exceptions (http.client.InvalidURL) quote them."""
    if isinstance(exc, OSError):
        return "network error: " + ("timed out" if is_timeout(exc) else network_reason(exc))
    return f"cannot send: {type(exc).__name__} (is {setting} a URL that can be used as it is?)"


class CallbackDispatcher(WorkerPool):
    """Send the outbox's entries, each through the channel that made it (a
    callback to the outbound URL, Twilio's Messages API). Retries follow
    [delivery] retry_schedule with jitter; Retry-After is honoured on 429/503;
    other 4xx (but 408) are final."""

    SEND_LATER_AFTER = 60.0  # seconds between looks for an outbound URL (set by reload)

    def __init__(self, settings, store, metrics, channels, clock=time.time):
        super().__init__("dispatcher", settings.delivery.dispatchers)
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.channels = channels  # name -> Channel
        self.clock = clock
        self.table, self.claim = "deliveries", store.claim_delivery

    def queue_notification(self, ctx, message):
        """The webhook_send tool: a message of the agent's own to the outbound URL."""
        message_id = new_id("msg")
        body = {"type": "notification", "session_id": ctx.session_id,
                "in_reply_to": ctx.user_id, "message_id": message_id, "message": message}
        with self.store.transaction(durable=True) as db:
            self.store.add_delivery(db, message_id, ctx.user_id, body)
        self.notify()
        return message_id

    def next_wait(self):
        try:
            due = self.store.next_delivery_due()
        except sqlite3.Error as exc:  # the loop must live on; a poll later it asks again
            log.error("%s: cannot read the outbox: %s", self.name, one_line(exc))
            return self.poll
        if due is None:
            return self.poll
        return min(self.poll, max(0.01, due - self.clock()))

    def handle(self, row):
        attempt = row["attempts"] + 1
        channel = self.channels[row["channel"]]
        try:
            status, headers, where = channel.send(row)
        except SendLater as exc:
            self._retry(row, attempt, str(exc), retry_after=self.SEND_LATER_AFTER)
            return
        except Exception as exc:  # whatever went wrong, it is a failed attempt
            self._retry(row, attempt, attempt_error(exc, channel.send_setting))
            return
        self._answered(row, attempt, status, headers, where)

    def _answered(self, row, attempt, status, headers, where):
        """The outcome of an attempt that got an HTTP answer."""
        if 200 <= status < 300:
            self.store.delivery_done(row["seq"])
            self.metrics.inc("aibutler_deliveries_total", (("outcome", "delivered"),))
            log.info("delivery %s: delivered to %s (attempt %d)", row["message_id"],
                     where, attempt)
        elif status in (408, 429) or status >= 500:
            retry_after = (parse_retry_after(headers.get("Retry-After"))
                           if status in (429, 503) else None)
            self._retry(row, attempt, f"HTTP {status}", retry_after)
        else:
            self._fail(row, attempt, f"HTTP {status}, which is not retried")

    def _retry(self, row, attempt, error, retry_after=None):
        schedule = self.settings.delivery.retry_schedule
        if attempt > len(schedule):
            self._fail(row, attempt, f"{error}; gave up after {attempt} attempts")
            return
        if retry_after is not None:
            delay = retry_after
        else:
            delay = schedule[attempt - 1] * random.uniform(0.8, 1.2)
        self.store.delivery_retry_at(row["seq"], self.clock() + delay, error)
        self.metrics.inc("aibutler_deliveries_total", (("outcome", "retry"),))
        log.warning("delivery %s: attempt %d failed (%s); next try in %.1fs",
                    row["message_id"], attempt, error, delay)

    def _fail(self, row, attempt, error):
        self.store.delivery_failed(row["seq"], error)
        self.metrics.inc("aibutler_deliveries_total", (("outcome", "failed"),))
        log.error("delivery %s: FAILED for good after attempt %d: %s. Retry it with: %s",
                  row["message_id"], attempt, error, command_hint(
                      os.path.dirname(self.store.path), "deliveries", "retry",
                      row["message_id"]))


# === HTTP: limits, authentication, resources ================================

MAX_USERS_LIMITED = 10000  # token buckets kept at once (full ones are dropped first)


class RateLimiter:
    """Token buckets, one per key; holds at most max_keys buckets (full ones go first)."""

    def __init__(self, rate, max_keys=MAX_USERS_LIMITED):
        self.capacity, period = rate
        self.refill = self.capacity / period if self.capacity else 0.0
        self.max_keys = max_keys
        self._buckets = {}
        self._lock = threading.Lock()

    def take(self, key=""):
        """0 when allowed, else the seconds until a token is free."""
        if not self.capacity:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.refill)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                if len(self._buckets) > self.max_keys:
                    self._prune(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.refill

    def _prune(self, now):
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.refill >= self.capacity:
                del self._buckets[key]
        while len(self._buckets) > self.max_keys:  # all busy: drop the oldest
            del self._buckets[next(iter(self._buckets))]


class Authenticator:
    """Checks X-Aibutler-Secret (or a Standard Webhooks signature made with the
    same secret, or a per-user token: Authorization: Bearer <JWT>) and
    throttles client addresses that keep failing."""

    FAILURES_ALLOWED, FAILURE_WINDOW, BLOCK_FOR = 10, 60.0, 60.0
    MAX_ADDRESSES = 10000  # remembered failing or blocked addresses, each table
    SIGNATURE_TOLERANCE = 300

    def __init__(self, settings, vault, store, metrics, clock=time.time):
        self.settings = settings
        self.vault = vault
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._failures = {}
        self._blocked = {}
        self._lock = threading.Lock()

    def client_address(self, req):
        address = req.remote_addr or ""
        trusted = self.settings.server.trusted_proxies
        if not trusted or not ip_in(address, trusted):
            return address
        forwarded = [a.strip() for a in (req.get_header("X-Forwarded-For") or "").split(",")]
        for hop in reversed([a for a in forwarded if a]):
            if not ip_in(hop, trusted):
                return hop
        return address

    def client_group(self, req):
        """The client as the per-address limits count it (address_group)."""
        return address_group(self.client_address(req))

    def check(self, req):
        """Before the body is read. Returns "secret", or "signature" when the
        request is signed instead (verify_signature then needs the body); raises
        401, or 429 for a wrong or missing secret from a blocked address. The
        right secret is never refused: behind a proxy, a blocked address may be
        everybody's."""
        given = req.get_header("X-Aibutler-Secret")
        if given is None and req.get_header("webhook-signature"):
            return "signature"
        bearer = req.get_header("Authorization") or ""
        if given is None and bearer[:7].lower() == "bearer ":
            try:  # a per-user token: req.context.token_user is who it lets act
                req.context.token_user = verify_token(bearer[7:].strip(), accepted_secrets(
                    self.vault, self.settings.webhook.previous_secret_grace, self.clock(),
                    TOKEN_SECRET_NAME), self.clock())
            except TokenError as exc:
                raise self.failed(req, str(exc)) from None
            return "token"
        if given and self.accepts(given.encode()):
            return "secret"
        raise self.failed(req, "missing" if given is None else "wrong")

    def accepts(self, given):
        """The current secret is tried first: the previous one and its rotation
        time are looked up in the vault only when it does not match."""
        current = self.vault.get(SECRET_NAME)
        if current and hmac.compare_digest(given, current.encode()):
            return True
        return any(hmac.compare_digest(given, s.encode()) for s in self.secrets())

    def verify_signature(self, req, body):
        webhook_id = req.get_header("webhook-id") or ""
        timestamp = req.get_header("webhook-timestamp") or ""
        given = (req.get_header("webhook-signature") or "").split()
        if not webhook_id or not re.fullmatch(r"[0-9]{1,20}", timestamp):
            raise self.failed(req, "signed without webhook-id or a numeric webhook-timestamp")
        if abs(self.clock() - int(timestamp)) > self.SIGNATURE_TOLERANCE:
            raise self.failed(req, f"signature timestamp more than "
                                   f"{self.SIGNATURE_TOLERANCE // 60} minutes off")
        expected = {sign_payload(s, webhook_id, timestamp, body) for s in self.secrets()}
        if not any(hmac.compare_digest(g.encode(), e.encode()) for g in given for e in expected):
            raise self.failed(req, "bad signature")
        if self.store.signature_seen(webhook_id, timestamp, 2 * self.SIGNATURE_TOLERANCE):
            raise self.failed(req, "replayed signed request")

    def secrets(self):
        return accepted_secrets(self.vault, self.settings.webhook.previous_secret_grace,
                                now=self.clock())

    def refuse_blocked(self, req):
        """Before any costly work (reading and checking a signed form): 429 at
        once while the client's address is blocked."""
        with self._lock:
            error = self._blocked_error(req, self.client_group(req),
                                        time.monotonic())
        if error is not None:
            raise error

    def _blocked_error(self, req, client, now):
        blocked_until = self._blocked.get(client, 0)
        if blocked_until <= now:
            return None
        req.context.quiet = True  # a blocked client must not flood the journal
        self.metrics.inc("aibutler_rate_limited_total", (("scope", "auth_failures"),))
        return ApiError(429, "too many failed authentications from this address",
                        retry_after=math.ceil(blocked_until - now))

    def failed(self, req, why):
        """Count a failed authentication; returns the error to raise: 401, or a
        quiet 429 while the address is blocked. Addresses are grouped as
        address_group says: one IPv6 host owns a whole /64."""
        client = self.client_group(req)
        now = time.monotonic()
        with self._lock:
            blocked = self._blocked_error(req, client, now)
            if blocked is not None:
                return blocked
            self.metrics.inc("aibutler_auth_failures_total")
            recent = [t for t in self._failures.get(client, ()) if now - t < self.FAILURE_WINDOW]
            recent.append(now)
            self._failures[client] = recent
            self._prune(now)
            if len(recent) >= self.FAILURES_ALLOWED:
                self._blocked[client] = now + self.BLOCK_FOR
                self._failures.pop(client, None)
                log.warning("auth: %d failed attempts from %s within %ds; refusing its wrong "
                            "secrets for %ds", len(recent), client, self.FAILURE_WINDOW,
                            self.BLOCK_FOR)
            elif len(recent) == 1:
                log.warning("auth: rejected a request from %s (%s)", client, why
                            if why not in ("missing", "wrong") else f"{why} secret")
        return ApiError(401, "missing or wrong X-Aibutler-Secret header (check for trailing "
                             "newlines or whitespace in the secret)"
                        if why in ("missing", "wrong") else f"authentication failed: {why}")

    def tracked_addresses(self):
        return len(self._failures) + len(self._blocked)

    def _prune(self, now):
        """Both tables stay bounded whatever the number of addresses (under the lock)."""
        if len(self._failures) > self.MAX_ADDRESSES:
            self._failures = {c: v for c, v in self._failures.items()
                              if now - v[-1] < self.FAILURE_WINDOW}
        if len(self._blocked) > self.MAX_ADDRESSES:
            self._blocked = {c: until for c, until in self._blocked.items() if until > now}
        for table in (self._failures, self._blocked):  # all recent: the oldest go
            while len(table) > self.MAX_ADDRESSES:
                del table[next(iter(table))]


def address_group(address):
    """The unit the per-address limits count: an IPv4 address, or an IPv6
    address's /64 (one host, one home or one VPS is given a whole /64, so its
    2**64 addresses are one client); an IPv4-mapped IPv6 address is its IPv4."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)


def ip_in(address, networks):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def parse_body(raw):
    """Bytes -> JSON value, or a 400 saying exactly what is wrong."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return loads_json(text)
    except RecursionError:
        raise ApiError(400, "the JSON is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None


MAX_NESTING = 32  # levels of objects and lists in a message; the model needs few


def check_strings(value, field, depth=0):
    """422 for what sqlite and strict JSON parsers refuse: a lone surrogate
    ("\\ud800") in any string, and nesting deeper than MAX_NESTING."""
    if depth > MAX_NESTING:
        raise ApiError(422, f"{field} is nested deeper than {MAX_NESTING} levels", field=field)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, f"{field} holds a lone surrogate (\\ud800-\\udfff), which is "
                                "not text", field=field) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_strings(key, field, depth + 1)
            check_strings(item, f"{field}.{key}" if key.isidentifier() else field, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_strings(item, f"{field}[{index}]", depth + 1)



def validate_message(data):
    """A parsed body -> the message the agent gets, or 422 naming the field."""
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object")
    user_id, message = data.get("user_id"), data.get("message")
    if not isinstance(user_id, str) or not user_id.strip():
        raise ApiError(422, "user_id is required: a non-empty string", field="user_id")
    if len(user_id) > USER_ID_MAX:
        raise ApiError(422, f"user_id is longer than {USER_ID_MAX} characters", field="user_id")
    if has_control_characters(user_id):  # CHANNEL_USER: no other channel's user can be named
        raise ApiError(422, "user_id must not contain control characters", field="user_id")
    if not isinstance(message, str) or not message.strip():
        raise ApiError(422, "message is required: a non-empty string", field="message")
    for field in ("user_id", "message", "metadata", "session_id", "attachments"):
        check_strings(data.get(field), field)
    request = {"user_id": user_id, "message": message}
    metadata = data.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise ApiError(422, "metadata must be a JSON object", field="metadata")
        request["metadata"] = metadata
    session_id = data.get("session_id")
    if session_id is not None:
        if not isinstance(session_id, str) or not 0 < len(session_id) <= SESSION_ID_MAX:
            raise ApiError(422, f"session_id must be a string of 1 to {SESSION_ID_MAX} "
                                "characters", field="session_id")
        request["session_id"] = session_id
    attachments = data.get("attachments")
    if attachments is not None:
        request["attachments"] = validate_attachments(attachments)
    return request


# An attachment's URL: http(s), a registered name or IPv4 host (no user info, no
# IPv6 literal), a port that fits in 16 bits, then anything but space and controls.
# Spelled out so that /openapi.json can publish the very rule (is_http_url's
# urllib accepts more: leading blanks, tabs, any port).
ATTACHMENT_URL_PATTERN = (r"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9._~%!$&'()*+,;=-]+"
                          r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}"
                          r"|[1-5][0-9]{4}|[0-9]{1,4}))?([/?#][^\x00-\x20\x7f]*)?$")


def validate_attachments(attachments):
    if not isinstance(attachments, list) or len(attachments) > ATTACHMENTS_MAX:
        raise ApiError(422, f"attachments must be a list of at most {ATTACHMENTS_MAX} "
                            "{url, type?, name?}", field="attachments")
    checked = []
    for i, item in enumerate(attachments):
        field = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise ApiError(422, f"{field} must be an object {{url, type?, name?}}", field=field)
        url = item.get("url")
        if not is_attachment_url(url):
            raise ApiError(422, f"{field}.url must be an http(s) URL", field=field + ".url")
        entry = {"url": url}
        for key in ("type", "name"):
            if item.get(key) is not None:
                if not isinstance(item[key], str):
                    raise ApiError(422, f"{field}.{key} must be a string", field=f"{field}.{key}")
                entry[key] = item[key]
        checked.append(entry)
    return checked


def is_attachment_url(url):
    return isinstance(url, str) and bool(re.fullmatch(ATTACHMENT_URL_PATTERN, url)) \
        and is_http_url(url)


def is_http_url(url):
    """An absolute http(s) URL with a host that parses (port, IPv6 brackets)."""
    if not isinstance(url, str):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def is_json_media_type(content_type):
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


class WaitLimits:
    """How many requests may wait for a reply at once ([server] max_waiting,
    max_waiting_per_address, max_waiting_per_user): Prefer: wait, reply_wait,
    long polls of a message's status and Twilio's reply_wait each hold a
    connection and a thread. A request over a bound waits not at all: it is
    answered at once (202, or the status as it is), and its Aibutler-Wait-
    Limited header names the bound."""

    HEADER = "Aibutler-Wait-Limited"

    def __init__(self, settings, metrics):
        self.settings = settings
        self.metrics = metrics
        self._lock = threading.Lock()
        self._total = 0
        self._addresses = collections.Counter()
        self._users = collections.Counter()

    @contextlib.contextmanager
    def slot(self, user_id, address):
        """Inside: None while this request may wait, else the bound it is over."""
        server = self.settings.server
        with self._lock:
            over = ("max_waiting" if self._total >= server.max_waiting else
                    "max_waiting_per_address"
                    if self._addresses[address] >= server.max_waiting_per_address else
                    "max_waiting_per_user" if self._users[user_id] >= server.max_waiting_per_user
                    else None)
            if over is None:
                self._count(user_id, address, +1)
        if over is not None:
            self.metrics.inc("aibutler_rate_limited_total", (("scope", over),))
        try:
            yield over
        finally:
            if over is None:
                with self._lock:
                    self._count(user_id, address, -1)

    def _count(self, user_id, address, change):
        self._total += change
        for counter, key in ((self._addresses, address), (self._users, user_id)):
            counter[key] += change
            if not counter[key]:
                del counter[key]


class Limits:
    """[limits] as token buckets: one for the whole channel, one per user_id.
    Buckets are rebuilt when a reload changes the rates."""

    def __init__(self, settings, metrics):
        self.settings = settings
        self.metrics = metrics
        self._rates = None
        self._buckets = ()

    def check(self, user_id):
        """Raises 429 with Retry-After when either bucket is empty."""
        rates = (self.settings.limits.rate, self.settings.limits.user_rate)
        if rates != self._rates:
            self._rates = rates
            self._buckets = (("channel", "rate", RateLimiter(rates[0], max_keys=1), ""),
                             ("user", "user_rate", RateLimiter(rates[1]), None))
        for scope, key_name, limiter, key in self._buckets:
            wait = limiter.take(user_id if key is None else key)
            if wait:
                self.metrics.inc("aibutler_rate_limited_total", (("scope", scope),))
                raise ApiError(429, f"rate limit reached for this {scope} ([limits] "
                                    f"{key_name})", retry_after=max(1, math.ceil(wait)))


SHUTDOWN_RETRY_AFTER = 5  # seconds a sender is asked to wait while we restart
IDEMPOTENCY_KEY_MAX = 255


def body_too_large(limit):
    return ApiError(413, f"the body is larger than {limit} bytes ([server] max_body_bytes)")


def read_body(req, limit):
    """The body, at most `limit` bytes; 413 past it (with no or a false Content-Length)."""
    raw = req.bounded_stream.read(limit + 1)
    if len(raw) > limit:
        raise body_too_large(limit)
    return raw


def shutting_down():
    return ApiError(503, "the daemon is shutting down; try again shortly",
                    retry_after=SHUTDOWN_RETRY_AFTER)


class HealthResource:
    def on_get(self, req, resp):
        resp.media = {"status": "ok", "version": __version__}


class ReadyResource:
    """503 while the queue is full, the database cannot be written, or a worker
    or dispatcher died or is wedged."""

    def __init__(self, readiness):
        self.readiness = readiness  # () -> {check: bool}

    def on_get(self, req, resp):
        checks = self.readiness()
        ready = all(checks.values())
        resp.status = 200 if ready else 503
        resp.media = {"status": "ready" if ready else "not ready", "checks": checks}


def require_secret(auth, req, public_setting):
    """A GET for the operator: the secret itself (a signature signs no body here)."""
    try:
        if auth.check(req) == "secret":
            return
    except ApiError as exc:
        if exc.status != 401:
            raise  # 429: the address is blocked
    raise ApiError(401, f"{req.path} needs the X-Aibutler-Secret header (or [server] "
                        f"{public_setting} = true)")


class MetricsResource:
    def __init__(self, settings, auth, metrics):
        self.settings = settings
        self.auth = auth
        self.metrics = metrics

    def on_get(self, req, resp):
        if not self.settings.server.metrics_public:
            require_secret(self.auth, req, "metrics_public")
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.text = self.metrics.render()


class CorsPolicy:
    """[channels.webhook] allowed_origins: pages from these origins may call the
    daemon from a browser. For them, preflights (OPTIONS) are answered and every
    answer, errors included, names the origin and what a page may send and read;
    any other origin gets no CORS header at all (the browser then blocks it)."""

    METHODS = "GET, POST, OPTIONS"
    HEADERS = "Authorization, Content-Type, Idempotency-Key, Prefer"
    EXPOSED = ("Location, Preference-Applied, Idempotent-Replayed, Retry-After, "
               + WaitLimits.HEADER)
    MAX_AGE = "600"  # seconds a browser may keep a preflight's answer

    def __init__(self, settings):
        self.settings = settings

    @staticmethod
    def preflight(req):
        return req.method == "OPTIONS" and req.get_header("Access-Control-Request-Method")

    def process_request(self, req, resp):
        if self.preflight(req):  # answered here, whatever the route
            resp.status = 204
            resp.complete = True

    def process_response(self, req, resp, resource, req_succeeded):
        origins = self.settings.webhook.allowed_origins
        if not origins:
            return
        resp.append_header("Vary", "Origin")
        origin = req.get_header("Origin") or ""
        if origin.lower() not in origins:
            return
        resp.set_header("Access-Control-Allow-Origin", origin)
        if self.preflight(req):
            resp.set_header("Access-Control-Allow-Methods", self.METHODS)
            resp.set_header("Access-Control-Allow-Headers", self.HEADERS)
            resp.set_header("Access-Control-Max-Age", self.MAX_AGE)
        else:
            resp.set_header("Access-Control-Expose-Headers", self.EXPOSED)


class RequestLog:
    """One log line and one metrics sample per request; the message text is never
    logged. Metrics are labelled with the route's template (`/webhook/custom/
    messages/{message_id}`), never the path sent: the series stay as many as the
    routes and statuses, whatever arrives."""

    PATH_LOGGED = 200  # characters of a request's path in its log line

    def __init__(self, metrics):
        self.metrics = metrics
        self.templates = {}  # resource -> the route template it was added with

    def process_request(self, req, resp):
        req.context.started = time.monotonic()

    def process_response(self, req, resp, resource, req_succeeded):
        seconds = time.monotonic() - getattr(req.context, "started", time.monotonic())
        status = falcon.http_status_to_code(resp.status)
        path = self.templates.get(resource, "(unmatched)")
        if not getattr(req.context, "quiet", False):
            shown = req.path if len(req.path) <= self.PATH_LOGGED else (
                req.path[:self.PATH_LOGGED] + f"...({len(req.path)} characters)")
            log.info("%s %s %d %.1fms", req.method, shown, status, seconds * 1000)
        self.metrics.inc("aibutler_http_requests_total", (("path", path), ("status", str(status))))
        self.metrics.observe("aibutler_http_request_seconds", (("path", path),), seconds)


def write_error(resp, status, description, *, title=None, field=None, retry_after=None):
    resp.status = status
    resp.media = {"error": error_dict(status, description, title, field)}
    if retry_after is not None:
        resp.set_header("Retry-After", str(int(math.ceil(retry_after))))


def serialize_falcon_error(req, resp, exc):
    """falcon's own errors (404, 405, bad headers) in the project's one error shape."""
    status = falcon.http_status_to_code(exc.status)
    description = exc.description or {
        404: f"no route for {req.path}",
        405: f"{req.method} is not allowed on {req.path}",
    }.get(status, HTTPStatus(status).phrase)
    title = exc.title if exc.title and not exc.title[:3].isdigit() else None
    write_error(resp, status, description, title=title)


def handle_api_error(req, resp, exc, params):
    write_error(resp, exc.status, exc.description, field=exc.field, retry_after=exc.retry_after)


STORAGE_RETRY_AFTER = 30  # seconds a sender is asked to wait when the disk failed us


def handle_storage_error(req, resp, exc, params):
    """A full disk or an unwritable database is not a bug: 503, say why, and
    nothing was promised (a 202 is only sent after its COMMIT)."""
    if not is_storage_failure(exc):
        handle_unexpected(req, resp, exc, params)
        return
    problem = storage_problem(exc)
    log.error("storage: %s: %s", problem, one_line(exc))
    if str(exc).startswith(UNSYNCED):  # COMMIT worked, the fsync after it did not
        write_error(resp, 503, f"the message may not have been stored: {problem}; try again "
                               "later with the same Idempotency-Key, so that it runs once",
                    retry_after=STORAGE_RETRY_AFTER)
        return
    write_error(resp, 503, f"the message was not stored: {problem}; try again later",
                retry_after=STORAGE_RETRY_AFTER)


def handle_unexpected(req, resp, exc, params):
    log.error("unhandled error on %s %s", req.method, req.path, exc_info=exc)
    write_error(resp, 500, "internal error; the daemon's log has the details")


# --- /openapi.json: the contract, built from the constants the handlers check with

# === HTTP: the published contract (/openapi.json), create_app ===============

NOT_BLANK = r"\S"  # user_id and message: str.strip() leaves something
# user_id: not blank, and no control character (has_control_characters)
USER_ID_PATTERN = r"^[^\u0000-\u001f\u007f]*[^\s\u0000-\u001f\u007f][^\u0000-\u001f\u007f]*$"
ERROR_MEANINGS = {
    400: "the body is not JSON (empty, not UTF-8, malformed or nested too deeply)",
    401: "missing or wrong X-Aibutler-Secret, or a bad Standard Webhooks signature",
    404: "no such message (unknown, or pruned after [delivery] idempotency_ttl), or "
         "session_id names no session of this user_id",
    408: "the request did not arrive within [server] header_timeout or request_timeout",
    409: "a request with this Idempotency-Key is still being processed (Retry-After)",
    413: "the body is larger than [server] max_body_bytes",
    415: "the Content-Type is not application/json (or application/*+json)",
    422: "a field is missing or invalid (`field` names it), or the Idempotency-Key was "
         "used for a different body",
    429: "a rate limit ([limits]) was reached, or this address failed to authenticate "
         "too often (Retry-After)",
    500: "a bug; the daemon's log has the traceback",
    502: "the model server failed or answered something unusable",
    503: "shutting down, queue full ([delivery] max_pending), the model busy, or the "
         "database not writable (Retry-After)",
    504: "the model did not answer within [agent] timeout",
}
RETRY_AFTER_STATUSES = (409, 429, 503)


OPENAPI_STRING = {"type": "string"}
OPENAPI_WAIT_LIMITED = {WaitLimits.HEADER: {
    "description": "the request did not wait for the reply: this bound ([server]) was reached",
    "schema": {"enum": ["max_waiting", "max_waiting_per_address", "max_waiting_per_user"]}}}
OPENAPI_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                                       "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
OPENAPI_ERROR = {"type": "object", "required": ["error"], "additionalProperties": False,
                 "properties": {"error": {
                     "type": "object", "required": ["status", "title", "description"],
                     "additionalProperties": False,
                     "properties": {"status": {"type": "integer", "minimum": 400, "maximum": 599},
                                    "title": OPENAPI_STRING, "description": OPENAPI_STRING,
                                    "field": {"type": "string",
                                              "description": "the input at fault"}}}}}


def openapi_ref(kind, name):
    return {"$ref": f"#/components/{kind}/{name}"}


def openapi_answer(description, schema, headers=None, media="application/json"):
    return {"description": description, "content": {media: {"schema": schema}},
            **({"headers": headers} if headers else {})}


def openapi_responses(ok, *errors):
    """`ok` and the shared error responses (500 always)."""
    listed = {str(code): openapi_ref("responses", str(code)) for code in (500,) + errors}
    return dict(ok, **dict(sorted(listed.items())))


def openapi_document(settings, channels):
    """The OpenAPI 3.1 description of the routes create_app adds with this
    config: the active channels' own (Channel.openapi), then the daemon's;
    every status each can answer, in the one error shape. Limits come from the
    same constants the handlers use, so the document cannot drift from them;
    tests/test_openapi.py and the fuzzer run in .ci/run hold the handlers to it."""
    ref, string = openapi_ref, OPENAPI_STRING
    answer, responses = openapi_answer, openapi_responses
    paths = {}
    components = {
        "schemas": {"Error": OPENAPI_ERROR, "ErrorDetail": OPENAPI_ERROR["properties"]["error"]},
        "responses": {str(code): answer(f"{HTTPStatus(code).phrase}: {meaning}",
                                        ref("schemas", "Error"),
                                        OPENAPI_RETRY_AFTER
                                        if code in RETRY_AFTER_STATUSES else None)
                      for code, meaning in ERROR_MEANINGS.items()},
        "securitySchemes": {
            "secret": {"type": "apiKey", "in": "header", "name": "X-Aibutler-Secret",
                       "description": "the vault's webhook_auth_secret"}}}
    for channel in channels:
        part = channel.openapi()
        paths.update(part.get("paths", {}))
        for kind, entries in part.get("components", {}).items():
            components.setdefault(kind, {}).update(entries)
    paths["/healthz"] = {"get": {"operationId": "health", "summary": "Liveness", "responses": {
        "200": answer("alive", {"type": "object", "additionalProperties": False,
                                "required": ["status", "version"],
                                "properties": {"status": {"const": "ok"}, "version": string}})}}}
    readiness = {"type": "object", "additionalProperties": False,
                 "required": ["status", "checks"], "properties": {
                     "status": {"enum": ["ready", "not ready"]},
                     "checks": {"type": "object", "additionalProperties": {"type": "boolean"}}}}
    paths["/readyz"] = {"get": {"operationId": "ready", "summary": "Readiness", "responses": {
        "200": answer("ready", readiness), "503": answer("not ready", readiness)}}}
    paths["/metrics"] = {"get": {
        "operationId": "metrics", "summary": "Prometheus metrics",
        "security": [] if settings.server.metrics_public else [{"secret": []}],
        "responses": responses({"200": answer("Prometheus text format 0.0.4", string,
                                              media="text/plain")},
                               *(() if settings.server.metrics_public else (401, 429)))}}
    public = settings.server.openapi_public
    paths["/openapi.json"] = {"get": {
        "operationId": "openapi", "summary": "This document",
        "security": [] if public else [{"secret": []}],
        "responses": responses({"200": answer("OpenAPI 3.1", {"type": "object"})},
                               *(() if public else (401, 429)))}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "aibutler", "version": __version__,
                 "description": "Let anything that can POST JSON talk to an AI agent."},
        "paths": paths,
        "components": components}


class OpenApiResource:
    """The document names the routes, limits and headers a sender needs: for
    callers with the secret, unless [server] openapi_public = true."""

    def __init__(self, settings, auth, channels):
        self.settings = settings
        self.auth = auth
        self.channels = channels

    def on_get(self, req, resp):
        if not self.settings.server.openapi_public:
            require_secret(self.auth, req, "openapi_public")
        resp.media = openapi_document(self.settings, self.channels)


class Channel:
    """A way messages come in and replies go out. Adding one (a Telegram bot,
    a MessageBird number) is a subclass in a part of its own, its keys in
    CONFIG_SCHEMA as [channels.NAME] (CHANNEL_NEEDS for what it cannot work
    without), and its class in CHANNELS (Wiring). The rest of the daemon
    knows channels only through this:
    - name: its name in [channels] active, kept on each job and outbox entry;
    - routes(http): (path, resource) pairs, given the parts resources use;
    - openapi(): its part of /openapi.json;
    - delivers(): whether a finished async turn's result goes out later;
    - outgoing(request, body): what goes into the outbox for it then;
    - send(row): one attempt at an outbox entry -> (status, headers, where to);
      an exception is a failed attempt, SendLater one that waits;
    - describe(): the start-up log line."""

    name = None
    send_setting = None  # the setting to check when send() cannot even try

    def __init__(self, settings, vault, store, clock=time.time):
        self.settings = settings
        self.vault = vault
        self.store = store
        self.clock = clock

    def routes(self, http):
        return []

    def openapi(self):
        return {}

    def delivers(self):
        return False

    def outgoing(self, request, body):
        return body

    def send(self, row):
        raise SendLater(f"the {self.name} channel sends nothing later")

    def describe(self):
        return f"{self.name} at {getattr(self.settings, self.name).path}"


def create_app(settings, http, metrics, readiness, channels):
    """The falcon app: each active channel's routes (Channel.routes, given
    `http`: the parts resources use), then the daemon's own."""
    load_web_stack()
    request_log = RequestLog(metrics)
    app = falcon.App(middleware=[request_log, CorsPolicy(settings)])

    def route(path, resource):
        app.add_route(path, resource)
        request_log.templates[resource] = path
    # falcon's default handler makes a JSON encoder for every answer; the same
    # text (ensure_ascii=False) from one made once.
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = falcon.media.JSONHandler(
        dumps=UNICODE_ENCODER.encode)
    app.req_options.strip_url_path_trailing_slash = True
    app.set_error_serializer(serialize_falcon_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(sqlite3.Error, handle_storage_error)
    app.add_error_handler(ApiError, handle_api_error)
    for channel in channels:
        for path, resource in channel.routes(http):
            route(path, resource)
    route("/healthz", HealthResource())
    route("/readyz", ReadyResource(readiness))
    route("/metrics", MetricsResource(settings, http.auth, metrics))
    route("/openapi.json", OpenApiResource(settings, http.auth, channels))
    return app


# === Channel: webhook (JSON in; the reply in the answer, or a callback) =====

class WebhookResource:
    """POST /webhook/custom: authenticate, bound, parse, validate, limit, then run
    the turn (sync) or queue it (async)."""

    def __init__(self, settings, auth, limits, inbox, stopping, waits, handover, gate):
        self.settings = settings
        self.auth = auth
        self.limits = limits
        self.inbox = inbox
        self.stopping = stopping  # an Event set once the daemon stops
        self.waits = waits
        self.handover = handover  # a streamed answer's events come from it
        self.gate = gate

    def on_post(self, req, resp):
        if self.stopping.is_set():
            raise shutting_down()
        how = self.auth.check(req)
        limit = self.settings.server.max_body_bytes
        if req.content_length is not None and req.content_length > limit:
            raise body_too_large(limit)
        if not is_json_media_type(req.content_type):
            raise ApiError(415, "send Content-Type: application/json. Twilio's form posts "
                                "go to the twilio channel ([channels.twilio]); see the README")
        raw = read_body(req, limit)
        if how == "signature":
            self.auth.verify_signature(req, raw)
        data = parse_body(raw)
        if how == "token" and isinstance(data, dict):  # the token says who is posting
            user = req.context.token_user
            if data.get("user_id") is None:
                data["user_id"] = user
            if data["user_id"] != user:
                raise ApiError(403, "user_id is not the token's user (its sub); leave it out",
                               field="user_id")
        request = validate_message(data)
        self.limits.check(request["user_id"])
        key = req.get_header("Idempotency-Key")
        if key is None:  # an empty key is a 422, not a request without one
            key = req.get_header("webhook-id")
        if key is not None and not 0 < len(key) <= IDEMPOTENCY_KEY_MAX:
            raise ApiError(422, f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} "
                                "characters", field="Idempotency-Key")
        webhook = self.settings.webhook
        respond_async, wait = parse_prefer(req.get_header("Prefer"))
        asked_to_wait = wait is not None  # wait=0 too: "I cannot wait", so 202 at once
        applied = []
        if asked_to_wait:
            wait = min(wait, webhook.max_wait)
            applied.append(f"wait={wait:g}")
        elif not respond_async:
            wait = min(webhook.reply_wait, webhook.max_wait)
        else:
            wait = 0
        if "text/event-stream" in (req.get_header("Accept") or ""):
            self.stream(req, resp, request, key)
            return
        if respond_async or asked_to_wait or wait or self.settings.async_mode:
            address = self.auth.client_group(req)
            with self.waits.slot(request["user_id"], address) if wait else \
                    contextlib.nullcontext() as over:
                if over:  # answered at once, and told why it did not wait
                    wait, applied = 0, [a for a in applied if not a.startswith("wait=")]
                    resp.set_header(WaitLimits.HEADER, over)
                status, body, replayed = self.inbox.accept(request, key, wait=wait,
                                                           status_path=self.status_path)
        else:
            status, body, replayed = self.inbox.run_sync(request, key)
        finished = (self.inbox.finished(body.get("message_id"))
                    if replayed and status == 202 and not self.settings.async_mode else None)
        if finished is not None:  # a repeat once the reply is there (a stream's): the reply
            status, body = result_answer(finished)
        resp.status = status
        resp.media = body
        if status == 202 and "message_id" in body:
            resp.set_header("Location", self.status_path(body["message_id"]))
            if respond_async:
                applied.insert(0, "respond-async")
        if applied:
            resp.set_header("Preference-Applied", ", ".join(applied))
        if replayed:
            resp.set_header("Idempotent-Replayed", "true")

    def status_path(self, message_id):
        return f"{self.settings.webhook.path}/messages/{message_id}"

    def stream(self, req, resp, request, key):
        """Accept: text/event-stream: the message is accepted as an async one
        (durable, in line at the turn gate), and its turn's events are sent as
        server-sent events while it runs: delta, tool_call, tool_result, then
        done (the sync reply's object, with message_id) or error. A client that
        goes away loses nothing: the turn finishes, and its reply is at the
        status URL (and in the callback, in async mode)."""
        address = self.auth.client_group(req)
        slot = self.waits.slot(request["user_id"], address)
        over = slot.__enter__()
        try:
            status, body, replayed = self.inbox.accept(request, key, status_path=self.status_path,
                                                       stream=over is None)
        except BaseException:
            slot.__exit__(None, None, None)
            raise
        finished = self.inbox.finished(body.get("message_id")) if replayed else None
        if finished is not None:  # a repeat of a streamed request: its reply, streamed
            slot.__exit__(None, None, None)
            status, answer = result_answer(finished)
            resp.status, resp.content_type = 200, "text/event-stream; charset=utf-8"
            resp.set_header("Idempotent-Replayed", "true")
            resp.set_header("Location", self.status_path(body["message_id"]))
            resp.data = sse("error", answer) if status != 200 else sse("done", answer)
            return
        if over or status != 202 or replayed:  # no stream to read: answered as JSON
            slot.__exit__(None, None, None)
            if over:
                resp.set_header(WaitLimits.HEADER, over)
            resp.status, resp.media = status, body
            if replayed:
                resp.set_header("Idempotent-Replayed", "true")
            if "message_id" in body:
                resp.set_header("Location", self.status_path(body["message_id"]))
            return
        message_id = body["message_id"]
        resp.status = 200
        resp.content_type = "text/event-stream; charset=utf-8"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")  # nginx: pass each event on at once
        resp.set_header("Location", self.status_path(message_id))
        resp.stream = EventStream(self.events(message_id), lambda: self.stop_streaming(
            message_id, slot))

    def stop_streaming(self, message_id, slot):
        """Done, or the client went away: its reply goes where a 202 sends it."""
        self.handover.forget(message_id)
        slot.__exit__(None, None, None)

    def events(self, message_id):
        events = self.handover.stream_of(message_id)
        if events is None:  # the daemon is stopping
            yield sse("error", {"error": shutting_down().as_dict()})
            return
        with self.gate.parked():
            while True:
                try:
                    event, data = events.get(timeout=self.settings.webhook.stream_keep_alive)
                except queue.Empty:
                    yield b": keep-alive\n\n"
                    continue
                if event == "release":
                    yield sse("error", {"error": shutting_down().as_dict()})
                    return
                if event == "finish":
                    status, answer = result_answer(data)
                    yield sse("error", answer) if status != 200 else sse("done", answer)
                    return
                yield sse(event, data)


class EventStream:
    """A streamed answer's body: its events, and on close() (the server calls
    it when the answer is over, sent or not) what must happen in any case."""

    def __init__(self, events, on_close):
        self.events = events
        self.on_close = on_close

    def __iter__(self):
        return self.events

    def close(self):
        self.events.close()
        self.on_close()


def sse(event, data):
    """One server-sent event: its name and its data, JSON on one line."""
    return f"event: {event}\ndata: {UNICODE_ENCODER.encode(data)}\n\n".encode()


def parse_prefer(header):
    """RFC 7240's Prefer header: (respond_async, wait seconds or None). A
    preference that is unknown or malformed is ignored, as the RFC asks."""
    respond_async, wait = False, None
    for preference in (header or "").split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        name, value = name.strip().lower(), value.strip().strip('"')
        if name == "respond-async" and not value:
            respond_async = True
        elif name == "wait" and wait is None and re.fullmatch(r"[0-9]{1,9}", value):
            wait = int(value)  # the first one counts (RFC 7240, 2)
    return respond_async, wait


WAIT_PATTERN = r"[0-9]{1,9}(\.[0-9]{1,6})?"  # ?wait=: seconds, as on a stopwatch


class MessageResource:
    """GET {path}/messages/{message_id}: where an accepted message stands, its
    reply once done, and its callback's delivery. ?wait=N answers as soon as it
    is done, or after N seconds (at most [channels.webhook] max_wait)."""

    def __init__(self, settings, auth, store, handover, gate, channel, waits):
        self.settings = settings
        self.auth = auth
        self.store = store
        self.handover = handover
        self.gate = gate
        self.channel = channel  # its messages only: not another channel's (a texter's)
        self.waits = waits

    def on_get(self, req, resp, message_id):
        how = self.auth.check(req)
        if how == "signature":
            self.auth.verify_signature(req, b"")
        wait = req.get_param("wait")
        if wait is not None:
            if not re.fullmatch(WAIT_PATTERN, wait):
                raise ApiError(422, "wait must be a number of seconds, like 20", field="wait")
            wait = min(float(wait), self.settings.webhook.max_wait)
        job, delivery = self.store.message(message_id)
        if job is None or job["channel"] != self.channel or (
                how == "token" and job["user_id"] != req.context.token_user):
            raise ApiError(404, f"no message {message_id!r}: unknown, or its result was "
                                "pruned ([delivery] idempotency_ttl)")
        if wait and job["state"] != "done":
            address = self.auth.client_group(req)
            with self.waits.slot(job["user_id"], address) as over:
                if over:
                    resp.set_header(WaitLimits.HEADER, over)
                else:
                    with self.gate.parked():
                        self.handover.watch(message_id, lambda: self._done(message_id), wait)
            job, delivery = self.store.message(message_id)
            if job is None:  # pruned meanwhile
                raise ApiError(404, f"no message {message_id!r}: its result was pruned")
        resp.media = message_status(job, delivery, self.gate.is_waiting(message_id))

    def _done(self, message_id):
        job, _ = self.store.message(message_id)
        return job is None or job["state"] == "done"


def message_status(job, delivery, waiting_for_a_place=False):
    """The status resource's body. A job a worker holds while its turn waits
    for a place at the model (TurnGate) is still queued."""
    state = "queued" if job["state"] == "running" and waiting_for_a_place else job["state"]
    body = {"message_id": job["message_id"], "session_id": job["session_id"],
            "user_id": job["user_id"], "status": state,
            "created_at": iso_utc(job["created"])}
    if job["state"] == "done":
        result = json.loads(job["result"] or "{}")
        body["status"] = "failed" if "error" in result else "done"
        body["finished_at"] = iso_utc(job["finished"])
        body.update((key, result[key]) for key in ("reply", "tool_calls", "truncated", "refused",
                                                  "error")
                    if key in result)
    if delivery is not None:
        state = {"sending": "pending"}.get(delivery["state"], delivery["state"])
        body["delivery"] = {"status": state, "attempts": delivery["attempts"]}
        if delivery["last_error"]:
            body["delivery"]["last_error"] = delivery["last_error"]
        if state == "pending":
            body["delivery"]["next_attempt_at"] = iso_utc(delivery["next_attempt"])
    return body


def webhook_openapi(settings):
    """The webhook channel's routes: the message, its answers and the callback,
    and the status route."""
    webhook = settings.webhook
    ref, string = openapi_ref, OPENAPI_STRING
    answer, responses = openapi_answer, openapi_responses
    nullable = lambda schema: dict(schema, type=[schema["type"], "null"])  # noqa: E731
    tool_call = {"type": "object", "required": ["name", "arguments"],
                 "properties": {"name": nullable(string), "arguments": {},
                                "result": {}, "error": string}}
    reply = {"reply": string, "session_id": string, "message_id": string,
             "tool_calls": {"type": "array", "items": ref("schemas", "ToolCall")},
             "truncated": {"type": "boolean", "const": True,
                           "description": "[agent] max_tokens cut the reply off"},
             "refused": {"type": "boolean", "const": True,
                         "description": "the model declined; the exchange is not kept"}}
    attachment = {"type": "object", "required": ["url"], "properties": {
        "url": {"type": "string", "pattern": ATTACHMENT_URL_PATTERN,
                "description": "http(s), a host name or IPv4 address, optional port"},
        "type": nullable(string), "name": nullable(string)}}
    message = {
        "type": "object", "required": ["user_id", "message"],
        "description": "Fields other than these are ignored; null is the same as absent.",
        "properties": {
            "user_id": {"type": "string", "minLength": 1, "maxLength": USER_ID_MAX,
                        "pattern": USER_ID_PATTERN,
                        "description": "who is writing; a per-user token's caller may leave "
                                       "it out (it is the token's sub)"},
            "message": {"type": "string", "minLength": 1, "pattern": NOT_BLANK},
            "metadata": {"type": ["object", "null"],
                         "description": f"anything the model should know; at most "
                                        f"{MAX_NESTING} levels deep"},
            "session_id": {"type": ["string", "null"], "minLength": 1,
                           "maxLength": SESSION_ID_MAX,
                           "description": "continue this session (404 when it is not "
                                          "one of this user's); absent: the current one"},
            "attachments": {"type": ["array", "null"], "maxItems": ATTACHMENTS_MAX,
                            "items": ref("schemas", "Attachment")}},
        "example": {"user_id": "alice", "message": "What time is it?",
                    "metadata": {"timezone": "Europe/Paris"}}}
    accepted = {"type": "object", "additionalProperties": False,
                "required": ["status", "session_id", "message_id", "status_url"],
                "properties": {"status": {"const": "accepted"}, "session_id": string,
                               "message_id": string, "status_url": string}}
    done = {"type": "object", "additionalProperties": False,
            "required": ["reply", "session_id", "tool_calls"], "properties": reply}
    delivery = {"type": "object", "additionalProperties": False,
                "required": ["status", "attempts"], "properties": {
                    "status": {"enum": ["pending", "delivered", "failed"]},
                    "attempts": {"type": "integer", "minimum": 0}, "last_error": string,
                    "next_attempt_at": {"type": "string", "format": "date-time"}}}
    status = {"type": "object", "additionalProperties": False,
              "required": ["message_id", "session_id", "user_id", "status", "created_at"],
              "properties": dict(
                  reply, user_id=string, status={"enum": ["queued", "running", "done", "failed"]},
                  created_at={"type": "string", "format": "date-time"},
                  finished_at={"type": "string", "format": "date-time"},
                  error=ref("schemas", "ErrorDetail"), delivery=delivery)}
    callback = {"oneOf": [
        {"type": "object", "additionalProperties": False,
         "required": ["session_id", "in_reply_to", "message_id"],
         "description": "a turn's result: reply and tool_calls, or error",
         "properties": dict(reply, in_reply_to={"type": "string",
                                                "description": "the sender's user_id"},
                            error=ref("schemas", "ErrorDetail"))},
        {"type": "object", "additionalProperties": False,
         "required": ["type", "session_id", "in_reply_to", "message_id", "message"],
         "description": "a message of the agent's own (the webhook_send tool)",
         "properties": {"type": {"const": "notification"}, "session_id": string,
                        "in_reply_to": string, "message_id": string, "message": string}}]}
    secured = [{"secret": []}, {"signature": []}]
    replay_headers = dict(OPENAPI_WAIT_LIMITED, **{
        "Preference-Applied": {"schema": string},
        "Idempotent-Replayed": {"schema": {"const": "true"}}})
    optional_header = lambda name, schema, text: {  # noqa: E731
        "name": name, "in": "header", "required": False, "schema": schema, "description": text}
    post = {
        "operationId": "sendMessage", "summary": "Send a message to the agent",
        "security": secured,
        "parameters": [
            optional_header("Idempotency-Key", {"type": "string", "minLength": 1,
                                                "maxLength": IDEMPOTENCY_KEY_MAX},
                            "a repeat with the same key (per user_id) gets the first answer; "
                            "webhook-id counts as one when this is absent"),
            optional_header("Prefer", string, "RFC 7240: respond-async (answer 202 at once), "
                            f"wait=N (wait up to N s, at most {webhook.max_wait:g}, for the "
                            "reply); anything else is ignored")],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": ref("schemas", "Message")}}},
        "responses": responses({
            "200": answer("the reply", ref("schemas", "Reply"), replay_headers),
            "202": dict(answer("accepted: the reply comes at status_url"
                               + (" and as a callback to [channels.webhook] outbound_url"
                                  if settings.async_mode else ""), ref("schemas", "Accepted"),
                               dict(replay_headers, Location={"schema": string})),
                        links={"status": {"operationId": "getMessage", "parameters": {
                            "message_id": "$response.body#/message_id"}}})},
            400, 401, 404, 408, 409, 413, 415, 422, 429, 502, 503, 504),
        "callbacks": {"reply": {"{$outbound_url}": {"post": {
            "summary": "The reply, POSTed to [channels.webhook] outbound_url (not published: "
                       "URLs hold tokens)",
            "description": "Retried on a network error, 408, 429 and 5xx along [delivery] "
                           "retry_schedule, honouring Retry-After on 429 and 503; the same "
                           "webhook-id each time, so a receiver can drop duplicates.",
            "parameters": [
                optional_header("Authorization", string, "Bearer <secret>, or Basic with "
                                "[channels.webhook] auth_user ([channels.webhook] auth_type)"),
                optional_header("webhook-id", string, "the message_id"),
                optional_header("webhook-timestamp", string, "Unix seconds"),
                optional_header("webhook-signature", string,
                                "Standard Webhooks v1,<base64 HMAC-SHA256> of "
                                "id.timestamp.body keyed with the secret")],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref("schemas", "Callback")}}},
            "responses": {"2XX": {"description": "delivered"},
                          "default": {"description": "retried or failed, as above"}}}}}}}
    paths = {}
    paths[webhook.path] = {"post": post}
    paths[webhook.path + "/messages/{message_id}"] = {"get": {
        "operationId": "getMessage", "summary": "Where an accepted message stands",
        "security": secured,
        "parameters": [
            {"name": "message_id", "in": "path", "required": True, "schema": string},
            {"name": "wait", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": f"^{WAIT_PATTERN}$"},
             "description": "answer once done, or after this many seconds (at most "
                            f"{webhook.max_wait:g}, [channels.webhook] max_wait)"}],
        "responses": responses({"200": answer("the message", ref("schemas", "Status"),
                                              OPENAPI_WAIT_LIMITED)},
                               401, 404, 408, 422, 429, 503)}}
    return {"paths": paths, "components": {
        "schemas": {"Message": message, "Attachment": attachment, "Reply": done,
                    "ToolCall": tool_call, "Accepted": accepted, "Status": status,
                    "Callback": callback},
        "securitySchemes": {
            "signature": {"type": "apiKey", "in": "header", "name": "webhook-signature",
                          "description": "instead of the secret: a Standard Webhooks v1 "
                                         "signature of the body with the same secret, "
                                         "with webhook-id and webhook-timestamp (at most "
                                         f"{Authenticator.SIGNATURE_TOLERANCE} s off)"}}}}


# The chat page ([channels.webhook] chat_page): one page, its script and its style,
# no build step and nothing from elsewhere (ChatPage.POLICY).
CHAT_HTML = r'''<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aibutler</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="chat.css">
<script src="chat.js" defer></script>
</head>
<body data-path="{path}">
<header><h1>aibutler</h1>
<form id="token-form"><input id="token" type="password" autocomplete="off"
 placeholder="Paste your token" aria-label="token"><button>Use</button></form></header>
<main id="log" aria-live="polite"></main>
<form id="send"><textarea id="message" rows="2" placeholder="Write a message"
 aria-label="message" required></textarea><button id="go">Send</button></form>
</body>
</html>
'''
CHAT_JS = r'''"use strict";
// aibutler's chat page: a per-user token (typed, or from #token=...), messages
// POSTed with Accept: text/event-stream, the reply shown as it streams.
const path = document.body.dataset.path;
const log = document.getElementById("log");
const tokenForm = document.getElementById("token-form");
const tokenInput = document.getElementById("token");
const sendForm = document.getElementById("send");
const input = document.getElementById("message");
const go = document.getElementById("go");
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  sessionStorage.setItem("token", fragment.get("token"));
  history.replaceState(null, "", location.pathname);  // not left in the address bar
}
let session = sessionStorage.getItem("session");

function token() { return sessionStorage.getItem("token") || ""; }

function showTokenForm() { tokenForm.hidden = Boolean(token()); }

function add(kind, text) {
  const item = document.createElement("div");
  item.className = "msg " + kind;
  item.textContent = text;
  log.append(item);
  log.scrollTop = log.scrollHeight;
  return item;
}

function brief(value) {
  const text = JSON.stringify(value);
  return text.length > 200 ? text.slice(0, 200) + "…" : text;
}

function failed(error) {
  add("error", error.description || String(error));
  if (error.status === 401) { sessionStorage.removeItem("token"); showTokenForm(); }
}

async function send(message) {
  const body = session ? {message, session_id: session} : {message};
  const answer = await fetch(path, {method: "POST", body: JSON.stringify(body), headers: {
    "Authorization": "Bearer " + token(), "Content-Type": "application/json",
    "Accept": "text/event-stream"}});
  if (!(answer.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
    const data = await answer.json();
    return data.error ? failed(data.error) : add("bot", data.reply || JSON.stringify(data));
  }
  let reply = null;
  const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;  // a keep-alive comment
      const payload = JSON.parse(data);
      if (event === "delta") {
        reply = reply || add("bot", "");
        reply.textContent += payload.text;
        log.scrollTop = log.scrollHeight;
      } else if (event === "tool_call") {
        add("tool", "⚙ " + payload.name + " " + brief(payload.arguments));
      } else if (event === "tool_result") {
        add("tool", "→ " + brief("error" in payload ? payload.error : payload.result));
      } else if (event === "done") {
        session = payload.session_id;
        sessionStorage.setItem("session", session);
        (reply || add("bot", "")).textContent = payload.reply;  // done's reply is the reply
      } else if (event === "error") {
        failed(payload.error);
      }
    }
  }
}

tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("token", tokenInput.value.trim());
  tokenInput.value = "";
  showTokenForm();
});
sendForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const message = input.value.trim();
  if (!message) return;
  if (!token()) return failed({description: "paste a token first (aibutler.py token USER)"});
  input.value = "";
  add("user", message);
  go.disabled = true;
  try { await send(message); } catch (error) { failed(error); } finally { go.disabled = false; }
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); go.click(); }
});
showTokenForm();
'''
CHAT_CSS = r'''* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; height: 100vh; height: 100dvh; display: flex; flex-direction: column;
  font: 16px/1.4 system-ui, sans-serif; background: #f4f4f5; color: #18181b; }
header { display: flex; gap: .5rem; align-items: center; padding: .5rem .75rem;
  background: #18181b; color: #fafafa; }
h1 { font-size: 1.1rem; margin: 0; flex: 1; }
header form { display: flex; gap: .25rem; }
#log { flex: 1; overflow-y: auto; padding: .75rem; display: flex; flex-direction: column;
  gap: .5rem; }
.msg { max-width: 85%; padding: .5rem .75rem; border-radius: .75rem; white-space: pre-wrap;
  overflow-wrap: anywhere; }
.user { align-self: flex-end; background: #2563eb; color: #fff; }
.bot { align-self: flex-start; background: #fff; border: 1px solid #e4e4e7; }
.tool { align-self: flex-start; font: .8rem ui-monospace, monospace; color: #52525b; }
.error { align-self: stretch; background: #fee2e2; color: #991b1b; }
#send { display: flex; gap: .5rem; padding: .5rem; background: #fff;
  border-top: 1px solid #e4e4e7; }
textarea { flex: 1; font: inherit; padding: .5rem; border: 1px solid #d4d4d8;
  border-radius: .5rem; resize: none; }
input { font: inherit; padding: .3rem .5rem; border-radius: .4rem; border: 0; width: 12rem; }
button { font: inherit; padding: .4rem .9rem; border: 0; border-radius: .5rem;
  background: #2563eb; color: #fff; }
button:disabled { opacity: .5; }
'''


class ChatPage:
    """GET /chat, /chat.js, /chat.css: a page to try the agent from a phone or a
    browser with a per-user token (typed, or from the link `token --url` prints),
    the reply shown as it streams. Its Content-Security-Policy lets it load and
    call only its own origin."""

    POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
              "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    ASSETS = {"/chat": ("text/html; charset=utf-8", CHAT_HTML),
              "/chat.js": ("text/javascript; charset=utf-8", CHAT_JS),
              "/chat.css": ("text/css; charset=utf-8", CHAT_CSS)}

    def __init__(self, settings, path):
        kind, text = self.ASSETS[path]
        self.kind = kind
        self.body = text.replace("{path}", settings.webhook.path.replace("&", "&amp;")).encode()

    def on_get(self, req, resp):
        resp.content_type = self.kind
        resp.data = self.body
        resp.set_header("Content-Security-Policy", self.POLICY)
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Referrer-Policy", "no-referrer")
        resp.set_header("Cache-Control", "no-cache")


class WebhookChannel(Channel):
    """The seed page's channel: JSON POSTed to [channels.webhook] path; the
    reply in the answer, or (async mode) POSTed to outbound_url with the
    configured auth header and a Standard Webhooks signature. The same
    webhook-id (= message_id) goes with every retry so receivers can drop
    duplicates."""

    name = "webhook"
    send_setting = "[channels.webhook] outbound_url"

    def routes(self, http):
        path = self.settings.webhook.path
        routes = [(path, WebhookResource(self.settings, http.auth, http.limits, http.inbox,
                                         http.stopping, http.waits, http.handover, http.gate)),
                  (path + "/messages/{message_id}",
                   MessageResource(self.settings, http.auth, http.store, http.handover,
                                   http.gate, self.name, http.waits))]
        if self.settings.webhook.chat_page:
            routes += [(page, ChatPage(self.settings, page)) for page in ChatPage.ASSETS]
        return routes

    def openapi(self):
        return webhook_openapi(self.settings)

    def delivers(self):
        return self.settings.async_mode

    def send(self, row):
        url = self.settings.webhook.outbound_url
        if not url:
            raise SendLater("no outbound URL is configured")
        body = row["body"].encode()
        status, headers, _ = http_post(url, body, self.headers(row["message_id"], body),
                                       self.settings.webhook.callback_timeout)
        return status, headers, url_host(url)

    def headers(self, message_id, body):
        webhook = self.settings.webhook
        # A receiver of callbacks need not hold the secret that lets anyone post
        # as any user: webhook_outbound_secret, when set, is used instead.
        secret = self.vault.get(OUTBOUND_SECRET_NAME) or self.vault.get(SECRET_NAME) or ""
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "webhook-id": message_id}
        if webhook.auth_type == "bearer":
            headers["Authorization"] = "Bearer " + secret
        elif webhook.auth_type == "basic":
            token = base64.b64encode(f"{webhook.auth_user}:{secret}".encode()).decode()
            headers["Authorization"] = "Basic " + token
        if webhook.sign:
            timestamp = str(int(self.clock()))
            headers["webhook-timestamp"] = timestamp
            headers["webhook-signature"] = sign_payload(secret, message_id, timestamp, body)
        return headers

    def describe(self):
        webhook = self.settings.webhook
        mode = (f"async, callbacks to {url_host(webhook.outbound_url)} "
                f"({webhook.auth_type} auth)" if self.settings.async_mode else "sync")
        return f"webhook at {webhook.path} ({mode})"


# === Channel: Twilio (SMS and WhatsApp) =====================================

def twilio_signature(token, url, params):
    """X-Twilio-Signature: base64 HMAC-SHA1, keyed with the Auth Token, of the
    URL Twilio called followed by each POST parameter's name and value, sorted
    by name (a repeated name's values sorted, duplicates once, as Twilio's own
    RequestValidator does)."""
    values = {}
    for name, value in params:
        values.setdefault(name, set()).add(value)
    text = url + "".join(name + value for name in sorted(values)
                         for value in sorted(values[name]))
    digest = hmac.new(token.encode(), text.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def twilio_url_variants(url):
    """The URL with and without its scheme's default port: Twilio signs
    either (its RequestValidator accepts both)."""
    parts = urllib.parse.urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:
        return [url]
    if port not in (None, default):
        return [url]
    bare = parts._replace(netloc=host).geturl()
    return [bare, parts._replace(netloc=f"{host}:{default}").geturl()]


TWILIO_MAX_CHARS = 1600  # Twilio refuses a longer message body (error 21617)
SENTENCE_END = re.compile(r"[.!?…](?=\s)|\n")


def split_reply(text, limit=TWILIO_MAX_CHARS):
    """A reply as the messages that carry it: one if it fits, else parts
    numbered "(1/3) ", cut at a sentence end, else between words."""
    text = text.strip()
    if len(text) <= limit:
        return [text]
    count = 2
    while True:
        room = limit - len(f"({count}/{count}) ")
        chunks = chunk_text(text, room)
        if len(chunks) <= count:
            return [f"({i}/{len(chunks)}) {chunk}" for i, chunk in enumerate(chunks, 1)]
        count = len(chunks)


def chunk_text(text, size):
    chunks = []
    while len(text) > size:
        ends = [m.end() for m in SENTENCE_END.finditer(text, 0, size + 1) if m.end() <= size]
        cut = ends[-1] if ends and ends[-1] >= size // 2 else 0
        if not cut:
            spaces = [m.start() for m in re.finditer(r"\s", text[:size + 1])]
            cut = spaces[-1] if spaces and spaces[-1] > 0 else size
        chunks.append(text[:cut].strip())
        text = text[cut:].strip()
    return chunks + [text] if text else chunks


XML_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def twiml(messages=()):
    """A TwiML answer: each text a <Message>; none is an empty <Response/>."""
    def escape(text):
        text = XML_FORBIDDEN.sub("", text)
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    inner = "".join(f"<Message>{escape(text)}</Message>" for text in messages)
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            + (f"<Response>{inner}</Response>" if inner else "<Response/>"))


def twilio_reply_parts(result, error_reply):
    """What a finished turn says to the texter: its reply, or the apology."""
    return split_reply(error_reply if "error" in result else result["reply"])


def twilio_outgoing(request, result, error_reply):
    """The outbox entry of a reply sent later through the Messages API: to
    the texter, from the number they wrote to, in parts, none sent yet."""
    return {"message_id": result["message_id"], "to": request["reply_to"],
            "from": request["metadata"]["to"], "parts": twilio_reply_parts(result, error_reply),
            "sent": 0}


TWILIO_API_TIMEOUT = 15.0  # seconds one Messages API request may take


class TwilioMessages:
    """Twilio's Messages REST API: one message, one form POST, basic auth
    with the Account SID and the vault's Auth Token."""

    def __init__(self, settings, vault):
        self.settings = settings
        self.vault = vault

    def send(self, to, sender, text):
        """(status, headers, body) of one POST; raises OSError when no answer came."""
        twilio = self.settings.twilio
        url = f"{twilio.api_base}/2010-04-01/Accounts/{twilio.account_sid}/Messages.json"
        token = self.vault.get(TWILIO_TOKEN_NAME) or ""
        credentials = base64.b64encode(f"{twilio.account_sid}:{token}".encode()).decode()
        body = urllib.parse.urlencode({"To": to, "From": sender, "Body": text}).encode()
        headers = {"Authorization": "Basic " + credentials, "User-Agent": USER_AGENT,
                   "Content-Type": "application/x-www-form-urlencoded"}
        return http_post(url, body, headers, TWILIO_API_TIMEOUT)


TWILIO_USERS = "twilio" + CHANNEL_USER  # a texter's user_id: history, memories, keys

TWILIO_REQUIRED_FIELDS = ("MessageSid", "From", "To", "Body")  # in every message Twilio posts
# Twilio's own posts are a few kB in well under a hundred fields; anything larger
# is refused before it is parsed or signed (a 1 MiB form cost 250 ms of CPU).
TWILIO_FORM_MAX_BYTES, TWILIO_FORM_MAX_FIELDS = 65536, 200
# SIDs as Twilio documents them: two letters naming the kind, 32 hex digits. A
# MessageSid is the idempotency key: a captured form re-split so that it
# absorbs the next field (the signature joins names and values with nothing
# between) is refused, not run again under a new key.
TWILIO_SID_PATTERNS = {"MessageSid": "^(SM|MM)[0-9a-fA-F]{32}$",
                       "SmsSid": "^(SM|MM)[0-9a-fA-F]{32}$",
                       "SmsMessageSid": "^(SM|MM)[0-9a-fA-F]{32}$",
                       "AccountSid": "^AC[0-9a-fA-F]{32}$",
                       "MessagingServiceSid": "^MG[0-9a-fA-F]{32}$"}


def twilio_form_too_large(limit):
    return ApiError(413, f"the form is larger than {limit} bytes: not a message as Twilio "
                         "posts it")
TWILIO_LOCATION_FIELDS = ("FromCity", "FromState", "FromZip", "FromCountry")
# Fields Twilio also posts; the signature covers them, nothing else reads them.
TWILIO_SIGNED_ONLY_FIELDS = ("AccountSid", "MessagingServiceSid", "SmsSid", "SmsMessageSid",
                             "SmsStatus", "NumSegments", "ApiVersion", "ToCity", "ToState",
                             "ToZip", "ToCountry", "WaId", "ProfileName")


class TwilioResource:
    """POST [channels.twilio] path: an SMS or WhatsApp message as Twilio posts
    it (a form, signed with X-Twilio-Signature). The reply goes back as TwiML
    when the turn is done within reply_wait; after that an empty <Response/>
    answers at once and the reply follows through the Messages API (outbox).
    MessageSid is the idempotency key: Twilio's retries never run a turn twice."""

    def __init__(self, settings, auth, vault, limits, inbox, stopping, waits):
        self.settings = settings
        self.auth = auth
        self.vault = vault
        self.limits = limits
        self.inbox = inbox
        self.stopping = stopping
        self.waits = waits

    def on_post(self, req, resp):
        if self.stopping.is_set():
            raise shutting_down()
        self.auth.refuse_blocked(req)  # before reading, parsing and signing the form
        limit = min(self.settings.server.max_body_bytes, TWILIO_FORM_MAX_BYTES)
        if req.content_length is not None and req.content_length > limit:
            raise twilio_form_too_large(limit)
        media = (req.content_type or "").split(";")[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            raise ApiError(415, "send the form Twilio sends: "
                                "Content-Type: application/x-www-form-urlencoded")
        raw = req.bounded_stream.read(limit + 1)
        if len(raw) > limit:
            raise twilio_form_too_large(limit)
        if raw.count(b"&") >= TWILIO_FORM_MAX_FIELDS:
            raise ApiError(413, f"the form has more than {TWILIO_FORM_MAX_FIELDS} fields: not "
                                "a message as Twilio posts it")
        try:
            params = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                                            errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "the form is not valid UTF-8") from None
        self.verify(req, params)
        form = dict(params)
        request = validate_message(self.message(form))
        request["reply_to"] = request["user_id"]  # the number; the model is not shown it
        request["user_id"] = TWILIO_USERS + request["user_id"]
        self.limits.check(request["user_id"])
        twilio = self.settings.twilio
        # Twilio's 15 s run from its request, not from here: time spent queued,
        # reading and committing counts against reply_wait.
        spent = time.monotonic() - getattr(req.context, "started", time.monotonic())
        address = self.auth.client_group(req)
        with self.waits.slot(request["user_id"], address) as over:
            if over:  # the reply goes through the Messages API
                resp.set_header(WaitLimits.HEADER, over)
            status, body, replayed = self.inbox.accept(
                request, form["MessageSid"], channel="twilio", key_field="MessageSid",
                wait=0.0 if over else max(0.0, twilio.reply_wait - spent))
        if status == 200:
            texts = twilio_reply_parts(body, twilio.error_reply)
        elif status == 202:  # the reply comes through the Messages API (or came already)
            texts = []
        else:  # the turn failed; the worker logged why
            texts = twilio_reply_parts({"error": body}, twilio.error_reply)
        resp.content_type = "text/xml"
        resp.text = twiml(texts)
        if replayed:
            resp.set_header("Idempotent-Replayed", "true")

    def verify(self, req, params):
        """403 unless X-Twilio-Signature signs the URL Twilio called and the
        form, keyed with the Auth Token (compared in constant time)."""
        given = req.get_header("X-Twilio-Signature") or ""
        token = self.vault.get(TWILIO_TOKEN_NAME)
        url = self.signed_url(req)
        if given and token and any(
                hmac.compare_digest(given.encode(), twilio_signature(token, u, params).encode())
                for u in twilio_url_variants(url)):
            return
        why = ("no X-Twilio-Signature header" if not given else
               f"no {TWILIO_TOKEN_NAME} in the vault" if not token else "wrong X-Twilio-Signature")
        error = self.auth.failed(req, f"{why}; checked against URL {url_without_query(url)} "
                                      "(if Twilio calls another URL, set [channels.twilio] "
                                      "public_url to it)")
        if error.status == 401:
            error = ApiError(403, "missing or wrong X-Twilio-Signature")
        raise error

    def signed_url(self, req):
        """The URL Twilio signed: [channels.twilio] public_url, else this
        request's own, as a trusted proxy says the sender called it."""
        public = self.settings.twilio.public_url
        if public:
            return public
        scheme, host = req.scheme, req.get_header("Host") or req.netloc
        trusted = self.settings.server.trusted_proxies
        if trusted and ip_in(req.remote_addr or "", trusted):
            first = lambda name: (req.get_header(name) or "").split(",")[0].strip()  # noqa: E731
            scheme = first("X-Forwarded-Proto").lower() or scheme
            host = first("X-Forwarded-Host") or host
        target = req.env.get("REQUEST_URI") or req.relative_uri
        if not target.startswith("/"):  # an absolute-form request target
            parts = urllib.parse.urlsplit(target)
            target = parts.path + ("?" + parts.query if parts.query else "")
        return f"{scheme}://{host}{target}"

    @staticmethod
    def message(form):
        """Twilio's form -> the message the agent gets: 400 without a field
        Twilio always sends, 422 naming the form's field when one is invalid
        (so validate_message finds nothing left to refuse)."""
        for name in TWILIO_REQUIRED_FIELDS:
            if name not in form:
                raise ApiError(400, f"{name} is missing: not a message as Twilio posts it",
                               field=name)
        sender, sid = form["From"], form["MessageSid"]
        if not sender.strip() or len(sender) > USER_ID_MAX or has_control_characters(sender):
            raise ApiError(422, f"From must be 1 to {USER_ID_MAX} characters, not blank, no "
                                "control characters", field="From")
        if not form["To"].strip():  # a reply sent later goes from it
            raise ApiError(422, "To is blank", field="To")
        for name, pattern in TWILIO_SID_PATTERNS.items():
            if name in form and not re.fullmatch(pattern, form[name]):
                raise ApiError(422, f"{name} is not a Twilio SID (two letters and 32 hex "
                                    f"digits: {pattern})", field=name)
        count = form.get("NumMedia", "0")
        if not (re.fullmatch(r"[0-9]{1,9}", count) and int(count) <= ATTACHMENTS_MAX):
            raise ApiError(422, f"NumMedia must be a number from 0 to {ATTACHMENTS_MAX}",
                           field="NumMedia")
        for i in range(ATTACHMENTS_MAX):  # each one given, used or not, as published
            if f"MediaUrl{i}" in form and not is_attachment_url(form[f"MediaUrl{i}"]):
                raise ApiError(422, f"MediaUrl{i} must be an http(s) URL", field=f"MediaUrl{i}")
        metadata = {"platform": "twilio-whatsapp" if sender.startswith("whatsapp:")
                    else "twilio-sms", "to": form["To"], "message_sid": sid}
        for field in TWILIO_LOCATION_FIELDS:
            if form.get(field):
                metadata["from_" + field[4:].lower()] = form[field]
        attachments = [{"url": form[f"MediaUrl{i}"], "type": form.get(f"MediaContentType{i}")}
                       for i in range(int(count)) if f"MediaUrl{i}" in form]
        text = form["Body"]
        message = {"user_id": sender, "metadata": metadata,
                   "message": text if text.strip() else "(no text)"}
        if attachments:
            message["attachments"] = attachments
        return message


def twilio_openapi(settings):
    """The twilio channel's route: the form Twilio posts (the fields
    TwilioResource reads, with its limits), the signature, and every answer
    it gives."""
    twilio = settings.twilio
    string, retry_after = OPENAPI_STRING, OPENAPI_RETRY_AFTER
    error = openapi_ref("schemas", "Error")

    def failure(code, meaning, headers=None):
        return {"description": f"{HTTPStatus(code).phrase}: {meaning}",
                "content": {"application/json": {"schema": error}},
                **({"headers": headers} if headers else {})}

    def field(text, **schema):
        return dict({"type": "string", "description": text}, **schema)

    fields = {
        "MessageSid": field("the idempotency key: Twilio's retries of a message run one turn",
                            pattern=TWILIO_SID_PATTERNS["MessageSid"]),
        "From": field("the sender, the user_id (+34600111222, whatsapp:+34600111222)",
                      minLength=1, maxLength=USER_ID_MAX, pattern=USER_ID_PATTERN),
        "To": field("the number written to; a reply sent later goes from it",
                    minLength=1, pattern=NOT_BLANK),
        "Body": field("the text; may be empty when media come"),
        "NumMedia": {"type": "integer", "minimum": 0, "maximum": ATTACHMENTS_MAX,
                     "description": "how many MediaUrl{i} (from 0) are attachments; "
                                    "absent: none"}}
    for name in TWILIO_LOCATION_FIELDS:
        fields[name] = field(f"metadata from_{name[4:].lower()}, when not empty")
    for i in range(ATTACHMENTS_MAX):
        fields[f"MediaUrl{i}"] = field(f"attachment {i} when i < NumMedia",
                                       pattern=ATTACHMENT_URL_PATTERN)
        fields[f"MediaContentType{i}"] = field(f"attachment {i}'s media type")
    for name in TWILIO_SIGNED_ONLY_FIELDS:
        fields[name] = field("signed, otherwise unused",
                             **({"pattern": TWILIO_SID_PATTERNS[name]}
                                if name in TWILIO_SID_PATTERNS else {}))
    form = {"type": "object", "required": list(TWILIO_REQUIRED_FIELDS), "properties": fields,
            "additionalProperties": string,
            "description": "Twilio's inbound message webhook. Twilio adds fields without "
                           "notice: every field is signed, unknown ones are ignored."}
    twiml_answer = {
        "description": "TwiML: the reply in <Message> elements (parts of at most "
                       f"{TWILIO_MAX_CHARS} characters) if the turn is done within "
                       f"{twilio.reply_wait:g} s ([channels.twilio] reply_wait), or "
                       "[channels.twilio] error_reply if it failed; else an empty "
                       "<Response/> at once and the reply follows through the Messages API",
        "content": {"text/xml": {"schema": string}},
        "headers": dict(OPENAPI_WAIT_LIMITED, **{
            "Idempotent-Replayed": {"schema": {"const": "true"},
                                    "description": "a retry of a MessageSid"}})}
    post = {
        "operationId": "twilioMessage", "summary": "An SMS or WhatsApp message from Twilio",
        "security": [{"twilioSignature": []}],
        "requestBody": {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": form}}},
        "responses": {
            "200": twiml_answer,
            "400": failure(400, "the body is not a UTF-8 form, or a required field is missing"),
            "403": failure(403, "missing or wrong X-Twilio-Signature"),
            "413": failure(413, f"the form is larger than {TWILIO_FORM_MAX_BYTES} bytes (or "
                                "[server] max_body_bytes), or has more than "
                                f"{TWILIO_FORM_MAX_FIELDS} fields"),
            "415": failure(415, "the Content-Type is not application/x-www-form-urlencoded"),
            "422": failure(422, "a field is invalid (`field` names it; a SID not as Twilio "
                                "makes them), or the MessageSid was used for another message"),
            "429": failure(429, "a rate limit ([limits]) was reached, or this address sent "
                                "wrong signatures too often (Retry-After)", retry_after),
            "500": failure(500, "a bug; the daemon's log has the traceback"),
            "503": failure(503, "shutting down, queue full ([delivery] max_pending), or the "
                                "database not writable (Retry-After)", retry_after)}}
    scheme = {"type": "apiKey", "in": "header", "name": "X-Twilio-Signature",
              "description": f"base64 HMAC-SHA1, keyed with the vault's {TWILIO_TOKEN_NAME}, "
                             "of the URL Twilio called ([channels.twilio] public_url, else "
                             "the request's) and each form field's name and value, sorted by "
                             "name"}
    return {"paths": {twilio.path: {"post": post}},
            "components": {"securitySchemes": {"twilioSignature": scheme}}}


class TwilioChannel(Channel):
    """Twilio's inbound message webhook (a signed form) at [channels.twilio]
    path; the reply as TwiML within reply_wait, else later through the
    account's Messages API, one POST per part, in order, with the outbox's
    retries."""

    name = "twilio"
    send_setting = "[channels.twilio] api_base"

    def __init__(self, settings, vault, store, clock=time.time):
        super().__init__(settings, vault, store, clock)
        self.messages = TwilioMessages(settings, vault)

    def routes(self, http):
        return [(self.settings.twilio.path,
                 TwilioResource(self.settings, http.auth, self.vault, http.limits, http.inbox,
                                http.stopping, http.waits))]

    def openapi(self):
        return twilio_openapi(self.settings)

    def delivers(self):
        return True  # a reply its waiting request did not take goes out

    def outgoing(self, request, body):
        return twilio_outgoing(request, body, self.settings.twilio.error_reply)

    def send(self, row):
        """The parts not sent yet, in order; each one sent is recorded, so a
        failure resumes at the first unsent part and none goes twice."""
        outgoing = json.loads(row["body"])
        parts = outgoing["parts"]
        while True:
            status, headers, _ = self.messages.send(outgoing["to"], outgoing["from"],
                                                    parts[outgoing["sent"]])
            if not 200 <= status < 300 or outgoing["sent"] + 1 == len(parts):
                break
            outgoing["sent"] += 1
            self.store.delivery_progress(row["seq"], outgoing)
        where = "Twilio's Messages API"
        if len(parts) > 1:
            where += f" (part {outgoing['sent'] + 1} of {len(parts)})"
        return status, headers, where

    def describe(self):
        twilio = self.settings.twilio
        checked = (url_without_query(twilio.public_url) if twilio.public_url
                   else "the URL each request was sent to")
        return f"twilio at {twilio.path} (signatures checked against {checked})"


# === Wiring: every part built once ==========================================

CHANNELS = (WebhookChannel, TwilioChannel)  # each with its [channels.NAME] in CONFIG_SCHEMA


def build_channels(settings, vault, store, clock=time.time):
    """Every channel, active or not: a reply queued by one still goes out after
    a restart that turned it off. Only the active ones get routes."""
    return {cls.name: cls(settings, vault, store, clock) for cls in CHANNELS}


class Butler:
    """Every working part, built and wired together once: the only place that
    knows them all. The daemon and the tests use it; nothing reads globals."""

    def __init__(self, config, vault, store):
        self.settings = settings = Settings(config)
        self.vault = vault
        self.store = store
        self.metrics = metrics = Metrics()
        self.stopping = threading.Event()
        self.channels = build_channels(settings, vault, store)
        self.dispatcher = CallbackDispatcher(settings, store, metrics, self.channels)
        self.tools = build_tools(settings.tools, metrics, self.dispatcher.queue_notification
                                 if settings.async_mode else None)
        self.agent = Agent(build_model(settings.agent, vault), self.tools, store, settings,
                           metrics)
        self.gate = TurnGate(settings, lambda: isinstance(self.agent.model, HTTPModel))
        store.parked = self.gate.parked
        self.handover = Handover()
        self.workers = TurnWorkers(settings, store, self.agent, self.gate, self.dispatcher,
                                   self.handover, self.channels)
        self.inbox = Inbox(settings, store, self.agent, self.gate, self.workers, self.handover)
        self.auth = Authenticator(settings, vault, store, metrics)
        self.limits = Limits(settings, metrics)
        self.waits = WaitLimits(settings, metrics)
        metrics.gauge("aibutler_queue_depth", store.pending_jobs)
        metrics.gauge("aibutler_auth_tracked_addresses", self.auth.tracked_addresses)
        metrics.gauge("aibutler_deliveries_pending",
                      lambda: store.delivery_counts().get("pending", 0))
        metrics.gauge("aibutler_turns_running", lambda: self.gate.running)
        metrics.gauge("aibutler_turns_waiting", self.gate.waiting)
        metrics.gauge("aibutler_requests_waiting",
                      lambda: self.handover.waiting + self.inbox.waiting)
        self._started = False

    def active_channels(self):
        return [channel for name, channel in self.channels.items()
                if self.settings.channel_active(name)]

    def app(self):
        http = types.SimpleNamespace(  # what the channels' resources are built from
            auth=self.auth, limits=self.limits, inbox=self.inbox, stopping=self.stopping,
            store=self.store, handover=self.handover, gate=self.gate, waits=self.waits)
        return create_app(self.settings, http, self.metrics, self.readiness,
                          self.active_channels())

    def start(self):
        self.store.checkpoint_in_background()
        jobs, sends = self.store.recover()
        if jobs or sends:
            log.info("recovered from the last run: %d turn(s) to run, %d callback(s) to send",
                     jobs, sends)
        self.workers.start()
        self.dispatcher.start()
        self._started = True

    def stop(self, deadline):
        self.stopping.set()
        if self._started:
            self.workers.stop(deadline)
            self.dispatcher.stop(deadline, drain=True)  # send the replies just made
            self._started = False

    def wedged_after(self):
        """An item in hand longer than this means its thread is stuck."""
        return turn_time_limit(self.settings) + self.settings.webhook.callback_timeout

    def readiness(self):
        limit = self.wedged_after()
        return {"workers": self.workers.healthy(limit),
                "dispatchers": self.dispatcher.healthy(limit),
                "queue": self.store.pending_jobs() < self.settings.delivery.max_pending,
                "storage": self.store.writable()}

    def reload(self, config):
        """Apply a re-read config file (SIGHUP): one swap that every part reads
        through, and a model built from the new [agent] section."""
        if config.async_mode != self.settings.async_mode:  # half a switch loses callbacks
            log.warning("config: switching between sync and async mode needs a restart; "
                        "keeping [channels.webhook] outbound_url as it was")
            config.webhook.outbound_url = self.settings.webhook.outbound_url
        self.settings.config = config
        self.agent.model = build_model(config.agent, self.vault)
        self.gate.regrant()


# === Serving: waitress, signals, systemd notify and watchdog ================

def sd_notify(message, env=None):
    """Send one sd_notify datagram; do nothing outside systemd."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.send(message.encode(), socket.MSG_DONTWAIT)  # never block the daemon on it
        return True
    except OSError as exc:
        log.warning("systemd notify failed: %s", exc)
        return False


class Watchdog:
    """systemd's view of the daemon: a status line, and WATCHDOG=1 only while
    every part is alive and the HTTP loop beats, so systemd restarts a wedged
    daemon. A full queue or a full disk are not for a restart to fix."""

    LOOP_STUCK_AFTER = 30.0  # seconds without a beat of the HTTP loop

    def __init__(self, readiness, store, env, loop_beat):
        self.readiness = readiness  # () -> {check: bool}
        self.store = store
        self.env = env
        self.loop_beat = loop_beat  # () -> time.monotonic() of the loop's last turn
        self.address = None
        self._unhealthy = False

    @property
    def interval(self):
        """Half of WATCHDOG_USEC, in seconds, when systemd watches this process."""
        usec, pid = self.env.get("WATCHDOG_USEC"), self.env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6

    def tick(self):
        """One health check: WATCHDOG=1 and a status line, or, when something is
        wedged or dead, no WATCHDOG=1 so systemd restarts the service."""
        problems = self.problems()
        if problems:
            if not self._unhealthy:
                log.error("watchdog: not feeding systemd: %s", "; ".join(problems))
            self._unhealthy = True
            sd_notify("STATUS=unhealthy: " + "; ".join(problems), self.env)
            return False
        if self._unhealthy:
            log.info("watchdog: healthy again")
        self._unhealthy = False
        status = "STATUS=" + self.status_text()
        sd_notify(("WATCHDOG=1\n" + status) if self.interval else status, self.env)
        return True

    def status_text(self):
        counts = self.store.delivery_counts()
        return (f"serving on {self.address}; {self.store.pending_jobs()} message(s) queued, "
                f"{counts.get('pending', 0) + counts.get('sending', 0)} callback(s) pending, "
                f"{counts.get('failed', 0)} failed")

    def problems(self):
        found = [name + " not healthy" for name, ok in self.readiness().items()
                 if not ok and name not in ("queue", "storage")]  # a restart fixes neither
        if time.monotonic() - self.loop_beat() > self.LOOP_STUCK_AFTER:
            found.append("the HTTP server loop is stuck")
        return found


def c_library():
    """glibc's malloc controls, or None (musl, macOS, a Python without ctypes)."""
    try:
        import ctypes  # here: only serving needs it
        libc = ctypes.CDLL(None)
    except (ImportError, OSError) as exc:
        log.debug("memory: no C library calls (%s); memory is left to it", exc)
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


M_ARENA_MAX = -8  # from glibc's malloc.h
MALLOC_ARENAS = 2  # glibc's default is 8 per core, each keeping what its threads freed

class Maintenance:
    """A background thread: a watchdog tick every few seconds under systemd
    (elsewhere /readyz tells the same, on demand), and storage pruned hourly so
    the file does not grow on a device left alone for months."""

    TICK_EVERY = 10.0    # seconds, at most (less when systemd's watchdog asks)
    PRUNE_EVERY = 3600.0

    def __init__(self, store, settings, watchdog, env):
        self.store = store
        self.settings = settings
        self.watchdog = watchdog
        self.under_systemd = bool(env.get("NOTIFY_SOCKET"))

    def start(self, stopped):
        threading.Thread(target=self._run, args=(stopped,), name="maintenance",
                         daemon=True).start()

    def _run(self, stopped):
        interval = min(self.watchdog.interval or self.TICK_EVERY, self.TICK_EVERY)
        next_prune = 0.0
        while not stopped.wait(interval):
            try:
                if self.under_systemd:
                    self.watchdog.tick()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self.PRUNE_EVERY
                    self.store.prune(self.settings.delivery.idempotency_ttl,
                                     self.settings.sessions.max_history)
            except sqlite3.Error as exc:  # no tick this time (systemd notices); go on
                log.error("maintenance: the database failed: %s", one_line(exc))


# What this part uses of waitress beyond create_server() and run(), by the
# object that has it; tests/test_layout.py fails when one disappears. CI runs
# waitress 2.1 (Debian bookworm) and the newest 3.x (pip).
WAITRESS_INTERNALS = {
    "server": ("_map", "asyncore", "channel_class", "task_dispatcher", "trigger", "accepting",
               "pull_trigger", "effective_host", "effective_port"),
    "server.asyncore": ("loop", "dispatcher"),
    "server.task_dispatcher": ("set_thread_count", "threads", "stop_count", "shutdown"),
    "channel": ("requests", "request", "will_close", "addr", "total_outbufs_len",
                "outbuf_lock", "writable", "write_soon", "close_when_flushed",
                "last_activity", "handle_close"),
    "channel.request": ("headers_finished",),
}


class Daemon:
    """Serve the app with waitress until SIGTERM/SIGINT (SIGHUP: reload), then
    stop gracefully: stop accepting, let in-flight requests, turns and callbacks
    finish up to [server] shutdown_timeout, keep the rest in sqlite for the next
    start.

    waitress has no public stop API, no per-client limits and a fixed thread
    count, so the daemon runs waitress's own loop one poll at a time and uses
    the internals listed in WAITRESS_INTERNALS."""

    BODY_SLACK = 65536  # bytes waitress reads beyond max_body_bytes (headers, chunking)

    def __init__(self, config, vault, store, config_path=None, env=None):
        self.vault = vault
        self.store = store
        self.config_path = config_path
        self.env = os.environ if env is None else env
        self.butler = Butler(config, vault, store)
        self.settings = self.butler.settings
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.loop_beat = time.monotonic()
        self.watchdog = Watchdog(self.butler.readiness, store, self.env, lambda: self.loop_beat)
        self.guard = None  # a ConnectionGuard once the server exists
        self.request_threads = None  # RequestThreads, likewise
        self.inflight = 0
        self._inflight_lock = threading.Lock()

    def wsgi(self, app):
        """Count requests inside the app, so a graceful stop knows when they are done,
        and tell the turn gate which pool this thread belongs to."""
        gate = self.butler.gate

        def tracked(environ, start_response):
            gate.pools.pool = self.request_threads
            with self._inflight_lock:
                self.inflight += 1
            try:
                return app(environ, start_response)
            finally:
                with self._inflight_lock:
                    self.inflight -= 1
        return tracked

    def run(self):
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # no "Task queue depth" floods
        if ensure_webhook_secret(self.vault):
            log.warning("webhook: no %s was set, so a new one was generated and stored in the "
                        "vault. Print it with: %s", SECRET_NAME, command_hint(
                            os.path.dirname(self.vault.path), "vault", "get", SECRET_NAME,
                            env=self.env))
        ensure_webhook_secret(self.vault, TOKEN_SECRET_NAME)  # per-user tokens need a key
        server_cfg = self.settings.server
        try:
            # X-Forwarded-* reach the app, which believes them only from
            # [server] trusted_proxies (waitress's own option takes one address).
            server = waitress.create_server(
                self.wsgi(self.butler.app()), host=server_cfg.host,
                port=server_cfg.port, threads=server_cfg.threads,
                connection_limit=server_cfg.connection_limit,
                channel_timeout=math.ceil(server_cfg.channel_timeout), ident="",
                clear_untrusted_proxy_headers=False,
                max_request_body_size=2 * server_cfg.max_body_bytes + self.BODY_SLACK)
        except OSError as exc:
            fix = ("free the port or set [server] port" if exc.errno == errno.EADDRINUSE
                   else "check [server] host and port")
            log.error("cannot listen on %s:%d: %s (exit %d: systemd does not restart it; "
                      "%s)", server_cfg.host, server_cfg.port, one_line(exc),
                      EXIT_CANNOT_LISTEN, fix)
            return EXIT_CANNOT_LISTEN
        self.guard = ConnectionGuard(server, lambda: self.settings.server)
        self.request_threads = RequestThreads(server.task_dispatcher, server_cfg.threads)
        for signum in (signal.SIGTERM, signal.SIGINT):  # before anyone can see us listening
            signal.signal(signum, self._on_stop_signal(server))
        signal.signal(signal.SIGHUP, self._on_reload_signal(server))
        self.butler.start()
        self._log_startup(server)
        self.watchdog.address = f"{server.effective_host}:{server.effective_port}"
        libc = c_library()
        if libc is not None:  # what importing and starting freed goes back to the system
            libc.malloc_trim(0)
        sd_notify("READY=1\nSTATUS=" + self.watchdog.status_text(), self.env)
        Maintenance(self.store, self.settings, self.watchdog, self.env).start(
            self.stop_requested)
        self._serve(server)
        self._shutdown(server)
        return EXIT_OK

    def _log_startup(self, server):
        settings = self.settings
        host = server.effective_host
        log.info("aibutler %s listening on http://%s:%s", __version__,
                 f"[{host}]" if ":" in str(host) else host, server.effective_port)
        model = self.butler.agent.model
        log.info("agent: provider %s%s", settings.agent.provider,
                 f", model {model.model} at {url_host(model.base_url)}"
                 if isinstance(model, HTTPModel) else " (offline, no language model)")
        active = self.butler.active_channels()
        for channel in active:
            log.info("channels: %s", channel.describe())
        if not active:
            log.info("channels: none active (enable [channels.webhook])")
        offered = set(self.butler.tools.tools)
        log.info("tools: %s", ", ".join(spec.name + (" (online)" if spec.online else "")
                                        for spec in TOOLS if spec.name in offered) or "none")
        if "webhook_send" in offered:
            log.info("webhook: tools registered (webhook_send)")
        for warning in settings.warnings:
            log.warning("config: %s", warning)

    def _on_stop_signal(self, server):
        def handler(signum, frame):
            if not self.stop_requested.is_set():
                self.stop_requested.set()
                server.pull_trigger()
                log.info("received %s; stopping", signal.Signals(signum).name)
        return handler

    def _on_reload_signal(self, server):
        def handler(signum, frame):
            self.reload_requested.set()
            server.pull_trigger()
        return handler

    @staticmethod
    def _poll(server, timeout):
        server.asyncore.loop(timeout=timeout, map=server._map, use_poll=True, count=1)

    def _serve(self, server):
        """waitress's own loop, one poll at a time, so a stop can be graceful."""
        next_sweep = 0.0
        while not self.stop_requested.is_set():
            self._poll(server, 1.0)
            self.loop_beat = now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + ConnectionGuard.SWEEP_EVERY
                self.guard.sweep(now)
                self.request_threads.shrink()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self._reload()

    def _reload(self):
        try:
            config = load_config(self.config_path, self.env)
        except ConfigError as exc:
            log.error("reload: %s; keeping the running config", exc)
            return
        for key in ("host", "port"):  # bound at start (and maybe given as --host, --port)
            setattr(config.server, key, getattr(self.settings.server, key))
        changed = config_changes(self.settings.config, config)
        self.butler.reload(config)
        logging.getLogger().setLevel(config.server.log_level.upper())
        log.info("reload: config re-read from %s; %s", config.source or "defaults",
                 "changed: " + ", ".join(changed) if changed else "nothing changed")

    def _shutdown(self, server):
        sd_notify("STOPPING=1\nSTATUS=stopping", self.env)
        deadline = time.monotonic() + self.settings.server.shutdown_timeout
        self.butler.stopping.set()
        self.butler.handover.release()  # long polls and Prefer waits answer now
        server.accepting = False
        # Stop listening (new connections are refused, not left hanging), but keep
        # waitress's trigger: requests still running pull it when they are done.
        server.asyncore.dispatcher.close(server)
        while time.monotonic() < deadline and (self.inflight or pending_output(server)):
            self._poll(server, 0.05)
        self.request_threads.close()
        self.butler.stop(deadline)
        server.task_dispatcher.shutdown(timeout=max(0.1, deadline - time.monotonic()))
        server.trigger.close()
        self.store.close()
        log.info("stopped")


class RequestThreads:
    """waitress's request threads: [server] threads of them free for requests,
    plus one more for each thread parked (at the turn gate, on a model server,
    on a slow disk), started when it parks. Spares end when the most needed
    during the last SHRINK_AFTER seconds is less than there are, so a steady
    load does not start and end a thread per request."""

    SHRINK_AFTER = 5.0  # seconds

    def __init__(self, dispatcher, free, clock=time.monotonic):
        self.dispatcher = dispatcher  # waitress's ThreadedTaskDispatcher
        self.free = free
        self.clock = clock
        self.parked = 0
        self.size = free
        self._peak = free  # the most needed since _since
        self._since = clock()
        self._lock = threading.Lock()
        self._closed = False

    def park(self):
        with self._lock:
            self.parked += 1
            self._peak = max(self._peak, self.free + self.parked)
            if self._peak > self.size and not self._closed:
                try:
                    self.dispatcher.set_thread_count(self._peak)
                except RuntimeError as exc:  # "can't start new thread": out of memory
                    log.warning("request threads: no spare thread: %s", exc)
                self.size = len(self.dispatcher.threads) - self.dispatcher.stop_count

    def unpark(self):
        with self._lock:
            self.parked -= 1

    def shrink(self):
        """Called now and then (waitress's loop thread): end spares not needed lately."""
        with self._lock:
            if self.clock() - self._since < self.SHRINK_AFTER:
                return
            if self._peak < self.size and not self._closed:
                self.size = self._peak
                self.dispatcher.set_thread_count(self.size)
            self._peak, self._since = self.free + self.parked, self.clock()

    def close(self):
        """Stopping: waitress's shutdown sets the thread count from now on."""
        with self._lock:
            self._closed = True


def quiet_channel_class(channel_class):
    """waitress's channel, minus a busy loop: while a request thread holds a
    connection's output lock (writing its answer), waitress's loop keeps
    asking to write, finds the lock taken, and polls again at once, and again,
    taking the GIL from the very thread it waits for. The thread wakes the loop
    when it leaves output behind (waitress pulls its trigger), so the loop need
    not ask meanwhile."""
    class QuietChannel(channel_class):
        client = ""  # the client it is counted under (ConnectionGuard.admit)

        def writable(self):
            if self.requests and self.total_outbufs_len and not self.will_close:
                if not self.outbuf_lock.acquire(blocking=False):
                    return False
                self.outbuf_lock.release()
            return super().writable()
    return QuietChannel


class ConnectionGuard:
    """What waitress lacks against slow, wide or greedy clients, so that none
    can take the service down. Connections not waiting for an answer (sending
    a request, or idle between requests) are bounded: at most [server]
    client_connection_limit per client (an IPv4 address, an IPv6 /64; trusted
    proxies exempt), and at most idle_connection_limit in all, past which a new
    connection closes the quietest one, so probes and senders always get in.
    A request's headers must arrive within header_timeout and the whole request
    within request_timeout, else 408 and the connection closes (waitress's
    channel_timeout only counts silence, which a client trickling a byte every
    few seconds never keeps). Runs in waitress's loop thread, the only one that
    touches channels; WAITRESS_INTERNALS lists what it reads and calls."""

    SWEEP_EVERY = 1.0  # seconds between looks at half-received requests
    WARN_EVERY = 60.0  # seconds between log lines about refused connections

    def __init__(self, server, settings):
        self.server = server
        self.settings = settings  # () -> the [server] section in force
        self._channel_class = quiet_channel_class(server.channel_class)
        server.channel_class = self.admit  # waitress calls it for each accepted socket
        self._seen = {}  # channel -> (its request parser, when first seen unfinished)
        self._warned = {}  # kind of trouble -> when it was last logged

    def admit(self, server, conn, addr, adj, map=None):
        host = addr[0] if isinstance(addr, tuple) else ""
        group = address_group(host)
        settings = self.settings()
        idle = [channel for channel in list(server._map.values())
                if isinstance(channel, self._channel_class) and not channel.requests]
        limit = settings.client_connection_limit
        if limit and host and not ip_in(host, settings.trusted_proxies):
            open_now = sum(1 for channel in idle if channel.client == group)
            if open_now >= limit:
                conn.close()
                self._warn("greedy", f"refused a connection from {group}: it has {open_now} "
                           "open ([server] client_connection_limit)")
                return None
        if len(idle) >= settings.idle_connection_limit:
            quietest = min(idle, key=lambda channel: channel.last_activity)
            quietest.handle_close()
            self._warn("crowded", f"{len(idle)} connections were not waiting for an answer; "
                       f"closed the quietest, from {quietest.client} "
                       "([server] idle_connection_limit)")
        channel = self._channel_class(server, conn, addr, adj, map=map)
        channel.client = group
        return channel

    def sweep(self, now):
        settings = self.settings()
        seen = {}
        for channel in list(self.server._map.values()):
            request = getattr(channel, "request", None)
            if request is None or channel.close_when_flushed:
                continue
            parser, since = self._seen.get(channel, (request, now))
            if parser is not request:
                since = now
            if not request.headers_finished and now - since > settings.header_timeout:
                self._time_out(channel, f"the request's headers took over "
                                        f"{settings.header_timeout:g}s ([server] header_timeout)")
            elif now - since > settings.request_timeout:
                self._time_out(channel, f"the request took over {settings.request_timeout:g}s "
                                        "to arrive ([server] request_timeout)")
            else:
                seen[channel] = (request, since)
        self._seen = seen

    def _time_out(self, channel, why):
        """408 in the one error shape, then the connection closes."""
        body = json.dumps({"error": error_dict(408, why)}).encode()
        head = (f"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            channel.write_soon(head + body)
            channel.close_when_flushed = True
        except Exception:  # noqa: BLE001 - gone already (ClientDisconnected): just close
            channel.will_close = True
        self._warn("slow", f"closed a connection from {getattr(channel, 'client', '?')}: {why}")

    def _warn(self, kind, message):
        now = time.monotonic()
        if now - self._warned.get(kind, -math.inf) >= self.WARN_EVERY:
            self._warned[kind] = now
            log.warning("connections: %s", message)


def pending_output(server):
    """True while some connection still has a response to flush."""
    return any(getattr(channel, "total_outbufs_len", 0) or getattr(channel, "requests", None)
               for channel in list(server._map.values()))


# === Install and self-check: `install`, `uninstall`, `check` =================
#
# Offers: self_check() (one line per check, exit 0 only when none fails) and
# Installer (the systemd steps of the README, done by the program itself). Uses
# everything above; takes no lock of the daemon's. The unit is UNIT_TEXT, the
# repository's aibutler.service (tests/test_install.py holds them equal).

UNIT_TEXT = """# aibutler as a systemd service, as `sudo python3 aibutler.py install` writes it
# to /etc/systemd/system/aibutler.service (the same text: a test holds them equal).
[Unit]
Description=aibutler webhook daemon (POST JSON, get an AI agent's reply)
Documentation=file:/opt/aibutler/README.md
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
# Run as a module so Python loads the byte code that `python3 -m compileall
# /opt/aibutler` made at install: compiling the file at every start costs a Pi
# about 6 MB of memory for good (and works anyway when the .pyc is missing).
ExecStart=/usr/bin/python3 -m aibutler run --config /etc/aibutler/config.ini
# A shell's own kill: /bin/kill comes with procps, which a minimal system lacks.
ExecReload=/bin/sh -c "kill -HUP ${MAINPID}"
SyslogIdentifier=aibutler
Environment=PYTHONPATH=/opt/aibutler AIBUTLER_DATA=/var/lib/aibutler PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Optional: keep the secret outside the state directory, readable only by this
# service (systemd-creds encrypt makes it encrypted at rest):
#LoadCredential=webhook_auth_secret:/etc/aibutler/webhook_auth_secret
Restart=on-failure
RestartSec=2
# Exits a restart cannot cure, so systemd does not loop on them: 78 = bad
# configuration, 69 = the port is taken, and systemd's own failures to set the
# process up (200 CHDIR, 203 EXEC: no python3, 216 GROUP, 217 USER, 218
# CAPABILITIES, 226 NAMESPACE: a kernel without the sandboxing asked for).
RestartPreventExitStatus=78 69 200 203 216 217 218 226
WatchdogSec=30
TimeoutStopSec=30

# A dynamic, unprivileged user owning only /var/lib/aibutler.
DynamicUser=yes
StateDirectory=aibutler
StateDirectoryMode=0700
ConfigurationDirectory=aibutler
UMask=0077

# Hardening: it needs to bind its port, reach model servers and callback URLs
# over IP, and write its state directory; nothing else.
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
ProtectSystem=strict
ProtectHome=yes
ProtectClock=yes
ProtectHostname=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
DevicePolicy=closed
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""
UNIT_PATH = "/etc/systemd/system/aibutler.service"
SERVICE_DATA = "/var/lib/aibutler"  # StateDirectory=, where DynamicUser's files live
SERVICE_PYTHON = "/usr/bin/python3"  # the interpreter ExecStart= runs
DEFAULT_PREFIX, DEFAULT_CONFIG = "/opt/aibutler", "/etc/aibutler/config.ini"
APT_LINE = "sudo apt install python3-falcon python3-waitress"
READY_WITHIN = 60.0  # seconds install waits for the service's READY=1
CLOCK_EARLIEST = 1767225600  # 2026-01-01: a clock before it was never set (a Pi has no RTC)
DISK_LOW, DISK_FULL = 100 << 20, 10 << 20  # bytes free in the data directory: warn, fail
CHECK_TIMEOUT = 10.0  # seconds for each network check (the model's answer included)


def render_unit(prefix=DEFAULT_PREFIX, config=DEFAULT_CONFIG):
    return UNIT_TEXT.replace(DEFAULT_CONFIG, config).replace(DEFAULT_PREFIX, prefix)


def example_config():
    """config.ini as install writes it: every key with its default, commented
    out (config.example.ini in the repository explains each)."""
    lines = ["# aibutler configuration: uncomment and change what you need, then",
             "# `sudo systemctl reload aibutler`. Every key is shown with its default;",
             "# the README and config.example.ini explain each.", ""]
    for section, keys in CONFIG_SCHEMA.items():
        lines.append(f"[{section}]")
        lines += [f"#{key} = " + " ".join(default.split()) for key, (default, _) in keys.items()]
        lines.append("")
    return "\n".join(lines)


def self_check(config_path, env, write):
    """`check`: what `run` needs, without serving. Returns the exit code."""
    levels = []

    def report(level, what, detail):
        levels.append(level)
        write(f"{level:<4} {what}: {detail}")
    try:
        config = load_config(config_path, env)
    except ConfigError as exc:
        report("fail", "config", str(exc))
        return EXIT_CONFIG
    report("ok", "config", config.source or "no file: the built-in defaults")
    data_dir = data_dir_from_env(env)
    check_data_dir(data_dir, report)
    vault = Vault(os.path.join(data_dir, "vault.json"), env)
    check_secrets(config, vault, data_dir, env, report)
    check_port(config.server, report)
    check_model(config, vault, report)
    if config.async_mode:
        check_reachable("callbacks", config.webhook.outbound_url, report)
    if config.channel_active("twilio"):
        check_reachable("twilio", config.twilio.api_base, report)
    now = time.time()
    if now < CLOCK_EARLIEST:
        report("fail", "clock", f"it says {iso_utc(now)}; signed requests and callbacks carry "
                                "timestamps: set the time (sudo timedatectl set-ntp true)")
    else:
        report("ok", "clock", iso_utc(now))
    check_disk(data_dir, report)
    return EXIT_FAILURE if "fail" in levels else EXIT_OK


def check_data_dir(data_dir, report):
    if not os.path.lexists(data_dir):
        report("ok", "data", f"{data_dir} does not exist yet; the first start makes it")
        return
    info = os.stat(data_dir)
    if not stat.S_ISDIR(info.st_mode):
        report("fail", "data", f"{data_dir} is not a directory; move it aside")
    elif stat.S_IMODE(info.st_mode) & 0o077:
        report("warn", "data", f"{data_dir} can be read or written by other users; fix it "
                               f"with: chmod 700 {data_dir}")
    elif info.st_uid not in (os.geteuid(), 0) and os.geteuid() != 0:
        report("fail", "data", f"{data_dir} belongs to user {info.st_uid}, not to you; run "
                               "check as that user (or with sudo)")
    else:
        report("ok", "data", f"{data_dir} (owner {info.st_uid}, mode "
                             f"{stat.S_IMODE(info.st_mode):o})")


def check_secrets(config, vault, data_dir, env, report):
    source = vault.source(SECRET_NAME)
    report("ok" if source else "warn", "secret",
           f"{SECRET_NAME} from the {source}" if source else
           f"no {SECRET_NAME} yet: the first start generates one")
    agent = config.agent
    if agent.provider != "builtin":
        name = agent.api_key_name or {"openai": "openai_api_key",
                                      "anthropic": "anthropic_api_key"}[agent.provider]
        if vault.source(name):
            report("ok", "model key", f"{name} from the {vault.source(name)}")
        else:
            report("fail" if agent.provider == "anthropic" else "warn", "model key",
                   f"no {name} (a local server such as Ollama needs none); store it with: "
                   + command_hint(data_dir, "vault", "set", name, env=env))
    try:
        check_channel_secrets(config, vault, data_dir, env)
    except ConfigError as exc:
        report("fail", "channels", str(exc))


def check_port(server, report):
    where = f"{server.host}:{server.port}"
    try:
        family = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((server.host, server.port))
        report("ok", "port", f"{where} is free")
        return
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            report("fail", "port", f"cannot listen on {where}: {one_line(exc)}")
            return
    host = f"[{server.host}]" if ":" in server.host else server.host
    try:
        status, _, body = http_get(f"http://{host}:{server.port}/healthz", {}, CHECK_TIMEOUT)
        running = status == 200 and json.loads(body).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        running = False
    report("ok" if running else "fail", "port",
           f"{where} is held by the running aibutler" if running else
           f"{where} is taken by another program: free it or set [server] port")


def check_model(config, vault, report):
    agent = config.agent
    if agent.provider == "builtin":
        report("ok", "model", "builtin (offline, no language model)")
        return
    quick = types.SimpleNamespace(**dict(vars(agent), timeout=min(agent.timeout,
                                                                  CHECK_TIMEOUT)))
    model = build_model(quick, vault)
    model.MAX_ATTEMPTS = 1
    try:
        model.complete("Answer with one word.", [{"role": "user", "content": "ping"}], [])
    except ApiError as exc:
        report("fail", "model", exc.description)
        return
    report("ok", "model", f"{agent.provider} model {model.model} at {url_host(model.base_url)} "
                          "answered")


def check_reachable(what, url, report):
    """A connection (and TLS handshake) to the URL's host; nothing is sent."""
    import ssl  # only here: the HTTP client itself leaves TLS to urllib
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=CHECK_TIMEOUT) as sock:
            if parts.scheme == "https":
                ssl.create_default_context().wrap_socket(
                    sock, server_hostname=parts.hostname).close()
    except (OSError, ssl.SSLError) as exc:
        report("fail", what, f"cannot reach {url_host(url)}: {network_reason(exc)}")
        return
    report("ok", what, f"{url_host(url)} is reachable")


def check_disk(data_dir, report):
    where = data_dir if os.path.isdir(data_dir) else os.path.dirname(data_dir) or "/"
    try:
        free = os.statvfs(where).f_bavail * os.statvfs(where).f_frsize
    except OSError as exc:
        report("warn", "disk", f"cannot tell the free space of {where}: {one_line(exc)}")
        return
    level = "fail" if free < DISK_FULL else "warn" if free < DISK_LOW else "ok"
    report(level, "disk", f"{free >> 20} MiB free in {where}"
           + ("" if level == "ok" else ": make room, the database needs it"))


class InstallError(Exception):
    """install or uninstall cannot go on; the message says why and what to do."""


class Installer:
    """The README's systemd steps, done by the program on itself: every step is
    printed (and, with dry_run, only printed); `run(argv)` runs a command."""

    def __init__(self, prefix, config, dry_run, write, run):
        self.prefix, self.config, self.dry_run = prefix, config, dry_run
        self.write, self.run = write, run
        self.program = os.path.join(prefix, "aibutler.py")

    def step(self, text, action=None):
        self.write(("would " if self.dry_run else "") + text)
        if action is not None and not self.dry_run:
            action()

    def command(self, *argv, check=True):
        """A command whose failure stops the install (check), naming it."""
        def action():
            if self.run(list(argv)).returncode != 0 and check:
                raise InstallError(f"`{' '.join(argv)}` failed (its output is above)")
        self.step("run: " + " ".join(argv), action)

    def prerequisites(self):
        """None when the unit can run here, else why not (and what to do)."""
        if os.geteuid() != 0 and not self.dry_run:
            return "install needs root: run it with sudo"
        if not (os.path.isdir("/run/systemd/system") and shutil.which("systemctl")):
            return "systemd is not running here; start it by hand with `python3 aibutler.py run`"
        probe = ("import sys, falcon, waitress; "
                 "sys.exit(0 if sys.version_info >= (3, 9) else 'Python 3.9 or newer is needed')")
        try:
            result = self.run([SERVICE_PYTHON, "-c", probe], capture_output=True, text=True)
        except OSError:
            return f"{SERVICE_PYTHON} is missing: sudo apt install python3"
        if result.returncode != 0:
            why = (result.stderr.strip().splitlines() or ["?"])[-1]
            return f"{SERVICE_PYTHON} cannot run aibutler ({why}); install what it needs with: " \
                   + APT_LINE
        return None

    def install(self):
        problem = self.prerequisites()
        if problem and not self.dry_run:
            raise InstallError(problem)
        if problem:
            self.write(f"would stop here: {problem}; the steps after it would be:")
        upgrade = os.path.exists(UNIT_PATH)
        source = os.path.abspath(__file__)
        if os.path.abspath(self.program) != source:
            self.step(f"copy {source} to {self.program}",
                      lambda: self._write(self.program, open(source, "rb").read(), 0o644))
        self.command(SERVICE_PYTHON, "-m", "compileall", "-q", self.prefix)
        readme = os.path.join(os.path.dirname(source), "README.md")
        self.step(f"write {os.path.join(self.prefix, 'README.md')} (the unit's Documentation=)",
                  lambda: self._write(os.path.join(self.prefix, "README.md"),
                                      open(readme, "rb").read() if os.path.isfile(readme)
                                      else (__doc__ or "").encode(), 0o644))
        self.step(f"write {UNIT_PATH}", lambda: self._write(
            UNIT_PATH, render_unit(self.prefix, self.config).encode(), 0o644))
        if os.path.exists(self.config):
            self.step(f"keep {self.config} as it is")
        else:
            self.step(f"write {self.config} (every key, commented out)", lambda: self._write(
                self.config, example_config().encode(), 0o644))
        self.command("systemctl", "daemon-reload")
        self.command("systemctl", "enable", "aibutler")
        # whether it started, wait_ready() says (with where to look when not)
        self.command("systemctl", "restart" if upgrade else "start", "aibutler", check=False)
        if self.dry_run:
            return EXIT_FAILURE if problem else EXIT_OK
        if not self.wait_ready():
            raise InstallError("the service did not start; see: journalctl -u aibutler -n 50")
        config = load_config(self.config, {})
        host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::") else config.server.host
        self.write(f"\naibutler {'upgraded' if upgrade else 'installed'} and running: "
                   f"http://{host}:{config.server.port}{config.webhook.path}")
        self.write(f"Print the secret senders need with:\n  sudo AIBUTLER_DATA={SERVICE_DATA} "
                   f"python3 {self.program} vault get {SECRET_NAME}\n")
        return self_check(self.config, {"AIBUTLER_DATA": SERVICE_DATA}, self.write)

    def wait_ready(self):
        """Type=notify: active only once the daemon said READY=1."""
        deadline = time.monotonic() + READY_WITHIN
        while time.monotonic() < deadline:
            state = self.run(["systemctl", "is-active", "aibutler"], capture_output=True,
                             text=True).stdout.strip()
            if state == "active":
                return True
            if state == "failed":
                return False
            time.sleep(0.2)
        return False

    def uninstall(self, purge):
        if os.geteuid() != 0 and not self.dry_run:
            raise InstallError("uninstall needs root: run it with sudo")
        if os.path.exists(UNIT_PATH):
            self.command("systemctl", "disable", "--now", "aibutler")
            self.step(f"remove {UNIT_PATH}", lambda: os.unlink(UNIT_PATH))
            self.command("systemctl", "daemon-reload")
        for name in ("aibutler.py", "README.md", "__pycache__"):
            path = os.path.join(self.prefix, name)
            if os.path.lexists(path):
                self.step(f"remove {path}", lambda path=path: remove_tree(path))
        if os.path.isdir(self.prefix) and not self.dry_run and not os.listdir(self.prefix):
            os.rmdir(self.prefix)
        kept = [SERVICE_DATA, self.config]
        if purge:
            for path in (SERVICE_DATA, "/var/lib/private/aibutler", self.config):
                if os.path.lexists(path):
                    self.step(f"remove {path}", lambda path=path: remove_tree(path))
            folder = os.path.dirname(self.config)  # the unit's ConfigurationDirectory=
            if folder == os.path.dirname(DEFAULT_CONFIG) and os.path.isdir(folder) \
                    and not os.listdir(folder):
                self.step(f"remove {folder}", lambda: os.rmdir(folder))
            kept = []
        self.write(f"aibutler {'would be' if self.dry_run else 'is'} uninstalled" + (f"; kept {' and '.join(kept)} (--purge removes "
                                                "them)" if kept else ""))
        return EXIT_OK

    @staticmethod
    def _write(path, data, mode):
        """Whole or not at all: a new file in the same directory, then renamed."""
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        temporary = f"{path}.{secrets.token_hex(4)}.new"
        with open(temporary, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), mode)
        os.replace(temporary, path)


def remove_tree(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


# === Command line ===========================================================

def build_parser():
    parser = argparse.ArgumentParser(
        prog="aibutler", description="A webhook daemon that lets anything able to POST JSON "
                                     "talk to an AI agent.",
        epilog="Files: the data directory (vault, database) is $AIBUTLER_DATA, else "
               "~/.aibutler (the service's is /var/lib/aibutler); the config file is --config, "
               "else $AIBUTLER_CONFIG, else <data>/config.ini when present. Exit codes: 0 ok, "
               "1 failure, 2 usage, 69 port taken, 78 bad configuration.")
    parser.add_argument("--version", action="version", version=f"aibutler {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser(
        "run", help="serve the webhook until stopped",
        description="Serve the webhook in the foreground until Ctrl-C or SIGTERM (SIGHUP "
                    "re-reads the config). The first start generates the shared secret; "
                    "print it with `vault get webhook_auth_secret`. To run it as a service "
                    "instead, use `sudo python3 aibutler.py install`.")
    run.add_argument("--config", metavar="FILE", help="config file (default: $AIBUTLER_CONFIG, "
                                                      "else <data>/config.ini if present)")
    run.add_argument("--host", help="address to listen on (overrides [server] host)")
    run.add_argument("--port", type=port_argument, help="port to listen on, 0 for any free one")
    run.set_defaults(func=cmd_run)

    check = commands.add_parser(
        "check", help="check the config, files, secrets, port, model and network, "
                      "without serving",
        description="One line per check: ok, warn, or fail with what to do. Exit 0 when "
                    "nothing fails. Under the service: sudo AIBUTLER_DATA=/var/lib/aibutler "
                    "python3 /opt/aibutler/aibutler.py check --config /etc/aibutler/config.ini")
    check.add_argument("--config", metavar="FILE", help="as for run")
    check.set_defaults(func=cmd_check)

    for verb, text in (("install", "install or upgrade the systemd service (as root)"),
                       ("uninstall", "stop and remove the systemd service (as root)")):
        command = commands.add_parser(verb, help=text, description=text + ": every step is "
                                      "printed; the data and config stay unless --purge.")
        command.add_argument("--prefix", default=DEFAULT_PREFIX, metavar="DIR",
                             help=f"where the program goes (default {DEFAULT_PREFIX})")
        command.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                             help=f"the service's config file (default {DEFAULT_CONFIG}; "
                                  "install writes one only if it is missing)")
        command.add_argument("--dry-run", action="store_true",
                             help="print every step, change nothing")
        if verb == "uninstall":
            command.add_argument("--purge", action="store_true",
                                 help=f"also remove {SERVICE_DATA} (the vault, the database) "
                                      "and the config file")
        command.set_defaults(func=cmd_install if verb == "install" else cmd_uninstall)

    token = commands.add_parser(
        "token", help="print a per-user token (for a chat page, a script)",
        description="Print a JWT (HS256, signed with the vault's webhook_token_secret) that "
                    "lets its holder send messages and read replies as USER_ID only: "
                    "Authorization: Bearer <token>. A site's backend mints its own the same "
                    "way (see the README, 'From a browser').")
    token.add_argument("user_id", metavar="USER_ID")
    token.add_argument("--ttl", type=duration_argument, default=3600.0, metavar="AGE",
                       help="how long it is valid: 30m, 1h (default), 7d")
    token.add_argument("--url", metavar="URL", help="the daemon's address as a browser reaches "
                       "it, e.g. http://pi.local:3377: print a link to its /chat page instead")
    token.set_defaults(func=cmd_token)

    vault = commands.add_parser("vault", help="manage secrets (webhook_auth_secret, API keys)")
    verbs = vault.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    vault_set = verbs.add_parser("set", help="store a secret (read from stdin when no VALUE)")
    vault_set.add_argument("name", type=vault_name)
    vault_set.add_argument("value", nargs="?", help="the value; prefer stdin: argv shows in ps")
    vault_set.set_defaults(func=cmd_vault_set)
    vault_get = verbs.add_parser("get", help="print a secret (exit 1 when missing)")
    vault_get.add_argument("name", type=vault_name)
    vault_get.set_defaults(func=cmd_vault_get)
    verbs.add_parser("list", help="list secret names (never values)").set_defaults(
        func=cmd_vault_list)
    vault_delete = verbs.add_parser("delete", help="remove a secret")
    vault_delete.add_argument("name", type=vault_name)
    vault_delete.set_defaults(func=cmd_vault_delete)
    vault_rotate = verbs.add_parser("rotate", help="replace a secret with a new random one, "
                                                   "keeping the old one valid for a grace period")
    vault_rotate.add_argument("name")
    vault_rotate.set_defaults(func=cmd_vault_rotate)

    deliveries = commands.add_parser("deliveries", help="inspect and retry async callbacks")
    verbs = deliveries.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    listing = verbs.add_parser("list", help="recent callbacks and their state")
    listing.add_argument("--failed", action="store_true", help="only the failed ones")
    listing.add_argument("--limit", type=int, default=50, metavar="N",
                         help="show the N newest (default 50)")
    listing.set_defaults(func=cmd_deliveries_list)
    retry = verbs.add_parser("retry", help="send a failed callback again")
    retry.add_argument("message_id", nargs="?", help="the message whose callback to send")
    retry.add_argument("--all-failed", action="store_true",
                       help="every callback that failed for good")
    retry.set_defaults(func=cmd_deliveries_retry)
    purge = verbs.add_parser("purge", help="forget finished callbacks")
    purge.add_argument("--older-than", required=True, type=duration_argument, metavar="AGE",
                       help="finished this long ago: 7d, 12h, 30m (a bare number is seconds)")
    purge.set_defaults(func=cmd_deliveries_purge)
    drop = verbs.add_parser("drop", help="forget a callback that is still waiting to be sent "
                                         "(one left from async mode, say)")
    drop.add_argument("message_id", nargs="?", help="the message whose callback to drop")
    drop.add_argument("--all-pending", action="store_true",
                      help="every callback not yet delivered or failed")
    drop.set_defaults(func=cmd_deliveries_drop)
    return parser


def port_argument(text):
    try:
        return parse_int_between(0, 65535)(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def duration_argument(text):
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fail(message, code=EXIT_FAILURE):
    """One line on stderr, an error in the journal's eyes too (priority 3),
    after the log lines held so far."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    priority = "<3>" if on_journal(os.environ, sys.stderr) else ""
    print(f"{priority}aibutler: {printable(message)}", file=sys.stderr)
    return code


def open_vault(env=None):
    data_dir = data_dir_from_env(env)
    if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
        raise DataDirError(f"{data_dir}: the data directory is not a directory")
    return Vault(os.path.join(data_dir, "vault.json"), env)


def open_store(data_dir):
    return Store(os.path.join(ensure_data_dir(data_dir), "aibutler.db"))


class LogFormatter(logging.Formatter):
    """Log lines an attacker cannot forge: control characters and newlines in a
    message (paths, user ids, errors from requests) are escaped. Under systemd's
    journal each line starts with its syslog priority (<3> error ... <7> debug),
    which SyslogLevelPrefix= (on by default) reads, and has no timestamp
    (journald adds its own)."""

    PRIORITIES = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

    def __init__(self, journal):
        super().__init__(("" if journal else "%(asctime)s ")
                         + "%(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def formatMessage(self, record):
        record.message = printable(record.message)
        return super().formatMessage(record)

    def _prefix(self, levelno):
        if not self.journal:
            return ""
        return f"<{next((p for lv, p in self.PRIORITIES if levelno >= lv), 7)}>"

    def format(self, record):
        """A traceback's lines are indented (and prefixed), so none can pass for
        a line of its own whatever the exception's message says."""
        text = super().format(record)
        prefix = self._prefix(record.levelno)
        if "\n" not in text:  # every line but a traceback's
            return prefix + text
        first, *rest = text.split("\n")
        return "\n".join([prefix + first] + [f"{prefix}  {printable(line)}" for line in rest])


def printable(text):
    """Every character str.isprintable() refuses, as its escape: controls
    (newlines, ESC, DEL, C1), Unicode line breaks, bidi overrides and other
    format characters (U+202E, U+2066-U+2069, U+200B: category Cf), separators
    other than the space, and unassigned ones. A log line shows what was sent."""
    if text.isprintable():  # most text: no character to look at one by one
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def on_journal(env, stream):
    """True when `stream` is the journal's: $JOURNAL_STREAM names its device and
    inode (an inherited variable with stderr redirected elsewhere does not)."""
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind the stream
        return False
    return env.get("JOURNAL_STREAM") == f"{info.st_dev}:{info.st_ino}"


def setup_logging(level, env=None):
    env = os.environ if env is None else env
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(journal=on_journal(env, sys.stderr)))
    logging.basicConfig(level=level.upper(), handlers=[handler])


THREAD_STACK_BYTES = 1 << 20  # 1 MiB: hundreds of parked threads fit a 32-bit Pi's memory


def cmd_run(args):
    libc = c_library()
    if libc is not None:  # before any thread starts (MALLOC_ARENA_MAX=2, from a shell too)
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    threading.stack_size(THREAD_STACK_BYTES)  # not the 8 MB default: threads come and go
    try:
        load_web_stack()
    except ImportError as exc:
        return fail(f"{exc.name} is not installed; " + INSTALL_HINT)
    env = dict(os.environ)
    if args.host:
        env["AIBUTLER_HOST"] = args.host
    config = load_config(args.config, env)
    if args.port is not None:  # 0 (any free port) only from the command line
        config.server.port = args.port
    check_listen_address(config.server)
    setup_logging(config.server.log_level, env)
    data_dir = ensure_data_dir(data_dir_from_env(env))
    lock_data_dir(data_dir)  # held until the process ends
    vault = open_vault(env)
    check_channel_secrets(config, vault, data_dir, env)
    for warning in data_dir_warnings(data_dir, fresh=not os.path.lexists(vault.path)):
        log.warning("files: %s", warning)
    store = open_store(data_dir)
    imported = store.import_old_journal()
    if imported:
        log.warning("history: moved %d exchange(s) that an older version had left in its "
                    "history journal into the database", imported)
    return Daemon(config, vault, store, args.config, env).run()


def check_listen_address(server):
    """A host that does not parse or resolve, or names several addresses (like
    localhost: 127.0.0.1 and ::1), is a config error, found before anything is
    bound or generated."""
    try:
        found = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"[server] host = {server.host!r}: cannot listen there "
                          f"({one_line(exc)})") from None
    addresses = sorted({info[4][0] for info in found})
    if len(addresses) > 1:
        raise ConfigError(f"[server] host = {server.host!r} names several addresses; "
                          f"name one of: {', '.join(addresses)}")


def read_secret_value(args):
    if args.value not in (None, "-"):
        print("aibutler: warning: a value given on the command line is visible in `ps` and "
              "shell history; pipe it on stdin instead", file=sys.stderr)
        return args.value
    if sys.stdin.isatty():
        return getpass.getpass(f"{args.name}: ")
    return sys.stdin.read()


def vault_name(name):
    if not Vault.valid_name(name):
        raise argparse.ArgumentTypeError(
            f"invalid name {name!r}: use lower-case letters, digits and _ (and not "
            f"{', '.join(sorted(Vault.RESERVED))})")
    return name


def cmd_vault_set(args):
    raw = read_secret_value(args)
    value = raw.strip()
    if value != raw.rstrip("\r\n"):  # a pipe's one ending newline is no news
        print("aibutler: note: removed spaces or blank lines around the value (a secret or "
              "API key never has them)", file=sys.stderr)
    if not value:
        return fail("refusing to store an empty value")
    if has_control_characters(value):
        return fail("refusing to store a value with control characters (a newline or tab "
                    "inside it?): it goes into HTTP headers, where they cannot be")
    vault = open_vault()
    vault.set(args.name, value)
    print(f"aibutler: stored {args.name} in {vault.path}", file=sys.stderr)
    source = vault.source(args.name)
    if source != "file":
        print(f"aibutler: warning: the {source} overrides the vault file for {args.name}",
              file=sys.stderr)
    return EXIT_OK


def cmd_vault_get(args):
    value = open_vault().get(args.name)
    if value is None:
        return fail(f"{args.name} is not set")
    print(value)
    return EXIT_OK


def cmd_vault_list(args):
    vault = open_vault()
    for name in vault.names():
        print(f"{name}\t({vault.source(name)})")
    return EXIT_OK


def cmd_vault_delete(args):
    if not open_vault().delete(args.name):
        return fail(f"{args.name} is not set")
    print(f"aibutler: deleted {args.name}", file=sys.stderr)
    return EXIT_OK


def cmd_vault_rotate(args):
    if args.name not in ROTATED:
        return fail(f"only {' and '.join(ROTATED)} are rotated here (a new random value with "
                    "a grace period); replace other secrets with `vault set`", EXIT_USAGE)
    vault = open_vault()
    source = vault.source(args.name)
    if source not in ("file", None):
        return fail(f"{args.name} comes from the {source}; rotate it there")
    old = vault.get(args.name)
    new = secrets.token_hex(32)
    entries = {args.name: new}
    if old:
        entries.update({args.name + "_previous": old, args.name + "_rotated_at": str(time.time())})
    vault.update(entries)
    print(new)
    print(f"aibutler: {args.name} rotated; the previous value stays valid for "
          "[channels.webhook] previous_secret_grace (default 24h). Update your senders.",
          file=sys.stderr)
    return EXIT_OK


def cmd_deliveries_list(args):
    store = open_store(data_dir_from_env())
    rows = store.list_deliveries(args.failed, args.limit)
    for row in rows:
        created = iso_utc(row["created"])
        print("\t".join(printable(str(field)) for field in (
            row["message_id"], row["state"], f"attempts={row['attempts']}", created,
            f"user={row['user_id']}", row["last_error"] or "")))
    if not rows:
        print("aibutler: no deliveries" + (" have failed" if args.failed else ""),
              file=sys.stderr)
    return EXIT_OK


def cmd_deliveries_retry(args):
    if bool(args.message_id) == bool(args.all_failed):
        return fail("give a message id or --all-failed", EXIT_USAGE)
    count = open_store(data_dir_from_env()).retry_deliveries(args.message_id)
    if args.message_id and not count:
        return fail(f"no pending or failed delivery {args.message_id}")
    print(f"aibutler: {count} delivery(ies) queued again; a running daemon sends them "
          "within a second", file=sys.stderr)
    return EXIT_OK


def cmd_token(args):
    if args.ttl < 1:
        return fail("--ttl must be at least 1s", EXIT_USAGE)
    if not args.user_id.strip() or len(args.user_id) > USER_ID_MAX \
            or has_control_characters(args.user_id):
        return fail(f"USER_ID must be 1 to {USER_ID_MAX} characters, no control characters",
                    EXIT_USAGE)
    vault = open_vault()
    ensure_webhook_secret(vault, TOKEN_SECRET_NAME)
    token = mint_token(vault.get(TOKEN_SECRET_NAME), args.user_id, args.ttl)
    if args.url:
        url = args.url.rstrip("/")
        print(f"{url}/chat#token={token}")
        print(f"aibutler: a link to the chat page as {args.user_id}, valid for "
              f"{args.ttl:g}s; the page is served when [channels.webhook] chat_page = true",
              file=sys.stderr)
    else:
        print(token)
    return EXIT_OK


def cmd_check(args):
    return self_check(args.config, dict(os.environ), print)


def installer(args):
    return Installer(os.path.abspath(args.prefix), os.path.abspath(args.config), args.dry_run,
                     lambda text: print(text, flush=True), subprocess.run)


def cmd_install(args):
    try:
        return installer(args).install()
    except InstallError as exc:
        return fail(str(exc))


def cmd_uninstall(args):
    try:
        return installer(args).uninstall(args.purge)
    except InstallError as exc:
        return fail(str(exc))


def cmd_deliveries_drop(args):
    if bool(args.message_id) == bool(args.all_pending):
        return fail("give a message id or --all-pending", EXIT_USAGE)
    count = open_store(data_dir_from_env()).drop_deliveries(args.message_id)
    if args.message_id and not count:
        return fail(f"no pending delivery {args.message_id}")
    print(f"aibutler: dropped {count} pending delivery(ies); they will not be sent",
          file=sys.stderr)
    return EXIT_OK


def cmd_deliveries_purge(args):
    count = open_store(data_dir_from_env()).purge_deliveries(args.older_than)
    print(f"aibutler: purged {count} finished delivery(ies)", file=sys.stderr)
    return EXIT_OK


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except ConfigError as exc:
        return fail(f"bad configuration: {exc}", EXIT_CONFIG)
    except (VaultError, DataDirError) as exc:
        return fail(str(exc))
    except sqlite3.Error as exc:
        return fail(f"the database in {data_dir_from_env()} cannot be used: {one_line(exc)}")
    except KeyboardInterrupt:
        return fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
