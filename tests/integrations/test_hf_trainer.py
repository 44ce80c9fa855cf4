"""The Hugging Face Trainer under sweeprun, shown with real processes.

Each test starts examples/hf_trainer.py standalone (``--out``): a tiny GPT-2 with
dropout, shuffled data and an augmentation drawing from Python's, NumPy's and torch's
global RNGs (``--torch-augment``, the hard case: with accelerate's look-ahead, batch k+1
is fetched before step k trains, so the dataset's torch draws interleave with dropout,
and a resumed process creates a new data-loader iterator, one more torch draw, before
its first fetch; sweeprun restores the CPU RNGs at that first fetch, and torch's state
at the save right after it). It is interrupted from outside (SIGKILL, SIGTERM) or kills itself between the
Trainer's save and sweeprun's seal, then the same command is run again until it
finishes; the final weights and optimizer state must be ``torch.equal`` to a run
never interrupted, and the loss at every step the same.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sweeprun.runenv import PREEMPTED_EXIT

from _training_helpers import ScriptRun, made_once

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402  (a dependency of transformers)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "hf_trainer.py"
TOTAL_STEPS = 40  # 16 steps per epoch: saves (every 5) land mid-epoch and across epochs
FLAGS = ("--lr", "3e-3", "--seed", "5", "--max-steps", str(TOTAL_STEPS), "--save-steps", "5",
         "--torch-augment")


@dataclass
class HFRun(ScriptRun):
    """examples/hf_trainer.py standalone; an interrupted run steps slowly so the signal lands mid-run."""

    flags: tuple[str, ...] = FLAGS
    script: Path = EXAMPLE
    unset_env: tuple[str, ...] = ("SWEEPRUN_RUN_DIR", "SWEEPRUN_TIME_LIMIT", "SWEEPRUN_CRASH_AT")
    interrupt_flags: tuple[str, ...] = ("--step-sleep-s", "0.05")
    poll_s: float = 0.01
    timeout_s: float = 300

    @property
    def trainer_dir(self) -> Path:
        return self.out / "trainer"

    def entries(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().split("\n")[:-1]]

    def last_step(self) -> int:
        return max((e["step"] for e in self.entries()), default=0)

    def final(self, step: int = TOTAL_STEPS) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights and optimizer state of the Trainer's folder at ``step`` (the last is always saved)."""
        folder = self.trainer_dir / f"checkpoint-{step}"
        return (load_file(folder / "model.safetensors"),
                torch.load(folder / "optimizer.pt", weights_only=True))


def tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested state into ``path -> leaf``."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in tensors(value, f"{prefix}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in tensors(value, f"{prefix}/{i}").items()}
    return {prefix: obj}


def differences(run: HFRun, reference: HFRun, step: int = TOTAL_STEPS) -> list[str]:
    weights, optimizer = run.final(step)
    ref_weights, ref_optimizer = reference.final(step)
    out = [f"weights {k}: max |diff| {(weights[k].double() - v.double()).abs().max():.3g}"
           for k, v in ref_weights.items() if not torch.equal(weights[k], v)]
    mine, theirs = tensors(optimizer), tensors(ref_optimizer)
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        same = torch.equal(mine[key], value) if isinstance(value, torch.Tensor) else mine[key] == value
        if not same:
            out.append(f"optimizer {key}")
    return out


def losses(run: HFRun) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in run.entries() if "loss" in e}


def assert_same_run(run: HFRun, reference: HFRun) -> None:
    assert differences(run, reference) == []
    assert losses(run) == losses(reference)
    assert sorted(losses(run)) == list(range(1, TOTAL_STEPS + 1))   # one entry per step, no replay


def reference_stdout_last_line(reference: HFRun) -> str:
    """The example prints its first weights at the end; the reference printed them too."""
    return (reference.out / "stdout.txt").read_text().splitlines()[-1]


@pytest.fixture(scope="session")
def reference(shared_dir: Path) -> HFRun:
    """The run never interrupted. Once per session (:func:`made_once`), not per module:
    test_hf_s3 compares against it too, often from another xdist worker."""
    def train(out: Path) -> None:
        result = HFRun(out).complete()
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].startswith(f"done: step {TOTAL_STEPS}")
        (out / "stdout.txt").write_text(result.stdout)

    return HFRun(made_once(shared_dir, "hf-trainer-reference", train))


