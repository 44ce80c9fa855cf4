"""The training API at its edges: damaged and hostile checkpoint folders, fencing between
attempts, the metrics file after a kill, state types, markers, cadence, bad environments.

In-process where the API is what a user meets, a real ``python`` subprocess where a
user would meet an exit code; real files, real torch, a fast-forward clock.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from test_checkpoint import Trainer, metrics_of, saved_steps
from torch import nn

from sweeprun.errors import CheckpointError, LeaseLost, SpecError
from sweeprun.ledger.contract import FakeClock
from sweeprun.runenv import PREEMPTED_EXIT
from sweeprun.training import init, load_checkpoint
from sweeprun.training.metrics import read_metrics

from _training_helpers import REPO, assert_same_tree


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def launcher_env(run_dir: Path, attempt: int | str, run_id: str | None = None,
                 **extra: str) -> dict[str, str]:
    """What ``sweeprun launch`` gives a run's process (the folder is named by the run id)."""
    return {"SWEEPRUN_RUN_DIR": str(run_dir), "SWEEPRUN_RUN_ID": run_id or Path(run_dir).name,
            "SWEEPRUN_SWEEP": "grid",
            "SWEEPRUN_PARAMS": '{"lr": 0.1}', "SWEEPRUN_ATTEMPT": str(attempt), **extra}


