"""Credentials inside URLs, masked: the one rule every writer of qlora-sweep applies.

A location can carry secrets: `s3://KEY:SECRET@bucket/prefix?endpoint_override=...` (pyarrow accepts
it), `postgresql://user:password@host/db` (SQLAlchemy), or options such as `?secret_key=...`. What is
written or printed (sweep_spec.yaml, run_plan.json, the console, errors, the report, trials.csv,
the export README) goes through `redact`, which masks, in every URL of a text, the password of its
userinfo and the values of the query options in SECRET_QUERY_KEYS. The user name (an S3 access key
id, a database user) stays: it says which credentials were meant without being one.

core/storage.py keeps S3 credentials out of the locations that flow through a sweep in the first
place (`storage.without_credentials`); this rule is the backstop for every writer.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

MASK = "***"
# Query options whose value is a secret (compared lower-case): pyarrow's S3 options, and the usual
# names of passwords, tokens and signatures in database and presigned URLs.
SECRET_QUERY_KEYS = frozenset({
    "access_key", "secret_key", "session_token", "secret_access_key", "aws_secret_access_key",
    "aws_session_token", "password", "passwd", "pwd", "token", "secret", "api_key", "apikey",
    "sig", "signature", "x-amz-signature", "x-amz-security-token", "x-goog-signature", "sas_token",
})
# A URL inside any text: a scheme, "://", then up to whitespace, a quote or an angle bracket.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# Query parameters are split on & and ; (HTML escapes & as &amp;, which then splits as "amp").
_PARAM_SEP = re.compile(r"([&;])")


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by MASK (see the module docstring)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: _redact_url(m.group(0)), text)


def redact_data(value: Any) -> Any:
    """`redact` applied to every string inside nested dicts, lists and tuples (keys too)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(k): redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(v) for v in value)
    return value


def has_credentials(text: str) -> bool:
    """Whether `redact` would change `text`."""
    return redact(text) != text


def split_userinfo(after_scheme: str) -> tuple[str | None, str]:
    """(userinfo or None, the rest from the host on) of what follows a URL's "://".

    The userinfo runs to the last "@" before the query, so a password holding "/" (AWS secret keys
    often do) is part of it rather than read as the start of a path; the user name before the
    first ":" holds no "/", so `host/path@x` is not taken for a userinfo, and neither is
    `host:8080/path@x` (a port, then a path; the price: a password that is digits up to its first "/"
    is not masked).
    """
    head = re.split(r"[?#]", after_scheme, maxsplit=1)[0]
    userinfo, at, _ = head.rpartition("@")
    if not at or "/" in userinfo.split(":", 1)[0] or re.match(r"[^:/]*:\d+/", userinfo):
        return None, after_scheme
    return userinfo, after_scheme[len(userinfo) + 1:]


def _redact_url(url: str) -> str:
    scheme_end = url.index("://") + 3
    userinfo, rest = split_userinfo(url[scheme_end:])
    prefix = url[:scheme_end]
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        prefix += f"{user}:{MASK}@" if colon else f"{userinfo}@"
    path, qmark, tail = rest.partition("?")
    if qmark:
        query, hash_, fragment = tail.partition("#")
        tail = _redact_query(query) + hash_ + fragment
    return prefix + path + qmark + tail


def _redact_query(query: str) -> str:
    pieces = _PARAM_SEP.split(query)
    for i, piece in enumerate(pieces):
        name, eq, value = piece.partition("=")
        if eq and value and unquote(name).strip().lower() in SECRET_QUERY_KEYS:
            pieces[i] = f"{name}={MASK}"
    return "".join(pieces)
