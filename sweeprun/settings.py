"""Every ``SWEEPRUN_*`` environment variable, declared once: its type, default, range and meaning.

Before this module the same kind of value (seconds, a flag) was parsed five ways with three
error policies. Now there is one parser per type and one policy: a value that does not parse
raises :class:`SettingError`, one line naming the variable and the value (the CLI prints it
and exits 2; inside a training script an uncaught one ends the script the same way). Unset,
or set to blank where :attr:`Setting.blank_is_unset`, means the default.

The variables that carry a run from the launcher to its process (:mod:`sweeprun.runenv`)
are declared here too and read through the same parsers. :func:`table` renders all of them
for the docs; a test keeps every ``SWEEPRUN_`` name in the package declared here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import SpecError

T = TypeVar("T")


class SettingError(SpecError):
    """A ``SWEEPRUN_*`` variable holds a value its type does not allow."""


# -- one parser per type: each returns the value or raises ValueError("is not ...") ----------


def _seconds(low: float, high: float, low_open: bool) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
            raise ValueError("is not " + _range_text("number of seconds", low, high, low_open))
        return value
    return parse


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        text = raw.strip()
        # ASCII digits only: int() would take "²", "1_000" and " ３ "
        if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
            raise ValueError("is not a positive integer" if low == 1 else
                             f"is not an integer from {low} to {high}")
        return int(text)
    return parse


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("is neither 1 nor 0")


def parse_text(raw: str) -> str:
    """As given: a path may begin or end with a space."""
    if "\0" in raw:
        raise ValueError("holds a NUL byte")
    return raw


def parse_folder(raw: str) -> str:
    """As given, but never blank: a blank folder is a mistyped ``X=$UNSET``, and taking it as
    the default would silently move what lives there (the default ledgers)."""
    if not raw.strip() or "\0" in raw:
        raise ValueError("is not a usable folder")
    return raw


def parse_json_object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"is a JSON {type(value).__name__}, not an object of parameters")
    return value


def _range_text(unit: str, low: float, high: float, low_open: bool) -> str:
    if low == 0 and low_open and math.isinf(high):
        return f"a positive {unit}"
    return f"a {unit} between {low:g} and {high:g}"


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One variable: ``get()`` is its parsed value (or the default), the only way to read it."""

    name: str
    kind: str                      # what the table shows: "seconds", "flag", "integer", ...
    parse: Callable[[str], T]
    default: T | None
    doc: str
    #: Who sets it: "user", or "launcher" for what carries a run to its process.
    by: str = "user"
    #: Blank is the default (a user's ``X=``); for launcher values blank is an error.
    blank_is_unset: bool = True
    #: The user's next step after a bad value.
    hint: str = "unset it or fix its value"
    #: What the range allows, for the table.
    valid: str = ""

    def get(self, env: Mapping[str, str] | None = None) -> T | None:
        raw = (os.environ if env is None else env).get(self.name)
        if raw is None or (self.blank_is_unset and not raw.strip()):
            return self.default
        return self.parse_value(raw)

    def value(self, env: Mapping[str, str] | None = None) -> T:
        """:meth:`get` for a setting with a default: never ``None``."""
        value = self.get(env)
        if value is None:
            raise TypeError(f"{self.name} has no default; use get()")
        return value

    def parse_value(self, raw: str) -> T:
        """``raw`` as this setting's type; a :class:`SettingError` naming it if it is not one."""
        try:
            return self.parse(raw)
        except ValueError as exc:
            shown = repr(raw) if len(raw) <= 80 else repr(raw[:60]) + "..."  # a 100 kB PARAMS
            raise SettingError(f"{self.name}={shown} {exc}; {self.hint}") from None

    def present(self, env: Mapping[str, str] | None = None) -> bool:
        """Set, and not blank where blank means unset (a user's own figure wins over the launcher's)."""
        raw = (os.environ if env is None else env).get(self.name)
        return raw is not None and (not self.blank_is_unset or bool(raw.strip()))


