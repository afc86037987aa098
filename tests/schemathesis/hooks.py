"""Schemathesis hooks for tests/schemathesis/run (SCHEMATHESIS_HOOKS=hooks)."""
import itertools

import schemathesis

fresh_keys = itertools.count()


@schemathesis.hook
def map_case(context, case):
    """A user's Idempotency-Key reused with another body is a 422, as the IETF
    draft asks: state that no schema can express. Valid cases get a key of
    their own (the suite tests replays and reuse); invalid ones keep theirs."""
    meta = case.meta
    if meta is not None and meta.generation.mode.is_positive and case.headers:
        for name in list(case.headers):
            if name.lower() == "idempotency-key":
                case.headers[name] = f"fuzz-{next(fresh_keys)}"
    return case
