"""A Trainer script written as users write them, interrupted every way, ends as if it never was.

tests/scripts/hf_user.py: gradient accumulation (2 batches a step), evaluation and saves
every 5 steps, the best model reloaded at the end and written with ``save_model``,
``save_total_limit=2``, a collator that masks and noises with torch's global RNG (in
evaluation too), the loss logged every 2 steps, a plain list as the train data. It is run
once uninterrupted; then killed (SIGKILL from outside, inside a save, between the
Trainer's save and sweeprun's seal, right after the last seal), stopped with SIGTERM,
and run again until it ends. Every ending is compared with the uninterrupted one: the
last folder's weights, optimizer and scheduler, the best model ``save_model`` wrote,
``train()``'s ``train_loss``, and every line of metrics.jsonl, wall-clock figures aside.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sweeprun.runenv import PREEMPTED_EXIT

from _training_helpers import ScriptRun

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402  (a dependency of transformers)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "hf_user.py"
LAST = 24            # 4 epochs of 6 steps; saved and evaluated at 5, 10, 15, 20 and the end
BEST = 5             # the best eval_loss of this seed: the folder rotation must keep
CLOCK = ("_runtime", "_per_second")   # wall-clock figures: legitimately differ


@dataclass
class UserRun(ScriptRun):
    """tests/scripts/hf_user.py standalone, inheriting no ``SWEEPRUN_*`` variable; an
    interrupted run steps slowly so the signal lands where the test waits for it."""

    script: Path = SCRIPT
    unset_env: tuple[str, ...] = ("SWEEPRUN_*",)
    interrupt_flags: tuple[str, ...] = ("--step-sleep-s", "0.1")
    poll_s: float = 0.01
    timeout_s: float = 300

    @property
    def trainer_dir(self) -> Path:
        return self.out / "trainer"

    def entries(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    def last_step(self) -> int:
        return max((e["step"] for e in self.entries()), default=0)

    def sealed(self) -> list[int]:
        return sorted(int(p.parent.name.split("-")[1])
                      for p in self.trainer_dir.glob("checkpoint-*/sweeprun-seal.json"))


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flat(value, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in flat(value, f"{prefix}/{i}").items()}
    return {prefix: obj}


def ending(run: UserRun, last_step: int = LAST) -> dict[str, Any]:
    """Everything a run ends with that does not depend on the clock."""
    last = run.trainer_dir / f"checkpoint-{last_step}"
    summary = json.loads((run.out / "train_output.json").read_text())
    return {
        "weights": load_file(last / "model.safetensors"),
        "optimizer": flat(torch.load(last / "optimizer.pt", weights_only=True)),
        "scheduler": flat(torch.load(last / "scheduler.pt", weights_only=True)),
        "best model": load_file(run.trainer_dir / "best-model" / "model.safetensors"),
        "train_loss": (summary["training_loss"], summary["metrics"]["train_loss"]),
        "summary": {k: v for k, v in summary["metrics"].items() if not k.endswith(CLOCK)},
        "best": os.path.basename(summary["best"]),
        "metrics": [{k: v for k, v in e.items() if not k.endswith(CLOCK)} for e in run.entries()],
    }


def differences(run: UserRun, reference: UserRun, last_step: int = LAST) -> list[str]:
    mine, theirs = ending(run, last_step), ending(reference, last_step)
    out = []
    for part in ("weights", "optimizer", "scheduler", "best model"):
        assert mine[part].keys() == theirs[part].keys(), part
        out += [f"{part} {key}" for key, value in theirs[part].items()
                if not (torch.equal(mine[part][key], value) if isinstance(value, torch.Tensor)
                        else mine[part][key] == value)]
    out += [f"{part}: {mine[part]} != {theirs[part]}" for part in ("train_loss", "summary", "best")
            if mine[part] != theirs[part]]
    out += [f"metrics.jsonl line {i + 1}: {a} != {b}"
            for i, (a, b) in enumerate(zip(mine["metrics"], theirs["metrics"], strict=False)) if a != b]
    if len(mine["metrics"]) != len(theirs["metrics"]):
        out.append(f"metrics.jsonl: {len(mine['metrics'])} lines, {len(theirs['metrics'])} expected")
    return out


def finish(run: UserRun, *flags: str, last_step: int = LAST) -> subprocess.CompletedProcess[str]:
    result = run.complete(*flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith(f"done: step {last_step}"), result.stdout
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> UserRun:
    run = UserRun(tmp_path_factory.mktemp("reference"))
    finish(run)
    assert ending(run)["best"] == f"checkpoint-{BEST}"   # an early best: rotation must spare it
    assert not torch.equal(load_file(run.trainer_dir / "best-model" / "model.safetensors")["bert.embeddings"
                                     ".word_embeddings.weight"],
                           load_file(run.trainer_dir / f"checkpoint-{LAST}" / "model.safetensors")[
                               "bert.embeddings.word_embeddings.weight"])
    return run


@pytest.mark.slow  # a reference and three Trainer starts; test_hf_trainer's fast tests cover the seal
def test_a_kill_between_the_trainers_save_and_the_seal_resumes_mid_window_and_mid_epoch(
        tmp_path: Path, reference: UserRun) -> None:
    """The save at step 10 is cut short: the run resumes from step 5, in the middle of an
    epoch (6 steps) and of a logging window (the loss of steps 5 and 6 is logged at 6)."""
    run = UserRun(tmp_path / "run")
    crashed = run.complete(env={"SWEEPRUN_CRASH_AT": "checkpoint.before_manifest@2"})
    assert crashed.returncode == -signal.SIGKILL
    result = finish(run)
    assert "checkpoint-10 (it was never sealed" in result.stderr
    assert "resuming from" in result.stderr and "(step 5)" in result.stderr
    assert differences(run, reference) == []


@pytest.mark.slow  # two Trainer starts; the fast subset resumes a cut-short save in the test above
def test_rotation_waits_for_the_seal_and_spares_the_best(tmp_path: Path, reference: UserRun) -> None:
    """Killed in the save at step 15, before its seal: the Trainer would already have deleted
    checkpoint-10 to keep two folders (the best, 5, is spared), leaving only step 5."""
    run = UserRun(tmp_path / "run")
    crashed = run.complete(env={"SWEEPRUN_CRASH_AT": "checkpoint.before_manifest@3"})
    assert crashed.returncode == -signal.SIGKILL
    assert run.sealed() == [5, 10]
    result = finish(run)
    assert "(step 10)" in result.stderr
    assert {p.name for p in run.trainer_dir.glob("checkpoint-*")} == {
        f"checkpoint-{BEST}", f"checkpoint-{LAST}"}
    assert differences(run, reference) == []


@pytest.mark.slow  # the fast subset has the same ending for the example in test_hf_trainer
def test_killed_right_after_the_last_seal_the_rerun_reloads_the_best_model(
        tmp_path: Path, reference: UserRun) -> None:
    """The last folder is sealed, the process dies before train() returns: the rerun trains
    nothing, reloads the best model as the Trainer's end does, and reports its train_loss."""
    shutil.copytree(reference.out, tmp_path / "run")
    run = UserRun(tmp_path / "run")
    shutil.rmtree(run.trainer_dir / "best-model")
    (run.out / "train_output.json").unlink()
    result = finish(run)
    assert f"checkpoint-{LAST} is the last step ({LAST}); nothing left to train" in result.stderr
    assert differences(run, reference) == []
    summary = json.loads((run.out / "train_output.json").read_text())
    assert summary["best"] == str(run.trainer_dir / f"checkpoint-{BEST}")   # its own copy, not the reference's