def seconds(name: str, default: float | None, doc: str, *, low: float = 0.0,
            high: float = math.inf, low_open: bool = True, **kw: Any) -> Setting[float]:
    valid = "> 0" if low == 0 and low_open and math.isinf(high) else f"{low:g} to {high:g}"
    return Setting(name, "seconds", _seconds(low, high, low_open), default, doc, valid=valid, **kw)


def flag(name: str, default: bool, doc: str, **kw: Any) -> Setting[bool]:
    return Setting(name, "flag", parse_flag, default, doc, valid="1/0, true/false, yes/no, on/off", **kw)


def text(name: str, doc: str, default: str | None = None, **kw: Any) -> Setting[str]:
    return Setting(name, "text", parse_text, default, doc, valid="any text", **kw)


_ALL: dict[str, Setting[Any]] = {}


def _declare(setting: Setting[T]) -> Setting[T]:
    assert setting.name not in _ALL, setting.name  # a second declaration is a bug here, not input
    _ALL[setting.name] = setting
    return setting


_LAUNCH = {"by": "launcher", "hint": "it is set by sweeprun launch: unset it to run standalone"}

# -- what the launcher hands its run's process (names also in runenv) -----------------------
RUN_DIR = _declare(text("SWEEPRUN_RUN_DIR", "URL or path of the run's folder; set: the script runs "
                        "under the launcher (or verify), unset: standalone.", **_LAUNCH))
RUN_ID = _declare(text("SWEEPRUN_RUN_ID", "The run's id; must name RUN_DIR's folder.", **_LAUNCH))
SWEEP = _declare(text("SWEEPRUN_SWEEP", "The sweep's name, recorded in each checkpoint.", **_LAUNCH))
PARAMS = _declare(Setting("SWEEPRUN_PARAMS", "JSON object", parse_json_object, None,
                          "The run's parameters; left out when too large for the environment "
                          "(then the run folder's params.json).", valid="a JSON object", **_LAUNCH))
ATTEMPT = _declare(Setting("SWEEPRUN_ATTEMPT", "integer", _integer(1, 10**18 - 1), None,
                           "1, 2, ...: this start of the run, also its checkpoints' fencing token.",
                           valid=">= 1", by="launcher", blank_is_unset=False,
                           hint="it is set by sweeprun launch (1 for the first attempt): unset it "
                                "or give one"))
TIME_LIMIT = _declare(seconds("SWEEPRUN_TIME_LIMIT", None, "Save and exit 75 (resumable) before this "
                              "many seconds; with init(time_limit_s=...) the smaller wins.",
                              hint="unset it or give one"))
OOM_RETRY = _declare(Setting("SWEEPRUN_OOM_RETRY", "integer", _integer(0, 10**6), 0,
                             "How many earlier attempts of this run ran out of memory (the sweep "
                             "file's on_oom: retries them with its halve: parameters halved each "
                             "time); run.oom_retry in the script.", valid=">= 0", by="launcher"))
MTBI_S = _declare(seconds("SWEEPRUN_MTBI_S", None, "The sweep's mean time between interruptions, "
                          "which the launcher measures from its ledger; every_s='auto' spaces "
                          "checkpoints by it (unset: a 6 h prior). A user's own value wins.",
                          hint="unset it or give one"))
ASYNC_SAVE = _declare(flag("SWEEPRUN_ASYNC_SAVE", True, "0: cadence saves are written before "
                           "end_step returns, when init(async_save=...) is not given.",
                           hint="unset it or give one"))
NPROC = _declare(Setting("SWEEPRUN_NPROC", "integer", _integer(1, 1024), None,
                         "The run's number of processes (the sweep file's nproc:), for the "
                         "script; ranks also get torchrun's RANK, WORLD_SIZE, LOCAL_RANK.",
                         valid="1 to 1024", **_LAUNCH))
AGENT_PID = _declare(text("SWEEPRUN_AGENT_PID", "The pid of the torchrun agent that started this "
                          "rank; its rank guard dies at once when started by another.", **_LAUNCH))


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"is not one of {', '.join(choices)}")
        return value
    return parse