def launched(run_dir: Path, attempt: int, **options: Any) -> Trainer:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run = init(env=launcher_env(run_dir, attempt), clock=FakeClock(), **options)
    run.track(model=model, optimizer=optimizer)
    return Trainer(run, model, optimizer)


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    import sweeprun

    mode, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = sweeprun.init(params={}, local_dir=os.environ.get("OUT"), every_steps=2)
    run.track(model=model, optimizer=optimizer)
    run.restore()
    try:
        while run.step < steps:
            loss = model(torch.ones(4, 2)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if mode == "swallow-sigterm" and run.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            run.end_step(loss=loss.item())
    except SystemExit:
        if mode == "swallow-sigterm":
            sys.exit(0)        # a script that treats a stop request as success
        raise
    run.finish()
    """)


def script(tmp_path: Path, mode: str, steps: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    full = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPRUN_")}
    return subprocess.run([sys.executable, str(path), mode, str(steps)], capture_output=True, text=True,
                          env={**full, "PYTHONPATH": str(REPO), **env}, timeout=120)


# -- item 2: missing, unreadable, ill-typed, junk ---------------------------------------------


@pytest.mark.parametrize("damage", ["data file missing", "data file is a folder"])
def test_a_checkpoint_whose_data_is_gone_is_skipped_and_saving_goes_on(
        tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    t = Trainer.start(str(tmp_path), every_steps=2)
    t.train(6)
    t.run.close()
    newest = tmp_path / "checkpoints" / "ckpt-a1-00000003-step0000000006.pt"
    newest.unlink()
    if damage == "data file is a folder":
        newest.mkdir()
    capsys.readouterr()

    again = Trainer.start(str(tmp_path), every_steps=2)
    assert again.run.restore() and again.run.step == 4
    assert "resuming from ckpt-a1-00000002-step0000000004.pt (step 4)" in capsys.readouterr().err
    again.train(2)
    again.run.finish()
    assert load_checkpoint(tmp_path)["step"] == 6 == saved_steps(again.run)[-1]


@pytest.mark.parametrize("field", [{"seq": "one"}, {"data": 5}, {"step": None}, {"size": -1},
                                   {"metrics": {"loss": "low"}}, {"sha256": 7}])
def test_a_manifest_with_wrong_types_is_skipped_with_a_warning(
        tmp_path: Path, field: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    t = Trainer.start(str(tmp_path), every_steps=2)
    t.train(6)
    t.run.close()
    manifest = tmp_path / "checkpoints" / "ckpt-a1-00000003-step0000000006.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **field}))
    capsys.readouterr()

    again = Trainer.start(str(tmp_path), every_steps=2)
    assert again.run.restore() and again.run.step == 4
    again.train(4)
    again.run.finish()
    err = capsys.readouterr().err
    assert err.count(f"manifest {manifest} is unusable") == 1       # once per process, not per save
    assert load_checkpoint(tmp_path)["step"] == 8


def test_junk_in_the_checkpoints_folder_is_reported_once_and_left_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir(parents=True)
    for junk in ("notes.txt", "ckpt-latest.json", "ckpt-a1-00000001-step0000000002.pt.bak"):
        (folder / junk).write_text("mine")
    (folder / "ckpt-a1-00000005-step0000000002.json").mkdir()       # a folder with a manifest's name
    t = Trainer.start(str(tmp_path), every_steps=1)
    t.run.restore()
    t.train(6)
    t.run.finish()
    err = capsys.readouterr().err
    for junk in ("notes.txt", "ckpt-latest.json", "ckpt-a1-00000001-step0000000002.pt.bak",
                 "ckpt-a1-00000005-step0000000002.json"):
        assert err.count(f"{folder / junk} is not a checkpoint file") == 1
        assert (folder / junk).exists()
    assert load_checkpoint(tmp_path)["step"] == 6


def test_a_finished_run_leaves_no_set_aside_file_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old data files are renamed aside and unlinked on a helper thread, so a save does not
    wait for a big unlink; a run that says it finished has waited for those unlinks too."""
    import contextlib
    import time

    import sweeprun.store.local as local

    def slow_unlink(path: str) -> None:
        time.sleep(0.3)
        with contextlib.suppress(FileNotFoundError):    # the next save's prune may be first
            os.unlink(path)

    monkeypatch.setattr(local, "_unlink_quietly", slow_unlink)
    t = Trainer.start(str(tmp_path), every_steps=2, keep_last=1)
    t.train(6)
    t.run.finish()
    assert names(tmp_path) == ["ckpt-a1-00000004-step0000000006.json",
                               "ckpt-a1-00000004-step0000000006.pt"]


# -- items 3 and 4: fencing and names ---------------------------------------------------------


def test_a_stale_attempt_is_fenced_out_and_deletes_nothing_of_its_successor(tmp_path: Path) -> None:
    """The field report: a frozen launcher's old child wakes up after the run moved on."""
    stale = launched(tmp_path, attempt=1, every_steps=2, keep_last=1)
    stale.train(4)                                    # saved a1 at 2 and 4, then froze
    stale.run.wait()
    successor = launched(tmp_path, attempt=2, every_steps=2, keep_last=1)
    assert successor.run.restore() and successor.run.step == 4
    successor.train(4)
    successor.run.finish()
    before = {n: (tmp_path / "checkpoints" / n).read_bytes() for n in names(tmp_path)}
    assert all(n.startswith("ckpt-a2-") for n in before)

    with pytest.raises(LeaseLost, match="attempt 2 .* attempt 1 .* took the run over"):
        stale.train(2)                                # wakes up: its next save is fenced
        stale.run.wait()                              # (in the background: raised from here)
    stale.run.close()
    assert {n: (tmp_path / "checkpoints" / n).read_bytes() for n in names(tmp_path)} == before
    assert load_checkpoint(tmp_path)["step"] == 8


def test_a_fenced_process_on_an_object_store_leaves_the_metrics_alone() -> None:
    """Object stores rewrite an attempt's metrics object whole at each save and at close; a
    fenced process must not, and the run's metrics (the newest attempt's object) stay put."""
    import uuid

    import fsspec

    url = f"memory://sweeprun-tests/{uuid.uuid4().hex}/run"
    stale = launched(url, attempt=1, every_steps=2)    # type: ignore[arg-type]
    stale.train(2)
    stale.run.wait()
    successor = launched(url, attempt=2, every_steps=2)  # type: ignore[arg-type]
    successor.run.restore()
    successor.train(4)
    successor.run.finish()
    fs, path = fsspec.core.url_to_fs(url)
    before = fs.cat_file(f"{path}/metrics/attempt-2.jsonl")
    entries = read_metrics(fs, f"{path}/metrics.jsonl")
    with pytest.raises(LeaseLost), stale.run:
        stale.train(2)
    assert fs.cat_file(f"{path}/metrics/attempt-2.jsonl") == before
    assert read_metrics(fs, f"{path}/metrics.jsonl") == entries
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6]
    fs.rm(path, recursive=True)


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_a_newer_attempts_record_fences_saves_on_object_stores_too(
        request: pytest.FixtureRequest, store: str) -> None:
    """On an object store the fence is one LIST of attempts/: a record of attempt 2 there
    refuses attempt 1's next save before it writes anything, sync or in the background."""
    import uuid

    import fsspec

    if store == "s3":
        url = f"{request.getfixturevalue('s3_bucket')}/sweeps/grid/runs/r-1"
    else:
        url = f"memory://sweeprun-tests/{uuid.uuid4().hex}/r-1"
    fs, path = fsspec.core.url_to_fs(url)
    for async_save in (False, True):
        stale = launched(url, attempt=1, every_steps=2, async_save=async_save)  # type: ignore[arg-type]
        stale.train(2)
        stale.run.wait()
        fs.pipe(f"{path}/attempts/2.json", b'{"attempt": 2}\n')       # the launcher starts attempt 2
        before = sorted(fs.ls(f"{path}/checkpoints", detail=False))
        with pytest.raises(LeaseLost, match=r"attempt 2 has started \(.*/attempts/2.json\) and "
                                            r"this process is attempt 1 .* took the run over"):
            stale.train(2)
            stale.run.wait()
        stale.run.close()
        assert sorted(fs.ls(f"{path}/checkpoints", detail=False)) == before
        fs.rm(path, recursive=True)


