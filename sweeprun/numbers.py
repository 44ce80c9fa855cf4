"""Numbers read from the store, where any file may be damaged or hostile.

Python's ``int`` and ``str.isdigit`` accept Unicode digits (``'²'.isdigit()`` is True and
``int('²')`` fails; ``int('١٢')`` is 12), and a JSON integer has no size limit while
``float()`` and ``math`` fail past 1.8e308. Every number sweeprun parses out of a name or
a file in the store goes through here: ASCII digits only, bounded, finite as a float.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: Digits of an integer in a name or record; 2**63 has 19, so 18 always fits SQLite and C.
MAX_DIGITS = 18
_DIGITS = re.compile(r"[0-9]+")  # str patterns: [0-9], never \d (it matches '²' and '١')
#: A pid as a worker label (``host:pid``) carries it: Linux's largest is 2**22.
PID_MAX = 2**31 - 1


def ascii_int(text: str, max_digits: int = MAX_DIGITS) -> int | None:
    """``text`` as a non-negative integer when it is 1 to ``max_digits`` ASCII digits."""
    if not isinstance(text, str) or not 0 < len(text) <= max_digits or not _DIGITS.fullmatch(text):
        return None
    return int(text)


def bounded_int(value: Any, low: int = 0, high: int = 10**MAX_DIGITS - 1) -> int | None:
    """A JSON value as an ``int`` in ``[low, high]``; ``None`` for anything else (a bool,
    a float, a string of digits, a number past the bounds)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return None
    return value


def finite(value: Any) -> float | None:
    """A JSON value as a finite float; ``None`` for a bool, a non-number, inf, NaN, or an
    integer too large for a float (``10**400`` parses as JSON and overflows ``float()``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def worker_pid(worker: str) -> tuple[str, int | None]:
    """``(host, pid)`` of a worker label ``host:pid``; the pid is ``None`` unless it is
    ASCII digits that a process id can be."""
    host, _, pid = worker.rpartition(":")
    number = ascii_int(pid, 10)
    return host, number if number is not None and 0 < number <= PID_MAX else None