ON_WORLD_SIZE_CHANGE = _declare(Setting(
    "SWEEPRUN_ON_WORLD_SIZE_CHANGE", "choice", _choice("reshard", "refuse"), "reshard",
    "A multi-rank run resumed at another world size: reshard (model and optimizer exact, RNG "
    "and data position approximate, recorded in the attempt's started record) or refuse (exit 2).",
    valid="reshard, refuse", by="launcher",
    hint="it is set by sweeprun launch from the sweep file's on_world_size_change: give reshard or refuse"))

# -- the launcher, the ledger and the store --------------------------------------------------
LEDGER = _declare(text("SWEEPRUN_LEDGER", "The ledger (a SQLite path or postgresql:// URL) when "
                       "--ledger is not given; before the sweep file's ledger:."))
HOME = _declare(Setting("SWEEPRUN_HOME", "folder", parse_folder, None, "Where default ledgers and "
                        "Trainer staging folders live (default ~/.local/state/sweeprun); blank is "
                        "refused, not the default.", valid="a folder on local disk",
                        blank_is_unset=False, hint="set it to a folder on local disk or unset it"))
HOST = _declare(text("SWEEPRUN_HOST", "This machine's name in the ledger and leases (default: "
                     "the hostname and its pid namespace); tests play several machines with it."))
LEDGER_WAIT_S = _declare(seconds("SWEEPRUN_LEDGER_WAIT_S", 300.0, "How long a PostgreSQL ledger "
                                 "retries an unreachable database.", low_open=False, high=86400))
BUSY_TIMEOUT_S = _declare(seconds("SWEEPRUN_BUSY_TIMEOUT_S", 30.0, "How long a SQLite ledger "
                                  "waits for another process's lock.", low_open=False, high=86400))
ALLOW_NETWORK_LEDGER = _declare(flag("SWEEPRUN_ALLOW_NETWORK_LEDGER", False, "1: allow a SQLite "
                                     "ledger on a network mount (its locking is unsafe there)."))
STORE_LEASES = _declare(flag("SWEEPRUN_STORE_LEASES", True, "0: no leases in the store even where "
                             "the ledger needs them (tests of the ledger alone)."))
STOP_POLL_S = _declare(seconds("SWEEPRUN_STOP_POLL_S", 5.0, "How often a worker looks for a stop "
                               "request (sweeprun stop).", low=0.05, high=3600, low_open=False))
LOG_UPLOAD_S = _declare(seconds("SWEEPRUN_LOG_UPLOAD_S", 30.0, "How often a running attempt's log "
                                "is uploaded to an object store."))

# -- fault injection (tests) -------------------------------------------------------------------
CRASH_AT = _declare(text("SWEEPRUN_CRASH_AT", "Tests: SIGKILL this process at the named crash "
                         "points (name or name@N, comma-separated; see sweeprun.faults)."))
FREEZE_AT = _declare(text("SWEEPRUN_FREEZE_AT", "Tests: SIGSTOP this process there instead."))


def declared() -> dict[str, Setting[Any]]:
    """Every setting, by name."""
    return dict(_ALL)


def check(env: Mapping[str, str] | None = None, by: str = "user") -> None:
    """Parse every variable ``by`` sets that is present: a bad value is refused before any work
    starts, not when the code that reads it first runs (mid-sweep)."""
    for setting in _ALL.values():
        if setting.by == by:
            setting.get(env)


def table() -> str:
    """A Markdown table of every variable, for the docs."""
    rows = ["| variable | type | default | valid | set by | meaning |", "|---|---|---|---|---|---|"]
    for s in _ALL.values():
        default = "" if s.default is None else (int(s.default) if s.kind == "flag" else s.default)
        rows.append(f"| `{s.name}` | {s.kind} | {default} | {s.valid} | {s.by} | {s.doc} |")
    return "\n".join(rows) + "\n"