@pytest.mark.slow  # four processes that each load transformers
@pytest.mark.parametrize("seed", [3])
def test_sigkill_at_random_steps_then_rerun_ends_bit_for_bit(
        tmp_path: Path, reference: HFRun, seed: int) -> None:
    run = HFRun(tmp_path / "run")
    rng = random.Random(seed)
    for _ in range(2):
        target = rng.randint(run.last_step() + 2, run.last_step() + 15)
        code, seen, err = run.interrupt_at(target, signal.SIGKILL)
        assert code == -signal.SIGKILL, err
        assert 0 < seen < TOTAL_STEPS
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "sweeprun: resuming from" in result.stderr
    assert_same_run(run, reference)


@pytest.mark.slow
def test_kill_between_the_trainer_save_and_the_seal_resumes_from_the_previous_folder(
        tmp_path: Path, reference: HFRun) -> None:
    """The Trainer's third save (step 15) is complete on disk but never sealed: skipped."""
    run = HFRun(tmp_path / "run")
    result = run.complete(env={"SWEEPRUN_CRASH_AT": "checkpoint.before_manifest@3"})
    assert result.returncode == -signal.SIGKILL
    assert not (run.trainer_dir / "checkpoint-15" / "sweeprun-seal.json").exists()
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "checkpoint-15 (it was never sealed (the save was cut short))" in result.stderr
    assert "resuming from checkpoint-10" in result.stderr
    assert_same_run(run, reference)


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_cut_short_folders_are_skipped(
        tmp_path: Path, reference: HFRun) -> None:
    run = HFRun(tmp_path / "run")
    code, seen, err = run.interrupt_at(22, signal.SIGTERM)
    assert code == PREEMPTED_EXIT, err
    stopped = run.entries()[-1]["step"]
    assert f"SIGTERM received; saved and sealed checkpoint-{stopped}; exiting with 75" in err
    assert (run.trainer_dir / f"checkpoint-{stopped}" / "sweeprun-seal.json").exists()
    # damage the newest folders three ways: a truncated weights file, a missing file, no seal
    folders = sorted(int(p.name.split("-")[1]) for p in run.trainer_dir.glob("checkpoint-*"))
    newest = folders[-3:]
    weights = run.trainer_dir / f"checkpoint-{newest[2]}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (run.trainer_dir / f"checkpoint-{newest[1]}" / "optimizer.pt").unlink()
    (run.trainer_dir / f"checkpoint-{newest[0]}" / "sweeprun-seal.json").unlink()
    result = run.complete()
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "folder(s) skipped" in line)
    assert f"checkpoint-{newest[2]} (model.safetensors is truncated or changed" in warning
    assert f"checkpoint-{newest[1]} (optimizer.pt is missing)" in warning
    assert f"checkpoint-{newest[0]} (it was never sealed" in warning
    assert f"resuming from checkpoint-{folders[-4]}" in warning
    rejected = run.trainer_dir / ".sweeprun-rejected"
    assert sorted(p.name.rsplit("-a", 1)[0] for p in rejected.iterdir()) \
        == sorted(f"checkpoint-{s}" for s in newest)  # kept aside, never written into again
    assert_same_run(run, reference)


def test_time_budget_saves_and_exits_75(tmp_path: Path) -> None:
    run = HFRun(tmp_path / "run")
    result = run.complete("--step-sleep-s", "0.3", env={"SWEEPRUN_TIME_LIMIT": "2"})
    assert result.returncode == PREEMPTED_EXIT, result.stderr
    assert "time limit of 2 s reached; saved and sealed checkpoint-" in result.stderr
    stopped = run.entries()[-1]["step"]
    assert 0 < stopped < TOTAL_STEPS
    assert (run.trainer_dir / f"checkpoint-{stopped}" / "sweeprun-seal.json").exists()


