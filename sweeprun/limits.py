"""The bounds of the numeric settings, from the sweep file or the command line.

A module of its own with no imports: the CLI declares its flags with these bounds, and
`sweeprun --help` must not pay for loading the sweep-file parser to print them.
"""

from __future__ import annotations

#: ``(minimum, maximum)`` of the numeric settings, from the file or the command line.
RANGES: dict[str, tuple[float, float]] = {
    "max_attempts": (1, 1_000_000), "max_lost": (1, 1_000_000), "grace_s": (0.0, 86_400.0), "lease_s": (1.0, 86_400.0),
    "lease_settle_s": (0.0, 3_600.0), "max_runs": (1, 10**12), "workers": (1, 256),
    "nproc": (1, 1024), "on_oom.retries": (0, 100),
}
