"""Credentials never leave the process: every user-facing string of a URL goes through :func:`redact`.

Messages mix URLs with ordinary paths, and run folders are named ``lr=0.1,seed=0-...``; a
redactor that starred every ``=`` or ``@`` would make errors useless. So secrets are
recognised by position: the userinfo of a ``scheme://`` URL, the value of a secret-named
query parameter (after ``?`` or ``&``), and a libpq-style ``password=...`` word.
"""

from __future__ import annotations

import re

# The lookbehind anchors a scheme at the start of a word and the bound caps its length, so
# a long run of letters (a 200 kB parameter in a sweep file) is scanned once, not once per
# starting position.
_SCHEME = r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://"

# ``scheme://user:pass@host``. The first form is RFC 3986's authority, up to its last ``@`` so
# that an unencoded ``@`` in a password is covered too. The second takes a password that
# (wrongly, but AWS secret keys often do) holds ``/``: ``user:`` followed by anything that is
# not a port number, up to the last ``@`` of the word. Both are bounded (no credential is
# longer), which keeps hostile text linear.
_USERINFO = re.compile(
    rf"(?P<scheme>{_SCHEME})"
    r"(?:[^\s/?#'\"<>]{0,512}|[^\s/?#@:'\"<>]{0,256}:(?!\d{0,5}(?:[/?#\s]|$))[^\s'\"<>]{0,512})@")

_SECRET_NAME = (r"[A-Za-z0-9_.-]*(?:token|secret|passw(?:or)?d|pwd|key|sig|signature|credential|"
                r"auth|session)[A-Za-z0-9_.-]*")
# The value runs to the next parameter; a comma, colon or semicolon ends it only where prose
# goes on after it ("... ?token=abc: permission denied").
_SECRET_QUERY = re.compile(rf"(?P<key>[?&](?:{_SECRET_NAME})=)(?:[^&#\s'\",:;]|[,:;](?!\s|$))*",
                           re.IGNORECASE)

# libpq keyword/value connection strings: ``host=db user=me password=s3cret``.
_KEYWORD_PASSWORD = re.compile(r"(?P<key>(?:^|(?<=[\s,;(]))(?:password|passwd|pwd)\s*=\s*)(?:'[^']*'|\S+)",
                               re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with URL userinfo, secret-named query values and ``password=`` values as ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)
    return _KEYWORD_PASSWORD.sub(lambda m: f"{m['key']}***", text)