@pytest.mark.slow
def test_without_the_early_rng_restore_the_trainer_diverges_at_the_first_resumed_step(
        tmp_path: Path, reference: HFRun) -> None:
    """Why sweeprun-rng.pt exists: left to itself, the Trainer restores the Python/NumPy
    RNGs after the first resumed batches were fetched, so their augmentation differs."""
    run = HFRun(tmp_path / "run")
    code, _, err = run.interrupt_at(12, signal.SIGTERM)
    assert code == PREEMPTED_EXIT, err
    stopped = run.entries()[-1]["step"]
    for rng_file in run.trainer_dir.glob("checkpoint-*/sweeprun-rng.pt"):
        rng_file.unlink()
        (rng_file.parent / "sweeprun-seal.json").unlink()  # re-sealed below, as if never written
    from sweeprun.integrations.transformers import seal

    for folder in run.trainer_dir.glob("checkpoint-*"):
        seal(str(folder), int(folder.name.split("-")[1]), {"metrics_bytes": None})
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "sweeprun-rng.pt is missing" in result.stderr
    mine, theirs = losses(run), losses(reference)
    assert [s for s in mine if mine[s] != theirs[s]][0] == stopped + 1
    assert differences(run, reference) != []


@pytest.mark.slow
def test_under_launch_a_time_budget_splits_the_run_into_attempts_that_end_bit_for_bit(
        sandbox: Any, reference: HFRun) -> None:
    """Each attempt saves, seals and exits 75 before SWEEPRUN_TIME_LIMIT; the launcher
    resumes it until the Trainer reaches its last step, and the run is done."""
    command = f"{sys.executable} {EXAMPLE} {' '.join(FLAGS)} --step-sleep-s 0.1 --batch-size {{bs}}"
    sweep = sandbox.write_sweep({"bs": [16]}, name="hf", command=command)
    result = sandbox.run("launch", str(sweep), env={"SWEEPRUN_TIME_LIMIT": "3"}, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "interrupted (exit 75" in result.stdout and "done (exit 0" in result.stdout
    (run_dir,) = (sandbox.store / "hf" / "runs").iterdir()
    assert (run_dir / "DONE").exists()
    run = HFRun(run_dir)
    assert_same_run(run, reference)
    (row,) = sandbox.status(sweep).values()
    assert (row["state"], row["step"], row["attempts"] > 1) == ("done", TOTAL_STEPS, True)
    assert row["metric"] == {"loss": losses(reference)[TOTAL_STEPS]}   # status shows the Trainer's logs


@pytest.mark.slow  # a variant: the fast subset keeps the file's other tests
def test_rerun_after_the_last_step_was_sealed_trains_nothing(tmp_path: Path, reference: HFRun) -> None:
    """A kill after the final seal (during the script's own post-training code) must not
    make the Trainer train a step past max_steps when the same command runs again."""
    shutil.copytree(reference.out, tmp_path / "run")
    run = HFRun(tmp_path / "run")
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert f"checkpoint-{TOTAL_STEPS} is the last step ({TOTAL_STEPS}); nothing left to train" in result.stderr
    assert result.stdout.splitlines()[-1] == reference_stdout_last_line(reference)
    assert not (run.trainer_dir / f"checkpoint-{TOTAL_STEPS + 1}").exists()
    assert run.entries() == reference.entries()


def test_output_dir_outside_the_run_is_refused_in_one_line(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from sweeprun.errors import SpecError
    from sweeprun.integrations import transformers as sweeprun_hf

    run = sweeprun_hf.init(params={}, local_dir=tmp_path / "run")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=8, n_positions=4, n_embd=8, n_layer=1, n_head=1))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "elsewhere"),
                                                          report_to=[], use_cpu=True))
    with pytest.raises(SpecError, match=r"is not the run's folder .*: give output_dir=run.output_dir"):
        run.train(trainer)
    run.run.close()


