"""See a sweep: ``sweeprun report`` (one self-contained HTML file in the sweep's folder) and
``sweeprun ui`` (the same page, live, on loopback).

:mod:`.data` reads the sweep (store and ledger, read-only) into one JSON object; :mod:`.page`
draws it with plotly's inlined bundle (the ``ui`` extra); :mod:`.serve` serves it. Only
``report`` and ``ui`` import this package: the other commands never load plotly.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import SpecError, SweeprunError
from ..redact import redact_url
from ..store import atomic_write
from .data import collect
from .page import plotly_js, render

if TYPE_CHECKING:
    from ..sweep import Sweep

__all__ = ["Written", "collect", "render", "write_report"]


@dataclass(frozen=True)
class Written:
    """Where :func:`write_report` wrote the page, and what it holds."""

    url: str
    runs: int
    size: int


def write_report(sweep: Sweep, output: str | None = None) -> Written:
    """Write the page of ``sweep`` into its folder in the store (``report.html``, replaced
    whole: a reader sees the old page or the new one), or to the local file ``output``."""
    sweep.store.check_present()
    if output is None and not sweep.store.fs.exists(sweep.paths.spec):  # nothing to see, and no folder to write in
        raise SpecError(f"sweep {sweep.spec.name} has not been launched in {redact_url(str(sweep.spec.store))} "
                        "(no sweep.yaml there): nothing to report yet; launch it, or give the right --store")
    plotly = plotly_js()                  # the extra missing: said before the sweep is read
    data = collect(sweep)
    page = render(data, plotly=plotly).encode()
    if output is None:
        path = sweep.paths.report
        atomic_write(sweep.store.fs, path, page)
        return Written(sweep.store.fs.unstrip_protocol(path), len(data["runs"]), len(page))
    tmp = f"{output}.tmp-{os.getpid()}"
    try:                                   # whole or not at all, as in the store
        with open(tmp, "wb") as f:
            f.write(page)
        os.replace(tmp, output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise SweeprunError(f"cannot write {output}: {exc.strerror or exc}") from None
    return Written(output, len(data["runs"]), len(page))
