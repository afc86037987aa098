"""Schemathesis hooks for tests/schemathesis/run (SCHEMATHESIS_HOOKS=hooks)."""
import itertools
import json
import os
from collections.abc import Mapping
from urllib.parse import parse_qsl

import requests
import schemathesis
from twilio.request_validator import RequestValidator

fresh_keys = itertools.count()


@schemathesis.hook
def map_case(context, case):
    """A user's Idempotency-Key (or a sender's MessageSid) reused with another
    body is a 422, as the IETF draft asks: state that no schema can express.
    Valid cases get a key of their own (the suite tests replays and reuse);
    invalid ones keep theirs."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    for name in list(case.headers or ()):
        if name.lower() == "idempotency-key":
            case.headers[name] = f"fuzz-{next(fresh_keys)}"
    if isinstance(case.body, dict) and "MessageSid" in case.body:
        case.body["MessageSid"] = f"SM{next(fresh_keys):032x}"  # a SID as Twilio makes them
    return case


class Form(dict):
    """Form fields for twilio's RequestValidator: name -> every value (getlist)."""

    def getlist(self, name):
        return self[name]


def form_pairs(body):
    """The (name, value) pairs the daemon parses from the body schemathesis
    sends for this case (its urlencoded serializer, then requests' encoding)."""
    if body is None or type(body).__name__ == "NotSet":  # no body at all
        return []
    if isinstance(body, Mapping):
        body = requests.models.RequestEncodingMixin._encode_params(body)
    elif not isinstance(body, (str, bytes)):
        body = json.dumps(body)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return parse_qsl(body, keep_blank_values=True)


ours = set()  # the signatures TwilioSignature made: re-signed, never a fuzzed value


def twilio_signature(case):
    form = Form()
    for name, value in form_pairs(case.body):
        form.setdefault(name, []).append(value)
    url = case.operation.base_url.rstrip("/") + case.formatted_path
    signature = RequestValidator(os.environ["AIBUTLER_TWILIO_AUTH_TOKEN"]).compute_signature(
        url, form)
    ours.add(signature)
    return signature


@schemathesis.auth().apply_to(operation_id="twilioMessage")
class TwilioSignature:
    """X-Twilio-Signature as Twilio computes it, over the URL called and the
    form as sent, keyed with the run's Auth Token: cases reach the handler.
    (ignored_auth still sends them unsigned and expects the 403.)"""

    def get(self, case, context):
        return "signed per case"

    def set(self, case, data, context):
        case.headers = case.headers or {}
        case.headers["X-Twilio-Signature"] = twilio_signature(case)


@schemathesis.hook
def before_call(context, case, kwargs):
    """The signature is set when a case is generated; map_case and the
    checks may change the body after that, so sign again just before sending
    (only a signature of ours: a fuzzed or removed header stays as it is)."""
    headers = case.headers or {}
    if headers.get("X-Twilio-Signature") in ours:
        headers["X-Twilio-Signature"] = twilio_signature(case)