def test_the_cli_and_the_package_never_import_transformers() -> None:
    code = ("import sys, sweeprun, sweeprun.cli, sweeprun.training, sweeprun.integrations; "
            "print(sorted(m for m in ('transformers', 'accelerate', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_process_whose_run_was_taken_over_writes_no_checkpoint(tmp_path: Path) -> None:
    """Attempt 2 of the run has started elsewhere: attempt 1 (a machine that froze and woke
    up) stops at its next save, before the Trainer writes anything, and exits 75."""
    run = HFRun(tmp_path / "run")
    (run.out / "attempts").mkdir(parents=True)
    (run.out / "attempts" / "2.json").write_text("{}\n")
    result = run.complete(env={"SWEEPRUN_RUN_DIR": str(run.out), "SWEEPRUN_ATTEMPT": "1"})
    assert result.returncode == PREEMPTED_EXIT, result.stderr
    assert "another worker took the run over; stopping without writing" in result.stderr
    assert not list(run.trainer_dir.glob("checkpoint-*"))


@pytest.mark.slow  # a Trainer start; the fast subset saves and exits 75 on a time budget
def test_sigint_saves_and_exits_75_at_the_step_it_stopped(tmp_path: Path) -> None:
    run = HFRun(tmp_path / "run")
    code, _, err = run.interrupt_at(8, signal.SIGINT)
    assert code == PREEMPTED_EXIT, err
    stopped = run.entries()[-1]["step"]
    assert f"SIGINT received; saved and sealed checkpoint-{stopped}; exiting with 75" in err
    assert (run.trainer_dir / f"checkpoint-{stopped}" / "sweeprun-seal.json").exists()


@pytest.mark.slow
def test_when_no_sealed_folder_verifies_the_run_stops_in_one_line_and_keeps_them(tmp_path: Path) -> None:
    """Damage everywhere is not a reason to start over silently: exit 2, folders untouched."""
    run = HFRun(tmp_path / "run")
    code, _, err = run.interrupt_at(6, signal.SIGTERM)
    assert code == PREEMPTED_EXIT, err
    for weights in run.trainer_dir.glob("checkpoint-*/model.safetensors"):
        weights.write_bytes(b"")
    for _ in range(2):  # the second try meets the same error: nothing was moved
        result = run.complete()
        assert result.returncode == 2, result.stderr
        (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("sweeprun: error:")]
        assert "verifies" in line and "model.safetensors is truncated or changed: 0 bytes" in line
        assert "delete the folder to start the run over" in line
    assert not (run.trainer_dir / ".sweeprun-rejected").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "resumed_from"), [
    (("--save-steps", "8"), 16),                     # the end of an epoch (16 steps): nothing fetched ahead
    (("--grad-accum", "2", "--max-steps", "20"), 10),  # two batches a step; 8 steps an epoch
])
def test_resume_at_an_epoch_end_and_with_gradient_accumulation_is_exact(
        tmp_path: Path, reference: HFRun, flags: tuple[str, ...], resumed_from: int) -> None:
    """Saving every 8 steps trains what saving every 5 does: the session's reference. Two
    batches a step is another training, with its own reference."""
    run = HFRun(tmp_path / "run")
    if "--grad-accum" in flags:
        reference = HFRun(tmp_path / "reference")
        assert reference.complete(*flags).returncode == 0
    crashed = run.complete(*flags, env={"SWEEPRUN_CRASH_AT": "checkpoint.before_manifest@3"})
    assert crashed.returncode == -signal.SIGKILL
    result = run.complete(*flags)
    assert result.returncode == 0, result.stderr
    assert f"resuming from checkpoint-{resumed_from}" in result.stderr
    assert differences(run, reference, step=max(losses(reference))) == []
    assert losses(run) == losses(reference)


def test_the_integrations_reach_the_run_through_public_names_only() -> None:
    """What the Trainer and Lightning callbacks need of a run is public API, so a user's own
    framework integration can do the same: no ``run._x`` (nor ``self.run._x``) anywhere."""
    import ast

    for module in ("transformers.py", "hf_rng.py", "hf_loop.py", "hf_store.py", "lightning.py"):
        tree = ast.parse((REPO / "sweeprun" / "integrations" / module).read_text())
        private = [f"{module}:{node.lineno} {ast.unparse(node)}" for node in ast.walk(tree)
                   if isinstance(node, ast.Attribute) and node.attr.startswith("_")
                   and not node.attr.startswith("__")
                   and ast.unparse(node.value) in ("run", "self.run", "self.callback.run")]
        imported = [f"{module}: {alias.name}" for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("training.")
                    for alias in node.names if alias.name.startswith("_")]
        assert private == [] and imported == []