@pytest.mark.slow  # a run trained, taken over and trained again: the full suite's
def test_a_fenced_process_exits_75_with_one_line(tmp_path: Path) -> None:
    assert script(tmp_path, "plain", 4, launcher_env(tmp_path, 2)).returncode == 0   # the successor
    before = {n: (tmp_path / "checkpoints" / n).read_bytes() for n in names(tmp_path)}
    result = script(tmp_path, "plain", 6, launcher_env(tmp_path, 1))
    assert result.returncode == PREEMPTED_EXIT, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sweeprun: error: attempt 2 has started") and "took the run over" in last
    assert "Traceback" not in result.stderr
    assert {n: (tmp_path / "checkpoints" / n).read_bytes() for n in names(tmp_path)} == before
    assert not (tmp_path / "attempts" / "1.finished").exists()


def test_restore_prefers_the_newest_attempt_over_a_larger_counter(tmp_path: Path) -> None:
    first = launched(tmp_path, attempt=1, every_steps=2, keep_last=10)
    first.train(4)                                    # a1 seq 1 (step 2), seq 2 (step 4)
    first.run.close()
    second = launched(tmp_path, attempt=2, every_steps=2, keep_last=10)
    second.run.restore()
    second.train(2)                                   # a2 seq 3 (step 6)
    second.run.close()
    folder = tmp_path / "checkpoints"                 # give a1 a far larger counter than a2
    old = "ckpt-a1-00000002-step0000000004"
    manifest = json.loads((folder / f"{old}.json").read_text())
    big = "ckpt-a1-00000050-step0000000004"
    (folder / f"{old}.pt").rename(folder / f"{big}.pt")
    (folder / f"{big}.json").write_text(json.dumps({**manifest, "seq": 50, "data": f"{big}.pt"}))
    (folder / f"{old}.json").unlink()

    third = launched(tmp_path, attempt=3, every_steps=2, keep_last=10)
    assert third.run.restore() and third.run.step == 6
    third.train(2)
    third.run.close()
    assert "ckpt-a3-00000051-step0000000008.pt" in names(tmp_path)


def test_standalone_attempts_count_up_so_the_newest_wins(tmp_path: Path) -> None:
    for expected in (1, 2, 3):
        t = Trainer.start(str(tmp_path), every_steps=2)
        assert t.run.attempt == expected
        t.run.restore()
        t.train(2)
        t.run.close()
    assert names(tmp_path)[-1] == "ckpt-a3-00000003-step0000000006.pt"


def test_a_stray_huge_counter_does_not_hide_the_next_save(tmp_path: Path) -> None:
    t = Trainer.start(str(tmp_path), every_steps=2)
    t.train(2)
    t.run.close()
    folder = tmp_path / "checkpoints"
    src, stray = "ckpt-a1-00000001-step0000000002", "ckpt-a1-99999999-step0000000002"
    (folder / f"{stray}.pt").write_bytes((folder / f"{src}.pt").read_bytes())
    manifest = json.loads((folder / f"{src}.json").read_text())
    (folder / f"{stray}.json").write_text(json.dumps({**manifest, "seq": 99999999, "data": f"{stray}.pt"}))

    again = Trainer.start(str(tmp_path), every_steps=2)
    assert again.run.restore()
    again.train(2)                                    # saves step 4 as seq 100000000 (nine digits)
    again.run.close()
    assert "ckpt-a2-100000000-step0000000004.pt" in names(tmp_path)
    third = Trainer.start(str(tmp_path), every_steps=2)
    assert third.run.restore() and third.run.step == 4
    third.run.close()


