"""The few exception types sweeprun raises.

Every message names the object at fault and what the user can do next; the CLI
prints it as one line and exits with code 2, so messages must stand on their own. No
message carries a credential: each is redacted as the exception is made.
"""

from __future__ import annotations

from .redact import redact


class SweeprunError(Exception):
    """Base class: anything the user can fix; the CLI prints it and exits 2.

    The message is redacted when the exception is made: a library user (``sweeprun.Sweep``)
    logs it with no exit of sweeprun's in between, and messages quote store URLs, in which
    fsspec keeps the credentials."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))


class SpecError(SweeprunError):
    """The sweep file or a command-line flag is invalid."""


class StoreError(SweeprunError):
    """The store cannot be reached, read or written."""


class LedgerError(SweeprunError):
    """The ledger database is unusable (corrupt, locked, on a network mount)."""


class CheckpointError(SweeprunError):
    """No usable checkpoint, or one that belongs to another run or sweep."""


class LeaseLost(SweeprunError):
    """This worker's claim on a run was taken over; it must stop and write nothing."""