def test_a_framework_that_writes_its_own_checkpoints_uses_the_public_run_api(tmp_path: Path) -> None:
    """The five calls an integration makes: resume_at, flush_metrics, fence, stop_reason,
    mark_finished, as a loop that saves ``{"step", "metrics_bytes"}`` files of its own."""
    from sweeprun.training import init

    def train(until: int, env: dict[str, str]) -> int:
        run = init(params={}, local_dir=tmp_path / "run", every_s=None, every_steps=10**9, env=env)
        mine = tmp_path / "run" / "my-checkpoint.json"
        if mine.exists():                              # the framework restores its own state...
            saved = json.loads(mine.read_text())
            run.resume_at(saved["step"], metrics_bytes=saved["metrics_bytes"])  # ...and the run follows
        while run.step < until and run.stop_reason is None:
            run.step += 1
            run.log(loss=1.0 / run.step)
            if run.step % 3 == 0:
                run.fence()                            # nobody took the run over: write
                record = {"step": run.step, "metrics_bytes": run.flush_metrics()}
                mine.write_text(json.dumps(record))
        run.close()
        run.mark_finished()                            # standalone: nothing to mark
        return run.step

    env = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPRUN_")}
    assert train(7, env) == 7                          # saved at 6; step 7 is logged past it
    assert train(10, env) == 10                        # resumed at 6: metrics cut back, no replay
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == list(range(1, 11))
    run = init(params={}, local_dir=tmp_path / "other", env=env)
    run.log(loss=0.0)
    with pytest.raises(RuntimeError, match="resume_at\\(\\) must come before the run's first log"):
        run.resume_at(3, metrics_bytes=0)
    run.close()


def test_the_automatic_interval_learns_from_the_trainers_own_saves(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``every_s="auto"`` (the default): the first time save comes at ``min_every_s`` (30 s);
    then the cost of what training waited for (the Trainer's writing after the step, and the
    seal) sets the next interval by Young/Daly: 2 s a save and 6 h between interruptions
    give sqrt(2 x 2 x 21600) = 294 s."""
    from types import SimpleNamespace

    from sweeprun.integrations.transformers import init

    now = [0.0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPRUN_")}
    callback = init(params={}, local_dir=tmp_path / "run", clock=lambda: now[0], env=env)
    state = SimpleNamespace(global_step=0, max_steps=10**6, is_world_process_zero=True,
                            best_model_checkpoint=None)
    args = SimpleNamespace(output_dir=callback.output_dir, save_total_limit=None)

    def step(seconds: float) -> bool:
        now[0] += seconds
        state.global_step += 1
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        callback.on_step_end(args, state, control)
        return control.should_save

    assert [step(10.0) for _ in range(3)] == [False, False, True]    # 30 s: the first, to measure
    folder = Path(callback.output_dir) / f"checkpoint-{state.global_step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    now[0] += 2.0                                                     # the Trainer writes for 2 s
    callback.on_save(args, state, SimpleNamespace())
    assert "checkpoint interval 294 s" in capsys.readouterr().err
    due = [step(10.0) for _ in range(30)]
    assert due.index(True) == 29                                      # 290 s not yet, 300 s due
    callback.run.close()


def test_no_time_cadence_leaves_the_saves_to_the_trainer(tmp_path: Path) -> None:
    """``every_s=None``: only the Trainer's own ``save_steps`` (and the last step, and a stop)."""
    from types import SimpleNamespace

    from sweeprun.integrations.transformers import init

    now = [0.0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPRUN_")}
    callback = init(params={}, local_dir=tmp_path / "run", every_s=None, clock=lambda: now[0], env=env)
    state = SimpleNamespace(global_step=0, max_steps=10**6)
    due = []
    for _ in range(50):
        now[0] += 100.0
        state.global_step += 1
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        callback.on_step_end(SimpleNamespace(), state, control)
        due.append(control.should_save)
    callback.run.close()
    assert not any(due)
