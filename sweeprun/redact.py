"""Credentials never leave the process: redaction sits at the exits, not at the call sites.

The exits are the console (the CLI swaps ``sys.stdout``/``sys.stderr`` for
:class:`RedactingStream` while it runs, so rich, typer and every ``print`` pass through it),
the attempt logs (the launcher's log writer), and the records sweeprun stores
(:func:`record_bytes`). Code inside need not remember to call :func:`redact`; a new code
path that prints or stores a URL is covered by the exit it leaves through.

Messages mix URLs with ordinary paths, and run folders are named ``lr=0.1,seed=0-...``; a
redactor that starred every ``=`` or ``@`` would make errors useless. So secrets are
recognised by position: the userinfo of a ``scheme://`` URL, the value of a secret-named
query parameter (after ``?`` or ``&``), and a libpq-style ``password=...`` word.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO
from urllib.parse import unquote

# The lookbehind anchors a scheme at the start of a word and the bound caps its length, so
# a long run of letters (a 200 kB parameter in a sweep file) is scanned once, not once per
# starting position.
_SCHEME = r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://"

# ``scheme://user:pass@host``. The first form is RFC 3986's authority, up to its last ``@`` so
# that an unencoded ``@`` in a password is covered too. The second takes a password that
# (wrongly, but AWS secret keys often do) holds ``/``: ``user:`` followed by anything that is
# not a port number, up to the last ``@`` of the word. The third, a password that holds what
# ends a word in prose (quotes, ``<``, ``>``, spaces: ``postgresql://u:p"a<s s>@db``), runs to
# the last ``@`` of the line before any other URL starts. All are bounded (no credential is
# longer), which keeps hostile text linear.
_USERINFO = re.compile(
    rf"(?P<scheme>{_SCHEME})"
    r"(?:[^\s/?#'\"<>]{0,512}|[^\s/?#@:'\"<>]{0,256}:(?!\d{0,5}(?:[/?#\s]|$))[^\s'\"<>]{0,512}"
    r"|[^\s/?#@:'\"<>]{0,256}:(?!\d{0,5}(?:[/?#\s]|$))(?:(?!://)[^\r\n]){0,512})@")

_SECRET_NAME = (r"[A-Za-z0-9_.-]*(?:token|secret|passw(?:or)?d|pwd|key|sig|signature|credential|"
                r"auth|session)[A-Za-z0-9_.-]*")
# The value runs to the next parameter; a comma, colon or semicolon ends it only where prose
# goes on after it ("... ?token=abc: permission denied").
_SECRET_QUERY = re.compile(rf"(?P<key>[?&](?:{_SECRET_NAME})=)(?:[^&#\s'\",:;]|[,:;](?!\s|$))*",
                           re.IGNORECASE)

# libpq keyword/value connection strings: ``host=db user=me password=s3cret``.
_KEYWORD_PASSWORD = re.compile(r"(?P<key>(?:^|(?<=[\s,;(]))(?:password|passwd|pwd)\s*=\s*)(?:'[^']*'|\S+)",
                               re.IGNORECASE)


def secrets_in(text: str) -> set[str]:
    """The credentials :func:`redact` finds in ``text`` (a URL the user gave), as written and
    percent-decoded: what a library may echo back in its own words (psycopg quotes a
    password it cannot parse), to be starred wherever it shows up (``redact(msg, also=...)``)."""
    found: set[str] = set()
    for m in _USERINFO.finditer(text):
        user, colon, password = m.group(0)[len(m["scheme"]):-1].partition(":")
        if colon:  # a user alone (postgresql://postgres@db) is a name, not a secret
            found.add(password)
    for pattern in (_SECRET_QUERY, _KEYWORD_PASSWORD):
        for m in pattern.finditer(text):
            found.add(m.group(0)[len(m["key"]):].strip("'"))
    found |= {unquote(value) for value in found}
    # A parser that stops at a delimiter the password holds echoes only the part before
    # (or after) it: psycopg quotes ``p"a s`` of ``p"a s/x@db``.
    for value in list(found):
        for i, char in enumerate(value):
            if char in "/?#@":
                found |= {value[:i], value[i + 1:]}
    return {value for value in found if len(value) >= 3}


def redact(text: str, also: Iterable[str] = ()) -> str:
    """``text`` with URL userinfo, secret-named query values and ``password=`` values as ``***``;
    and every occurrence of the strings ``also`` (see :func:`secrets_in`)."""
    for secret in sorted(also, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m['key']}***", text)
    return _KEYWORD_PASSWORD.sub(lambda m: f"{m['key']}***", text)


def redact_tree(value: Any) -> Any:
    """A JSON-like value with every string in it (keys too) redacted: starring the encoded
    text instead could eat a closing quote (``password=...`` runs to the next space)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value


def record_bytes(obj: Any) -> bytes:
    """The bytes of a JSON record sweeprun stores (attempt and coordination records), redacted.

    Not for data a run reads back as given (``params.json``): those are the user's values."""
    return (json.dumps(redact_tree(obj), sort_keys=True) + "\n").encode()


class RedactingStream:
    """A text stream that redacts every write before passing it on; everything else is the
    wrapped stream's (``isatty``, ``fileno``, ``encoding``: rich still sees a terminal)."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(redact(text) if ("://" in text or "=" in text) else text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":  # bytes written there would skip the redaction
            raise AttributeError(name)
        return getattr(self._inner, name)


@contextlib.contextmanager
def redacted_console() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` redacted for the duration (the CLI's whole run)."""
    saved = sys.stdout, sys.stderr
    sys.stdout = RedactingStream(saved[0])  # type: ignore[assignment]
    sys.stderr = RedactingStream(saved[1])  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
