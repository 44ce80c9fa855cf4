"""Credentials never leave the process: every user-facing string of a URL goes through :func:`redact`."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_.-]*(?:token|secret|password|passwd|pwd|key|sig|signature|"
    r"credential|auth)[A-Za-z0-9_.-]*)=)[^&;#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the user:password part of any URL and secret-looking query values as ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)
