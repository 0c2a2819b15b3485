"""Masking secrets wherever a spec (or anything holding one) is printed or logged.

A valid spec holds no secrets (credentials in URIs are refused, see spec/uris.py), but objects written by
older versions, error messages echoing a refused value and Kubernetes objects do; `redact` masks what looks
like a key: the user:password of a URL, key-like query parameters, AWS access key IDs, and the values of
mapping keys (or `{name, value}` environment entries) named like secrets. A Secret's *name*
(`credentials_secret`) is not a secret and is kept.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")
_QUERY_KEY = re.compile(
    r"(?P<name>[?&;][^=&;#\s'\"]*(?:key|secret|token|signature|credential|password|passwd|sig)[^=&;#\s'\"]*=)"
    r"[^&;#\s'\"]*",
    re.IGNORECASE,
)
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b")
_SECRET_NAME = re.compile(
    r"^(token|authorization)$|(^|_)(password|passwd|secret|secret_key|secret_access_key|access_key|access_key_id|"
    r"session_token|access_token|auth_token|bearer_token|refresh_token|api_key|apikey|private_key|client_secret)$",
    re.IGNORECASE,
)
_NOT_SECRET = re.compile(r"(^|_)(credentials_secret|secret_name|secret_ref|token_file)$", re.IGNORECASE)


def redact_text(text: str) -> str:
    """`text` with URL credentials, key-like query parameters and AWS access key IDs masked."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _QUERY_KEY.sub(lambda m: f"{m.group('name')}{MASK}", text)
    return _ACCESS_KEY_ID.sub(MASK, text)


def secret_name(name: str) -> bool:
    """Whether a mapping key (or an environment variable's name) names a secret value."""
    key = re.sub(r"[-.\s]", "_", str(name)).strip("_")
    return bool(_SECRET_NAME.search(key)) and not _NOT_SECRET.search(key)


def redact(value: Any) -> Any:
    """A copy of `value` (JSON-like: dicts, lists, strings, numbers) with everything secret-looking masked."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        if isinstance(value.get("name"), str) and "value" in value and secret_name(value["name"]):
            return {k: (MASK if k == "value" and v not in (None, "") else redact(v)) for k, v in value.items()}
        return {k: (MASK if isinstance(k, str) and isinstance(v, str) and v and secret_name(k) else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
