"""What the store writes and reads at the edges: file modes, what counts as done, bounded reads."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from sweeprun import open_store
from sweeprun.errors import StoreError
from sweeprun.store import atomic_write, read_json, read_regular

from conftest import REPO, Sandbox

# -- file modes -----------------------------------------------------------------------------

WRITE_UNDER_UMASK = """
import os, sys
from sweeprun import open_store
from sweeprun.store import atomic_write, write_json
os.umask(int(sys.argv[2], 8))
store = open_store(sys.argv[1])
run = store.sweep("s").run("r-1")
atomic_write(store.fs, run.params, b"{}")
write_json(store.fs, run.attempt_record(1), {"attempt": 1})
run.write_done({})
"""


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)],
                         ids=["umask-002", "umask-022", "umask-077"])
def test_store_files_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """A store shared with a group stays readable to it: files get 0666 & ~umask, not mkstemp's 0600."""
    subprocess.run([sys.executable, "-c", WRITE_UNDER_UMASK, str(tmp_path), f"{umask:o}"],
                   env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    run_dir = tmp_path / "s" / "runs" / "r-1"
    written = [run_dir / "params.json", run_dir / "attempts" / "1.json", run_dir / "DONE"]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == \
        {p.name: oct(mode) for p in written}


def test_a_launched_sweep_is_group_readable_under_umask_002(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 1})
    result = subprocess.run(
        ["sh", "-c", 'umask 002 && exec "$@"', "sh", sys.executable, "-m", "sweeprun", "launch",
         str(sweep), "--ledger", str(sandbox.ledger)],
        env=sandbox.env(), cwd=sandbox.root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    files = [p for p in (sandbox.store / "t").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"sweep.yaml", "params.json", "DONE"}
    not_group_readable = [str(p.relative_to(sandbox.store)) for p in files
                          if not p.stat().st_mode & stat.S_IRGRP]
    assert not_group_readable == []


# -- one definition of done -----------------------------------------------------------------

def _runs_with_odd_dones(url: str) -> tuple:
    store = open_store(url)
    sweep = store.sweep("s")
    good, folder = sweep.run("good-1"), sweep.run("folder-2")
    good.write_done({})
    atomic_write(store.fs, folder.done + "/note", b"a folder called DONE")
    atomic_write(store.fs, sweep.run("none-3").params, b"{}")
    return store, sweep, good, folder


@pytest.mark.parametrize("where", ["local", "memory"])
def test_done_means_a_regular_file_called_done(tmp_path: Path, where: str) -> None:
    url = str(tmp_path) if where == "local" else f"memory://sweeprun-done/{tmp_path.name}"
    try:
        store, sweep, good, folder = _runs_with_odd_dones(url)
        if where == "local":
            fifo_run = Path(sweep.run("fifo-4").dir)
            fifo_run.mkdir(parents=True)
            os.mkfifo(fifo_run / "DONE")
        assert good.is_done() and not folder.is_done() and not sweep.run("fifo-4").is_done()
        assert not sweep.run("never-5").is_done()
        listing = sweep.listing()
        assert sweep.done_ids() == sweep.done_ids(listing) == {"good-1"}
        assert {run_id for run_id in listing if sweep.run(run_id).is_done()} == {"good-1"}
    finally:
        if where == "memory":
            fsspec.filesystem("memory").rm(f"/sweeprun-done/{tmp_path.name}", recursive=True)


def test_a_link_loop_in_a_run_folder_does_not_hang_the_listing(tmp_path: Path) -> None:
    """A local listing lists regular files only (as the launcher's own check of ``DONE``
    does: a linked ``DONE`` is not a finished run) and never enters a linked folder."""
    sweep = open_store(str(tmp_path)).sweep("s")
    run = Path(sweep.run("looped-1").dir)
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "attempt-1.log").write_text("x")
    (run / "loop").symlink_to(run)                     # runs/looped-1/loop -> runs/looped-1
    (run / "DONE").symlink_to(run / "logs" / "attempt-1.log")
    assert sorted(sweep.listing()["looped-1"]) == ["logs/attempt-1.log"]
    assert sorted(sweep.listing(only=["looped-1", "absent-2"])) == ["looped-1"]
    assert sweep.done_ids(sweep.listing()) == set() and not sweep.run("looped-1").is_done()


def test_status_and_launch_agree_that_a_done_folder_is_not_done(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 1})
    run_ids = sorted(sandbox.status(sweep))
    (sandbox.store / "t" / "runs" / run_ids[0] / "DONE").mkdir(parents=True)
    assert {rid: row["state"] for rid, row in sandbox.status(sweep).items()}[run_ids[0]] != "done"


# -- bounded reads of regular files only ----------------------------------------------------

@pytest.mark.parametrize("make, kind", [
    (lambda p: os.mkfifo(p), "a named pipe"),
    (lambda p: os.symlink("/dev/zero", p), "a symbolic link"),  # never followed in a store
    (lambda p: os.mkdir(p), "a folder"),
])
def test_read_regular_refuses_what_is_not_a_regular_file(tmp_path: Path, make, kind: str) -> None:
    """A pipe would block forever and /dev/zero would fill memory; both are refused before opening."""
    path = tmp_path / "metrics.jsonl"
    make(path)
    fs = open_store(str(tmp_path)).fs
    said = f"is {kind}" if "link" in kind else f"it is {kind}, not a regular file"
    with pytest.raises(StoreError, match=said):
        read_regular(fs, str(path), 1 << 20, tail=True)
    with pytest.raises(StoreError, match=said):
        read_json(fs, str(path))


def test_read_done_of_a_device_is_not_a_hang(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    run = store.sweep("s").run("r-1")
    Path(run.dir).mkdir(parents=True)
    os.symlink("/dev/zero", run.done)
    assert run.read_done() is None and not run.is_done()


def test_status_does_not_block_on_a_metrics_pipe(sandbox: Sandbox) -> None:
    """A named pipe called metrics.jsonl (a user's `tee` gone wrong) must not hang `status`."""
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 1})
    run_ids = sorted(sandbox.status(sweep))
    run_dir = sandbox.store / "t" / "runs" / run_ids[0]
    run_dir.mkdir(parents=True)
    os.mkfifo(run_dir / "metrics.jsonl")
    (run_dir / "DONE").write_text("{}")
    result = sandbox.run("status", str(sweep), "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    assert {row["run_id"]: row["state"] for row in json.loads(result.stdout)}[run_ids[0]] == "done"