@pytest.mark.slow
def test_with_an_odd_number_of_batches_an_epoch_ends_on_a_one_batch_step(tmp_path: Path) -> None:
    """104 examples: 13 batches an epoch (7 steps), so each epoch's last step accumulates one
    batch. Killed before the seal of step 14, the run resumes at the end of epoch 0 (step 7,
    just after its one-batch step) and crosses two more such steps as the reference does."""
    flags = ("--examples", "104", "--epochs", "3", "--save-steps", "7")
    reference, run = UserRun(tmp_path / "reference"), UserRun(tmp_path / "run")
    finish(reference, *flags, last_step=21)
    crashed = run.complete(*flags, env={"SWEEPRUN_CRASH_AT": "checkpoint.before_manifest@2"})
    assert crashed.returncode == -signal.SIGKILL
    result = finish(run, *flags, last_step=21)
    assert "(step 7)" in result.stderr
    assert differences(run, reference, last_step=21) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11])
def test_sigkill_at_random_moments_then_rerun_ends_the_same(
        tmp_path: Path, reference: UserRun, seed: int) -> None:
    run = UserRun(tmp_path / "run")
    rng = random.Random(seed)
    for _ in range(2):
        target = rng.randint(run.last_step() + 1, run.last_step() + 9)
        code, err = run.interrupt_when(lambda t=target: run.last_step() >= t, signal.SIGKILL)
        assert code == -signal.SIGKILL, err
    finish(run)
    assert differences(run, reference) == []