# -- item 5: metrics logged after the checkpoint -----------------------------------------------


def test_a_validation_entry_logged_after_the_save_is_not_duplicated_by_a_resume(tmp_path: Path) -> None:
    first = Trainer.start(str(tmp_path), every_steps=4)
    first.train(4)                                    # saved at step 4
    first.run.log(val_loss=0.5)                       # end of epoch, at step 4, after the save
    first.run.close()                                 # killed here
    second = Trainer.start(str(tmp_path), every_steps=4)
    assert second.run.restore() and second.run.step == 4
    second.run.log(val_loss=0.5)                      # the epoch's end is replayed
    second.train(1)
    second.run.finish()
    entries = metrics_of(second.run)
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 4, 5]
    assert [e for e in entries if "val_loss" in e] == [{"step": 4, "val_loss": 0.5}]


# -- item 6: dict subclasses -------------------------------------------------------------------


def test_counter_ordereddict_defaultdict_keep_their_types_in_extras(tmp_path: Path) -> None:
    run = init(local_dir=tmp_path, clock=FakeClock())
    counts = defaultdict(list, {"a": [1]})
    run.extras.update(c=Counter({3: 2, 7: 1}), o=OrderedDict(b=1, a=2), d=counts, s={1, 2})
    run.finish()
    again = init(local_dir=tmp_path, clock=FakeClock())
    again.restore()
    again.close()
    extras = again.extras
    assert type(extras["c"]) is Counter and extras["c"] == Counter({3: 2, 7: 1})
    assert type(extras["o"]) is OrderedDict and list(extras["o"]) == ["b", "a"]
    assert type(extras["d"]) is defaultdict and extras["d"].default_factory is list
    assert extras["d"] == {"a": [1]} and extras["s"] == {1, 2}


def test_an_extra_that_could_not_be_loaded_back_is_refused_at_the_save(tmp_path: Path) -> None:
    run = init(local_dir=tmp_path, clock=FakeClock())
    run.extras["config"] = {"opts": [argparse.Namespace(lr=0.1)]}
    with pytest.raises(CheckpointError, match=r"run.extras\['config'\]\['opts'\]\[0\] is a argparse.Namespace"):
        run.save()
    run.close()
    assert not list((tmp_path / "checkpoints").glob("*.pt"))


