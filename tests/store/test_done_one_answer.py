"""Is this run done? One answer wherever it is asked: the run's ``DONE`` is a regular file.

A link called ``DONE`` (a user's ``ln -s``, a restore tool's, or a ``cp -s`` of a finished
sweep) is not a finished run: reading one follows it out of the store. ``status``, the
done index the launcher skips runs by, ``status --summary`` (the index again) and the
listing ``show`` and ``gc`` use must all agree, also when the run still has its entry in
the done index from when it really finished (issue 19: the local index followed links).
"""

from __future__ import annotations

import os
from pathlib import Path

from sweeprun import Sweep, load_spec, open_store
from sweeprun.ledger import RunState

from conftest import Sandbox


def _finished_then_linked(sandbox: Sandbox) -> tuple[Path, str, Path]:
    """A one-run sweep launched to the end, whose ``DONE`` is then replaced by a link to a
    regular file with the same content; its entry in the done index stays."""
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 1})
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stderr
    (run_id,) = sandbox.status(sweep)
    run = sandbox.store / "t" / "runs" / run_id
    assert (sandbox.store / "t" / "done" / run_id).is_file() and (sandbox.store / "t" / "done" / ".complete").exists()
    elsewhere = sandbox.root / "elsewhere-DONE"
    elsewhere.write_bytes((run / "DONE").read_bytes())
    (run / "DONE").unlink()
    os.symlink(elsewhere, run / "DONE")
    return sweep, run_id, run


def test_a_symlinked_done_of_an_indexed_run_is_not_done_anywhere(sandbox: Sandbox) -> None:
    sweep, run_id, run = _finished_then_linked(sandbox)
    target = sandbox.root / "elsewhere-DONE"
    before = target.read_bytes()
    paths = open_store(str(sandbox.store)).sweep("t")
    assert (sandbox.store / "t" / "done" / run_id).is_file()          # still indexed

    # The store's readers: the done index (what a launch and a big sweep's status read), the
    # listing (status, show, gc) and the check before every start.
    listing = paths.listing()
    assert "DONE" not in listing[run_id]
    assert paths.done_ids() == paths.done_ids(listing) == set()
    assert not paths.run(run_id).is_done()

    # status, from the listing and from the index (`summary`: a sweep too big for a screen)
    assert sandbox.status(sweep)[run_id]["state"] != "done"
    rows = Sweep(load_spec(sweep), str(sandbox.ledger)).status(summary=True)
    assert [(r.run_id, r.state) for r in rows if r.state is RunState.DONE] == []

    # the launcher's skip: the run is started again, not counted done
    starts = sum(e["event"] == "start" for e in sandbox.events())
    relaunch = sandbox.run("launch", str(sweep))
    assert sum(e["event"] == "start" for e in sandbox.events()) == starts + 1, relaunch.stdout
    assert "0 process(es) started" not in relaunch.stdout
    # ... and its DONE is never written through the link (a clear error instead)
    assert relaunch.returncode == 2 and "is a symbolic link" in relaunch.stderr
    assert target.read_bytes() == before and (run / "DONE").is_symlink()
