"""Credentials never leave the process: redaction sits at the exits, not at the call sites.

The exits are the console (the CLI swaps ``sys.stdout``/``sys.stderr`` for
:class:`RedactingStream` while it runs, so rich, typer and every ``print`` pass through it),
the attempt logs (the launcher's log writer), the records sweeprun stores
(:func:`record_bytes`), JSON for scripts (:func:`print_json`, value by value) and the
exceptions it raises (:class:`~sweeprun.errors.SweeprunError` redacts its message, for library
users). Code inside need not remember to call :func:`redact`; a new code
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

# A ``,`` may be in a userinfo (RFC 3986), but one that starts the next ``name=value`` ends it:
# ``url=http://mirror:nine,mail=me@example.org`` is two values, not one credential.
_IN_USERINFO = r"(?:[^\s/?#'\"<>,]|,(?![A-Za-z_][A-Za-z0-9_.-]*=))"
_IN_PASSWORD = r"(?:[^\s'\"<>,]|,(?![A-Za-z_][A-Za-z0-9_.-]*=))"
_NOT_PORT = r":(?!\d{0,5}(?:[/?#\s]|$))"
_USER = rf"[^\s/?#@:'\"<>,]{{0,256}}{_NOT_PORT}"
_ANY_USER = rf"[^\s/?#@:'\"<>]{{0,256}}{_NOT_PORT}"

# ``scheme://user:pass@host`` in text. The first form is RFC 3986's authority, up to its last
# ``@`` so that an unencoded ``@`` in a password is covered too. The second takes a password
# that (wrongly, but AWS secret keys often do) holds ``/``: ``user:`` followed by anything that
# is not a port number, up to the last ``@`` of the word. Neither crosses what cannot be in a
# userinfo and ends a value in text: whitespace, quotes, ``<``, ``>`` (a status row, JSON a run
# prints: ``"http://mirror:nine", "me@example.org"`` is two values). Both are bounded (no
# credential is longer), which keeps hostile text linear.
_USERINFO = re.compile(
    rf"(?P<scheme>{_SCHEME})(?:{_IN_USERINFO}{{0,512}}|{_USER}{_IN_PASSWORD}{{0,512}})@")

# A URL the user gave, on its own (``secrets_in``): its password may hold what ends a word in
# text (quotes, ``<``, ``>``, spaces: ``postgresql://u:p"a<s s>@db``) and runs to the last ``@``
# before any other URL starts. Only where the text is known to be one URL: in text this would
# run from one value's URL to the next value's ``@``.
_LOOSE_USERINFO = re.compile(
    rf"(?P<scheme>{_SCHEME})(?:[^\s/?#'\"<>]{{0,512}}|{_ANY_USER}[^\s'\"<>]{{0,512}}"
    rf"|{_ANY_USER}(?:(?!://)[^\r\n]){{0,512}})@")

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
    for m in _LOOSE_USERINFO.finditer(text):
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


def redact_url(url: str) -> str:
    """``url``, a URL the user gave, as it may be shown: its password starred whatever it holds
    (in text :func:`redact` stops at a quote or a space, which a password may hold)."""
    return redact(url, also=secrets_in(url))


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

    def write_structured(self, text: str) -> int:
        """``text`` as it is: JSON whose every string :func:`print_json` has redacted already."""
        return self._inner.write(text)

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":  # bytes written there would skip the redaction
            raise AttributeError(name)
        return getattr(self._inner, name)


def print_json(value: Any, *, indent: int | None = None, row_per_line: bool = False) -> None:
    """``value`` as JSON on stdout, redacted as a tree (:func:`redact_tree`), past the console's
    text patterns: those run over encoded JSON can eat a closing quote (``password=...`` runs to
    the next space) and turn the output into something no script can parse.

    ``row_per_line``: ``value`` is a list, written one item per line: readable, and json's C
    encoder (an indent turns it off) keeps 10,000 runs from taking seconds to print. A closed
    stdout (``None``) gets nothing, as ``print`` does."""
    tree = redact_tree(value)
    if row_per_line:
        rows = [json.dumps(row, allow_nan=False) for row in tree]
        text = "[\n" + ",\n".join(rows) + "\n]\n" if rows else "[]\n"
    else:
        text = json.dumps(tree, indent=indent, allow_nan=False) + "\n"
    out = sys.stdout
    if isinstance(out, RedactingStream):
        out.write_structured(text)
    elif out is not None:
        out.write(text)


@contextlib.contextmanager
def redacted_console() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` redacted for the duration (the CLI's whole run).

    A stream Python set to ``None`` (its descriptor was closed: ``sweeprun launch ... >&-``)
    stays ``None``: ``print`` and rich write nothing there, where a wrapper would raise."""
    saved = sys.stdout, sys.stderr
    if saved[0] is not None:
        sys.stdout = RedactingStream(saved[0])  # type: ignore[assignment]
    if saved[1] is not None:
        sys.stderr = RedactingStream(saved[1])  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