def test_sequential_lr_resumed_across_the_switch_over_is_bit_exact(tmp_path: Path) -> None:
    """MultiStepLR keeps its milestones in a Counter; a plain dict crashes SequentialLR at the switch."""

    def make() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=3)
        decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 4], gamma=0.5)
        return model, optimizer, torch.optim.lr_scheduler.SequentialLR(
            optimizer, [warmup, decay], milestones=[3])

    def train(run: Any, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
              until: int) -> list[float]:
        lrs = []
        while run.step < until:
            loss = model(torch.randn(8, 4)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            lrs.append(scheduler.get_last_lr()[0])
            run.end_step(loss=loss)
        return lrs

    model, optimizer, scheduler = make()
    ref = init(local_dir=tmp_path / "ref", clock=FakeClock(), every_steps=100)
    ref.track(model=model, optimizer=optimizer, scheduler=scheduler)
    ref_lrs = train(ref, model, optimizer, scheduler, 9)
    ref.finish()

    model, optimizer, scheduler = make()
    first = init(local_dir=tmp_path / "run", clock=FakeClock(), every_steps=2)
    first.track(model=model, optimizer=optimizer, scheduler=scheduler)
    lrs = train(first, model, optimizer, scheduler, 2)  # saved at 2, before the switch at 3
    first.close()
    model, optimizer, scheduler = make()
    torch.manual_seed(99)                              # a new process: the RNG comes from the checkpoint
    second = init(local_dir=tmp_path / "run", clock=FakeClock(), every_steps=2)
    second.track(model=model, optimizer=optimizer, scheduler=scheduler)
    assert second.restore() and second.step == 2
    lrs += train(second, model, optimizer, scheduler, 9)
    second.finish()
    assert lrs == ref_lrs
    got, want = load_checkpoint(tmp_path / "run"), load_checkpoint(tmp_path / "ref")
    assert_same_tree(got["objects"], want["objects"], "objects")


# -- item 7: started/finished markers ----------------------------------------------------------


def test_markers_say_the_script_used_the_api_and_reached_finish(tmp_path: Path) -> None:
    t = launched(tmp_path, attempt=3, every_steps=2)
    assert json.loads((tmp_path / "attempts" / "3.started").read_text()) == {"attempt": 3, "step": 0}
    t.train(3)
    assert not (tmp_path / "attempts" / "3.finished").exists()
    t.run.finish()
    assert json.loads((tmp_path / "attempts" / "3.finished").read_text()) == {"attempt": 3, "step": 3}
    assert load_checkpoint(tmp_path)["step"] == 3      # the final checkpoint is there first


def test_leaving_the_context_normally_finishes_and_an_error_does_not(tmp_path: Path) -> None:
    with launched(tmp_path / "ok", attempt=1).run as run:
        run.end_step()
    assert (tmp_path / "ok" / "attempts" / "1.finished").exists()
    with pytest.raises(RuntimeError), launched(tmp_path / "bad", attempt=1).run as run:
        raise RuntimeError("training diverged")
    assert (tmp_path / "bad" / "attempts" / "1.started").exists()
    assert not (tmp_path / "bad" / "attempts" / "1.finished").exists()


@pytest.mark.slow  # two torch starts; the fast subset has the exit codes of fenced and garbage-fed scripts
def test_a_script_that_swallows_sigterm_and_exits_0_leaves_no_finished_marker(tmp_path: Path) -> None:
    result = script(tmp_path, "swallow-sigterm", 6, launcher_env(tmp_path, 1))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "attempts" / "1.started").exists()
    assert not (tmp_path / "attempts" / "1.finished").exists()
    result = script(tmp_path, "plain", 6, launcher_env(tmp_path, 2))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "attempts" / "2.finished").read_text()) == {"attempt": 2, "step": 6}


# -- item 8: a standalone run never takes over a sweep's run -------------------------------------


@pytest.mark.parametrize("evidence", ["params.json", "attempts", "checkpoints of a run id"])
def test_standalone_init_refuses_a_sweep_run_directory(tmp_path: Path, evidence: str) -> None:
    if evidence == "params.json":
        tmp_path.joinpath("params.json").write_text('{"lr": 0.1}')
    elif evidence == "attempts":
        tmp_path.joinpath("attempts").mkdir()
        tmp_path.joinpath("attempts", "1.json").write_text("{}")
    else:
        t = launched(tmp_path, attempt=1, every_steps=1)
        t.train(2)
        t.run.close()
        for marker in ("attempts",):
            for f in (tmp_path / marker).iterdir():
                f.unlink()
            (tmp_path / marker).rmdir()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match="sweep|run lr=0.1-aaaa") as err:
        init(local_dir=tmp_path, clock=FakeClock())
    assert "\n" not in str(err.value) and "sweeprun launch" in str(err.value)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# -- item 9: hostile folders ----------------------------------------------------------------------


@pytest.mark.parametrize("data", ["/ABS/victim.pt", "../../victim.pt", "sub/victim.pt", "victim.pt",
                                  "ckpt-a1-00000001-step0000000002.pt"])
def test_a_crafted_manifest_is_never_followed(tmp_path: Path, data: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.pt"
    victim.write_bytes(b"precious")
    run_dir = tmp_path / "a" / "b"
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True)
    data = data.replace("/ABS", str(outside))
    crafted = "ckpt-a1-00000001-step0000000009.json"  # names another stem's data, or a path
    (folder / crafted).write_text(json.dumps({
        "attempt": 1, "seq": 1, "step": 9, "size": 8, "sha256": "0" * 64, "run_id": None,
        "sweep": None, "data": data, "metrics": {}, "created": 0.0, "format": 2}))
    (folder / "ckpt-a1-00000001-step0000000002.pt").write_bytes(b"precious too")

    t = Trainer.start(str(run_dir), every_steps=1, keep_last=1)
    assert not t.run.restore()
    t.train(4)
    t.run.finish()
    assert victim.read_bytes() == b"precious" and (folder / crafted).exists()
    assert f"manifest {folder / crafted} is unusable" in capsys.readouterr().err


