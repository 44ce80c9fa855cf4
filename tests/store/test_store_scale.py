"""Finding the done runs of a sweep on local disk: two directory passes, whatever its size.

The done index ``<sweep>/done/<run id>`` is kept on local disk as on object stores; the
run folders stay the truth. Work is counted in directory reads (``os.scandir`` calls), not
timed: the old glob read every run folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sweeprun import open_store, parse_spec
from sweeprun.store import SweepPaths, atomic_write, create_only
from sweeprun.sweep import Sweep


@pytest.fixture
def scandirs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every folder read through ``os.scandir`` (which fsspec's local listings use too)."""
    calls: list[str] = []
    original = os.scandir

    def counting(path: str | os.PathLike[str] = ".") -> object:
        calls.append(os.fspath(path))
        return original(path)

    monkeypatch.setattr(os, "scandir", counting)
    yield calls


def fill(tmp_path: Path, runs: int, done_every: int, *, old: bool = False) -> tuple[SweepPaths, set[str]]:
    """A sweep of ``runs`` run folders with params and a checkpoint; every ``done_every``-th is
    done. ``old``: written as an older sweeprun did, with DONE files but no done index."""
    sweep = open_store(str(tmp_path / "store")).sweep("big")
    done = set()
    for i in range(runs):
        run_id = f"i={i}-{i:08x}"
        run = sweep.run(run_id)
        atomic_write(sweep.fs, run.params, b"{}")
        atomic_write(sweep.fs, run.checkpoints + "/ckpt-1.pt", b"x")
        if i % done_every == 0:
            if old:
                create_only(sweep.fs, run.done, b"{}")
            else:
                run.write_done({})
            done.add(run_id)
    return sweep, done


def test_done_runs_cost_two_directory_reads(tmp_path: Path, scandirs: list[str]) -> None:
    sweep, done = fill(tmp_path, 300, done_every=3)
    assert sweep.done_ids(prune_stale=True) == done  # the first launch marks the index complete
    scandirs.clear()
    assert sweep.done_ids() == done
    assert sorted(os.path.basename(p) for p in scandirs) == ["done", "runs"]


def test_an_older_sweep_is_indexed_once_by_its_first_launch(tmp_path: Path, scandirs: list[str]) -> None:
    sweep, done = fill(tmp_path, 60, done_every=4, old=True)
    index = Path(sweep.done_index)
    assert sweep.done_ids() == done and not index.exists()  # a reader (status) writes nothing
    assert scandirs  # ... and reads every run folder's DONE (one listing, one stat a run)
    assert sweep.done_ids(prune_stale=True) == done  # a launcher indexes them
    assert sorted(p.name for p in index.iterdir()) == sorted(done | {".complete"})
    scandirs.clear()
    assert sweep.done_ids() == done and len(scandirs) == 2


def test_deleting_a_run_folder_asks_for_a_rerun(tmp_path: Path) -> None:
    """The run folders are the truth: an entry whose folder is gone does not count, and a
    launcher removes it before the re-run recreates the folder."""
    sweep, _ = fill(tmp_path, 2, done_every=1)
    sweep.done_ids(prune_stale=True)
    kept, redo = "i=0-00000000", sweep.run("i=1-00000001")
    sweep.fs.rm(redo.dir, recursive=True)
    assert sweep.done_ids() == {kept} and os.path.exists(redo.done_entry)
    assert sweep.done_ids(prune_stale=True) == {kept} and not os.path.exists(redo.done_entry)
    atomic_write(sweep.fs, redo.params, b"{}")  # the re-run starts: its folder is back, not done
    assert sweep.done_ids() == {kept} and not redo.is_done()


def test_a_done_run_missing_from_the_index_is_found_and_indexed_by_the_next_launch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher killed between DONE and its entry, then a fresh machine (no ledger): the next
    launch starts nothing and adds the missing entry."""
    from rich.console import Console

    from sweeprun.render import PlainEvents
    from sweeprun.runner import Launcher, LaunchOptions

    monkeypatch.setenv("SWEEPRUN_HOME", str(tmp_path / "home"))
    spec = parse_spec(f"""
name: local
command: {sys.executable} -c pass
store: {tmp_path / "store"}
grid:
  x: [1, 2, 3]
""")

    def launch(ledger: str) -> int:
        sweep = Sweep(spec, ledger)
        led = sweep.prepare()
        try:
            result = Launcher(sweep, led, LaunchOptions(workers=1),
                              PlainEvents(Console(record=True, width=100), 1, 0)).run()
        finally:
            led.close()
        assert result.exit_code == 0
        return result.started

    assert launch(str(tmp_path / "one.sqlite")) == 3
    sweep = Sweep(spec, str(tmp_path / "one.sqlite"))
    first = sweep.runs[0].run_id
    lost = sweep.paths.run(first)
    os.unlink(lost.done_entry)
    assert sweep.paths.done_ids() == {r.run_id for r in sweep.runs} - {first}
    assert launch(str(tmp_path / "two.sqlite")) == 0
    assert os.path.exists(lost.done_entry)


def test_a_done_deleted_by_hand_is_a_re_run_as_status_shows_it(tmp_path: Path) -> None:
    """The folder stays, its DONE goes: the index entry no longer counts (a stat per indexed
    run), and a launcher prunes it, so ``launch`` and ``status`` agree."""
    paths, done = fill(tmp_path, runs=20, done_every=4)
    assert paths.done_ids(prune_stale=True) == done  # a first launch: the index is complete
    victim = sorted(done)[0]
    os.unlink(paths.run(victim).done)
    assert paths.done_ids() == done - {victim}
    assert paths.done_ids(prune_stale=True) == done - {victim}
    assert not os.path.exists(os.path.join(paths.done_index, victim))


def test_a_done_run_missing_its_index_entry_is_done_in_a_summary_status_and_gets_its_entry(
        tmp_path: Path) -> None:
    """A crash between DONE and its index entry: `status` of a big sweep (done runs from the
    index) still counts the run done, and the next launch writes the entry."""
    text = (f"name: big\ncommand: {sys.executable} -c pass\nstore: {tmp_path / 'store'}\n"
            "grid:\n  i: [" + ", ".join(str(i) for i in range(45)) + "]\n")
    spec_path = tmp_path / "big.yaml"
    spec_path.write_text(text)
    sweep = Sweep(parse_spec(text, str(spec_path)), str(tmp_path / "ledger.sqlite"))
    for run in sweep.runs:
        sweep.paths.run(run.run_id).write_done({"attempt": 1})
    ledger = sweep.prepare()  # the ledger has them all as done
    ledger.close()
    victim = sweep.runs[7].run_id
    os.unlink(sweep.paths.run(victim).done_entry)  # as a crash between DONE and its entry leaves it
    rows = {r.run_id: r for r in sweep.status(summary=True)}
    assert rows[victim].state.value == "done" and {r.state.value for r in rows.values()} == {"done"}
    again = Sweep(parse_spec(text, str(spec_path)), str(tmp_path / "ledger.sqlite"))
    ledger = again.prepare()
    ledger.close()
    assert os.path.exists(again.paths.run(victim).done_entry)


def test_a_done_index_that_cannot_be_written_leaves_the_run_done(tmp_path: Path) -> None:
    """DONE is the truth; its index entry is a cache: a failure writing it is no error."""
    paths, _ = fill(tmp_path, runs=2, done_every=100)
    shutil.rmtree(paths.done_index)
    Path(paths.done_index).write_text("not a folder")  # every entry write fails with an OSError
    run = paths.run(sorted(paths.run_ids())[1])
    assert run.write_done({"attempt": 1}) is True and run.is_done()