@pytest.mark.slow
def test_sigterm_saves_at_the_step_end_and_the_rerun_ends_the_same(
        tmp_path: Path, reference: UserRun) -> None:
    """SIGTERM lands anywhere, often between the two batches of a step: the save waits for
    the step to end (never a half-accumulated gradient), the process exits 75, and the
    rerun ends as the uninterrupted run. (The stop can fall on a cadence step, 10: metrics
    lines reach the file in bursts, so the step seen when signalling can be 9.)"""
    run = UserRun(tmp_path / "run")
    code, err = run.interrupt_when(lambda: run.last_step() >= 7, signal.SIGTERM)
    assert code == PREEMPTED_EXIT, err
    stopped = int(err.split("SIGTERM received; saved and sealed checkpoint-")[1].split(";")[0])
    assert stopped >= 7 and stopped in run.sealed()
    finish(run)
    assert differences(run, reference) == []


@pytest.mark.slow
def test_under_launch_a_run_killed_after_each_new_seal_is_not_failed_and_ends_the_same(
        sandbox: Any, reference: UserRun) -> None:
    """The machine dies (the launcher and its child, SIGKILL) right after a new sealed folder:
    the first (step 5), one mid-epoch (15) and the last (24). Each attempt is lost with its
    worker, but each made progress, so ``max_lost`` (1) is never reached: the run ends done,
    as never interrupted. (Two Trainer starts fewer than a kill at each of the five seals
    with ``max_lost`` 2: still more kills than ``max_lost``, the same three cases.)"""
    command = f"{sys.executable} {SCRIPT} --seed {{seed}} --step-sleep-s 0.2"
    sweep = sandbox.write_sweep({"seed": [3]}, name="hf", command=command, max_lost=1)
    runs = sandbox.store / "hf" / "runs"

    def sealed() -> set[int]:
        found = list(runs.iterdir()) if runs.exists() else []
        return set(UserRun(found[0]).sealed()) if found else set()

    kills = 0
    for target in (5, 15, LAST, None):   # None: the launch after the last kill finishes
        proc = sandbox.sweeprun("launch", str(sweep))
        deadline = time.monotonic() + 300   # only a guard against a hang
        while proc.poll() is None and target is not None and target not in sealed() \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None and target is not None:
            os.killpg(proc.pid, signal.SIGKILL)   # the child dies with its launcher
            kills += 1
        out, err = proc.communicate(timeout=300)
        if proc.returncode != -signal.SIGKILL:
            break
    assert proc.returncode == 0, out + err
    assert kills >= 2   # more than max_lost; the last one most often after the final seal
    (row,) = sandbox.status(sweep).values()
    assert (row["state"], row["step"]) == ("done", LAST)
    (run_dir,) = runs.iterdir()
    assert (run_dir / "DONE").exists()
    assert differences(UserRun(run_dir), reference) == []


@pytest.mark.slow
def test_in_a_bucket_a_new_machine_resumes_with_the_best_models_folder(
        s3_bucket: str, tmp_path: Path, reference: UserRun) -> None:
    """The run directory is a bucket; the save at step 15 is cut short before its seal. The
    rerun on another machine (an empty staging folder) downloads the newest sealed folder
    and the best model's (step 5), so the Trainer reloads the best at the end; the launcher
    counts the store's sealed folders as the run's progress."""
    pytest.importorskip("s3fs")
    from sweeprun import open_store
    from sweeprun.store import RunPaths
    from sweeprun.training.metrics import read_run_metrics
    from sweeprun.training.sealed import sealed_names

    url = f"{s3_bucket}/user-run"
    run = UserRun(url)  # type: ignore[arg-type]  (a URL where a local run has a path)
    crashed = run.complete(env={"SWEEPRUN_HOME": str(tmp_path / "machine-a"),
                                "SWEEPRUN_CRASH_AT": "checkpoint.before_manifest@3"})
    assert crashed.returncode == -signal.SIGKILL
    store = open_store(url)
    assert set(sealed_names(store.fs, store.root)) == {f"checkpoint-{BEST}", "checkpoint-10"}
    result = run.complete(env={"SWEEPRUN_HOME": str(tmp_path / "machine-b")})
    assert result.returncode == 0, result.stderr
    assert "(step 10)" in result.stderr and "best model" not in result.stderr
    (summary_file,) = (tmp_path / "machine-b").rglob("train_output.json")
    summary = json.loads(summary_file.read_text())
    expected = ending(reference)
    assert (summary["training_loss"], os.path.basename(summary["best"])) == (
        expected["train_loss"][0], f"checkpoint-{BEST}")
    best = load_file(summary_file.parent / "trainer" / "best-model" / "model.safetensors")
    assert all(torch.equal(best[k], v) for k, v in expected["best model"].items())
    entries = read_run_metrics(RunPaths(store.fs, store.root))
    assert [{k: v for k, v in e.items() if not k.endswith(CLOCK)} for e in entries] == expected["metrics"]