def test_a_symlinked_checkpoints_folder_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("ckpt-a1-00000001-step0000000002.pt", ".tmp-ckpt-a1-00000001-step0000000002-x.pt"):
        (outside / name).write_bytes(b"precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(outside)
    with pytest.raises(CheckpointError, match="is a symlink") as err:
        init(local_dir=run_dir, clock=FakeClock())
    assert "\n" not in str(err.value)
    assert sorted(p.read_bytes() for p in outside.iterdir()) == [b"precious"] * 2


def test_a_symlinked_data_file_is_neither_read_nor_deleted(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    t = Trainer.start(str(tmp_path / "run"), every_steps=2, keep_last=1)
    t.train(2)
    t.run.close()
    folder = tmp_path / "run" / "checkpoints"
    data = folder / "ckpt-a1-00000001-step0000000002.pt"
    victim = tmp_path / "victim.pt"
    victim.write_bytes(data.read_bytes())              # even a byte-identical target is not followed
    data.unlink()
    data.symlink_to(victim)
    again = Trainer.start(str(tmp_path / "run"), every_steps=2, keep_last=1)
    with pytest.raises(CheckpointError, match="no checkpoint .* verifies"):
        again.run.restore()
    again.train(4)                                     # saving prunes the old one: never the target
    again.run.close()
    assert victim.exists() and data.is_symlink()


@pytest.mark.slow  # a launch with a torch start; symlinked checkpoint folders are refused in process above
def test_under_launch_a_symlinked_checkpoints_folder_fails_the_run_in_one_line(sandbox: Any) -> None:
    command = f"python {REPO}/examples/train_mlp.py --lr {{lr}} --seed 0 --epochs 1 --save-every-steps 4"
    sweep = sandbox.write_sweep({"lr": [0.01]}, command=command, max_attempts=1)
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (run_dir,) = (sandbox.store / "t" / "runs").iterdir()
    outside = sandbox.root / "outside"
    (run_dir / "checkpoints").rename(outside)
    (run_dir / "checkpoints").symlink_to(outside)
    (run_dir / "DONE").unlink()
    before = sorted((p.name, p.read_bytes()) for p in outside.iterdir())

    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 1
    log = (run_dir / "logs" / "attempt-2.log").read_text()
    assert log.count("\n") == 1 and "Traceback" not in log and "is a symlink" in log
    assert sorted((p.name, p.read_bytes()) for p in outside.iterdir()) == before


# -- item 10: cadence ----------------------------------------------------------------------------


def test_step_cadence_stays_on_multiples_after_a_sigterm_save(tmp_path: Path) -> None:
    t = Trainer.start(str(tmp_path), every_steps=5, keep_last=10, stop_signals=[signal.SIGUSR1])
    t.train(6)
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(SystemExit):
        t.train(1)                                     # saves at 7 and exits 75
    again = Trainer.start(str(tmp_path), every_steps=5, keep_last=10)
    again.run.restore()
    again.train(9)
    again.run.close()
    assert saved_steps(again.run) == [5, 7, 10, 15]


# -- item 11: the environment --------------------------------------------------------------------


GARBAGE = [
    ("SWEEPRUN_ATTEMPT", "abc"), ("SWEEPRUN_ATTEMPT", "0"), ("SWEEPRUN_ATTEMPT", "-1"),
    ("SWEEPRUN_ATTEMPT", ""), ("SWEEPRUN_PARAMS", "[1, 2]"), ("SWEEPRUN_PARAMS", "{not json"),
    ("SWEEPRUN_PARAMS", '"lr"'), ("SWEEPRUN_TIME_LIMIT", "-1"), ("SWEEPRUN_TIME_LIMIT", "nan"),
    ("SWEEPRUN_TIME_LIMIT", "abc"), ("SWEEPRUN_TIME_LIMIT", "inf")]


@pytest.mark.parametrize(("name", "value"), GARBAGE)
def test_environment_garbage_is_a_one_line_error_naming_the_variable_and_nothing_written(
        tmp_path: Path, name: str, value: str) -> None:
    """Every bad value, in process: the error a script's process turns into its one line
    (as the next test shows, with a real process for each variable)."""
    run_dir = tmp_path / "run"
    with pytest.raises(SpecError) as error:
        init(params={}, every_steps=2, env={**launcher_env(run_dir, 1), name: value}, clock=FakeClock())
    assert str(error.value).startswith(name)
    assert not run_dir.exists()


@pytest.mark.parametrize(("name", "value"), [  # a real process per variable; one in the fast subset
    GARBAGE[0], pytest.param(*GARBAGE[4], marks=pytest.mark.slow), pytest.param(*GARBAGE[7], marks=pytest.mark.slow)])
def test_environment_garbage_is_one_line_exit_2_and_nothing_written(
        tmp_path: Path, name: str, value: str) -> None:
    run_dir = tmp_path / "run"
    result = script(tmp_path, "plain", 2, {**launcher_env(run_dir, 1), name: value})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"sweeprun: error: {name}")
    assert not run_dir.exists()


def test_params_come_from_params_json_when_the_environment_has_none(tmp_path: Path) -> None:
    big = "x" * 200_000                                # too large for an environment variable
    (tmp_path / "params.json").write_text(json.dumps({"lr": 0.1, "vocab": big}))
    env = launcher_env(tmp_path, 1)
    del env["SWEEPRUN_PARAMS"]
    run = init(env=env, clock=FakeClock())
    run.close()
    assert run.params == {"lr": 0.1, "vocab": big}
    (tmp_path / "params.json").write_text("[1]")
    with pytest.raises(SpecError, match="params.json is a JSON list"):
        init(env=env, clock=FakeClock())


def test_metrics_file_is_read_by_the_status_parser() -> None:
    """sweeprun.sweep (status) reads metrics through this parser; it stays torch-free."""
    code = ("import sys; from sweeprun.training.metrics import parse_entries; "
            "assert 'torch' not in sys.modules; "
            "print(parse_entries(b'{\"step\": 1, \"loss\": 2}\\n{\"step\": 2'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    assert out.strip() == "[{'step': 1, 'loss': 2}]"


def test_read_metrics_helper_is_still_reachable(tmp_path: Path) -> None:
    t = Trainer.start(str(tmp_path), every_steps=2)
    t.train(2)
    t.run.finish()
    assert [e["step"] for e in read_metrics(t.run.paths.fs, t.run.paths.metrics)] == [1, 2]


def test_checkpoints_honour_the_umask_of_a_group_shared_store(tmp_path: Path) -> None:
    """Temp files are 0600; a checkpoint renamed from one must still be readable by the group."""
    previous = os.umask(0o002)
    try:
        trainer = Trainer.start(str(tmp_path / "run"), every_steps=1)
        trainer.train(2)
        trainer.run.finish()
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert modes and set(modes.values()) == {0o664}, modes


BREAKER = textwrap.dedent("""
    import sys, time
    import torch
    import sweeprun

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    with sweeprun.init(every_steps=1000) as run:
        run.track(model=model)
        run.restore()
        while run.step < 100000:
            time.sleep(0.01)
            if run.should_stop:  # the usual pattern: leave the loop, then the with block
                break
            run.end_step()
            if run.step == 5:
                print("ready", flush=True)
""")


def test_breaking_out_on_should_stop_is_a_preemption_not_the_end(tmp_path: Path) -> None:
    """A loop that breaks on `run.should_stop` and leaves `with run:` normally must not be
    mistaken for a finished run: it saves and exits 75, and writes no finished marker."""
    script = tmp_path / "breaker.py"
    script.write_text(BREAKER)
    run_dir = tmp_path / "run"
    env = {**os.environ, **launcher_env(run_dir, 1), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT, err
    assert (run_dir / "attempts" / "1.started").exists()
    assert not (run_dir / "attempts" / "1.finished").exists()
    assert load_checkpoint(run_dir)["step"] >= 5


def test_without_params_anywhere_the_scripts_own_params_are_used(tmp_path: Path) -> None:
    env = launcher_env(tmp_path / "run", 1)
    del env["SWEEPRUN_PARAMS"]
    run = init(params={"lr": 0.5}, env=env, clock=FakeClock())
    assert run.params == {"lr": 0.5}
    run.close()
