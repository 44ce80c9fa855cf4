"""Chaos: a 3x3 sweep of the real example under two launchers whose process groups are
killed at random moments (SIGKILL as a lost machine, SIGTERM as a preemption notice)
and restarted, until every run is done. Then every run must equal an uninterrupted
reference bit for bit, no run may ever have had two processes, and a relaunch starts
nothing. The figures are printed (run with -s) and, with SWEEPRUN_CHAOS_REPORT=path,
written as JSON for the README's reliability section.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sweeprun.training import load_checkpoint

from _training_helpers import REPO, SIGKILL, SIGTERM, ExampleRun, assert_same_tree, made_once
from _zygote import preload_for, spawn
from conftest import Sandbox

LRS = [0.01, 0.003, 0.03]
SEEDS = [0, 1, 2]
EPOCHS = 2
STEPS = EPOCHS * 16
EXAMPLE_FLAGS = "--weight-decay 0.0001 --epochs {epochs} --save-every-steps 5 --step-sleep-s 0.02"
KILLS = 10
#: Kills come every 2 to 4.5 s of wall time: on a loaded 2-core machine a run can be killed
#: five times in a row while importing torch, before any new checkpoint, and then be failed
#: by the cap on lost attempts (test_launch_edges tests that cap), not by anything under test.
MAX_LOST = 50


def reference(shared_dir: Path, lr: float, seed: int, epochs: int = EPOCHS) -> dict:
    """The same run, never interrupted, standalone: trained once per (lr, seed, epochs) per
    session (:func:`made_once`), since it is deterministic and the chaos and fleet tests'
    sweeps share their runs. Callers only read it."""
    def train(out: Path) -> None:
        script = REPO / "examples" / "train_mlp.py"
        proc = spawn([sys.executable, str(script), "--lr", str(lr), "--seed", str(seed),
                      *EXAMPLE_FLAGS.format(epochs=epochs).split(), "--out", str(out)],
                     {**os.environ, "PYTHONPATH": str(REPO)}, preload_for(script))
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err

    return load_checkpoint(made_once(shared_dir, f"chaos-reference-{lr}-{seed}-{epochs}", train))


def max_steps(runs: Path) -> dict[str, int]:
    """The furthest step each run has logged so far (its metrics file, one line per step)."""
    out = {}
    for metrics in runs.glob("*/metrics.jsonl"):
        steps = [json.loads(line)["step"] for line in metrics.read_text().split("\n")[:-1] if line.strip()]
        out[metrics.parent.name] = max(steps, default=0)
    return out


@pytest.mark.slow
def test_chaos_sweep_survives_random_kills(sandbox: Sandbox, shared_dir: Path) -> None:
    rnd = random.Random(20261123)
    sweep = sandbox.write_sweep(
        {"lr": LRS, "seed": SEEDS}, {"epochs": EPOCHS}, name="chaos", lease_s=3, grace_s=10,
        max_lost=MAX_LOST, command=f"python {REPO}/tests/scripts/exclusive.py python {REPO}/examples/train_mlp.py "
                f"--lr {{lr}} --seed {{seed}} {EXAMPLE_FLAGS}")
    runs_dir = sandbox.store / "chaos" / "runs"
    launchers = [sandbox.sweeprun("launch", str(sweep)) for _ in range(2)]
    kills = {"SIGKILL": 0, "SIGTERM": 0}
    lost_at: list[tuple[str, int, int]] = []  # (run, attempt killed, furthest step it had logged)
    started = time.monotonic()
    for _ in range(KILLS):
        time.sleep(rnd.uniform(2.0, 4.5))  # long enough for a start (torch import) and a few saves
        i = rnd.randrange(2)
        sig = signal.SIGKILL if rnd.random() < 0.6 else signal.SIGTERM
        if launchers[i].poll() is None:
            held = {r: row["attempts"] for r, row in sandbox.status(sweep).items()
                    if row["worker"] and row["worker"].endswith(f":{launchers[i].pid}")}
            steps = max_steps(runs_dir)
            os.killpg(launchers[i].pid, sig)
            lost_at.extend((r, n, steps.get(r, 0)) for r, n in held.items())
            kills[sig.name] += 1
        launchers[i].communicate(timeout=120)
        launchers[i] = sandbox.sweeprun("launch", str(sweep))
    for p in launchers:
        p.communicate(timeout=600)
    if any(p.returncode != 0 for p in launchers):  # the last kill may have hit the last run
        assert sandbox.run("launch", str(sweep), timeout=600).returncode == 0
    chaos_s = time.monotonic() - started

    status = sandbox.status(sweep)
    assert len(status) == 9 and {row["state"] for row in status.values()} == {"done"}

    events = sandbox.events()
    assert not [e for e in events if e["event"] == "overlap"], "a run had two processes at once"

    with ThreadPoolExecutor(2) as pool:
        refs = dict(zip(status, pool.map(lambda r: reference(shared_dir, r["params"]["lr"], r["params"]["seed"]),
                                         status.values()), strict=True))
    for run_id, ref in refs.items():
        got = load_checkpoint(runs_dir / run_id)
        assert got["step"] == ref["step"] == STEPS
        assert_same_tree(got["objects"]["model"], ref["objects"]["model"], f"{run_id} model")
        assert_same_tree(got["objects"]["optimizer"], ref["objects"]["optimizer"], f"{run_id} optimizer")
        entries = [json.loads(line) for line in (runs_dir / run_id / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in entries] == list(range(1, STEPS + 1))

    again = sandbox.run("launch", str(sweep))
    assert again.returncode == 0 and "0 process(es) started" in again.stdout

    # Figures: how much work the interruptions cost. A run killed at attempt n had logged
    # `reached` steps; attempt n+1 says where it resumed; the difference was computed twice.
    recomputed = 0
    for run_id, attempt, reached in lost_at:
        log = runs_dir / run_id / "logs" / f"attempt-{attempt + 1}.log"
        m = re.search(r"resumed from .* \(step (\d+)", log.read_text()) if log.exists() else None
        recomputed += max(0, reached - (int(m.group(1)) if m else 0))
    resumes = sum(1 for log in runs_dir.glob("*/logs/attempt-*.log") if "resumed from" in log.read_text())
    starts = sum(1 for e in events if e["event"] == "start")
    report = {"kills": kills, "process_starts": starts, "ideal_starts": 9, "resumes": resumes,
              "ideal_steps": 9 * STEPS, "steps_recomputed": recomputed,
              "save_every_steps": 5, "chaos_s": round(chaos_s, 1)}
    print("\nchaos report:", json.dumps(report))
    if os.environ.get("SWEEPRUN_CHAOS_REPORT"):
        Path(os.environ["SWEEPRUN_CHAOS_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    assert sum(kills.values()) >= 5


RNN = REPO / "examples" / "train_rnn.py"
RNN_FLAGS = ("--seed", "5", "--epochs", "4", "--save-every-steps", "4", "--step-sleep-s", "0.03")
RNN_STEPS_PER_EPOCH, RNN_STEPS = 8, 32


@pytest.mark.slow
def test_validation_metric_survives_kills_right_after_it_and_at_random(tmp_path: Path) -> None:
    """The word-LM report: a validation loss logged after the epoch's last checkpoint came back
    twice after a kill in that window. Here the GRU example (hidden state carried between
    steps) is killed exactly after its validation line (``metrics.after_append``), and at
    random steps with SIGKILL and SIGTERM, then finished: the weights are bit-exact and
    metrics.jsonl is byte for byte the uninterrupted run's."""
    reference = ExampleRun(tmp_path / "reference", RNN_FLAGS, RNN)
    assert reference.complete().returncode == 0
    run = ExampleRun(tmp_path / "run", RNN_FLAGS, RNN)
    rnd = random.Random(20261130)
    val_kills = 0
    for round_ in range(4):
        saved = run.final_state()["step"] if (run.out / "checkpoints").exists() else 0
        if round_ % 2 == 0:
            # appends this process makes up to the next validation line: the rest of the
            # epoch's steps and the line itself (at a boundary the line is replayed first)
            rest = -saved % RNN_STEPS_PER_EPOCH
            nth = rest + 1 if rest or saved else RNN_STEPS_PER_EPOCH + 1
            result = run.complete(env={"SWEEPRUN_CRASH_AT": f"metrics.after_append@{nth}"})
            assert result.returncode == -SIGKILL, result.stderr
            assert "val_loss" in run.entries()[-1]      # killed right after that line
            val_kills += 1
        else:
            target = run.last_step() + rnd.randint(1, 5)
            signum = rnd.choice([SIGKILL, SIGTERM])
            code, _, err = run.interrupt_at(target, signum)
            assert code in (-SIGKILL, 75), err
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"done: step {RNN_STEPS}"
    assert val_kills == 2
    got, want = run.final_state(), reference.final_state()
    assert got["step"] == want["step"] == RNN_STEPS
    assert_same_tree(got["objects"], want["objects"], "objects")
    assert run.metrics.read_bytes() == reference.metrics.read_bytes()
    assert sum("val_loss" in e for e in run.entries()) == RNN_STEPS // RNN_STEPS_PER_EPOCH


@pytest.mark.slow
def test_a_sweep_killed_after_each_validation_line_ends_done_and_exact(sandbox: Sandbox) -> None:
    """The same window under ``sweeprun launch``: every attempt of the run is killed at its
    9th metrics line (the first one lands right after epoch 0's validation loss), the
    launcher retries, and the run ends done with the uninterrupted run's metrics file.
    Each kill is a failed attempt, and it often lands while the step-8 save is still being
    written in the background (lost with the process): an attempt may move the run on by
    only 4 steps, so it gets attempts to spare. One run: a second seed repeated the same
    path (the launcher takes runs one at a time) for twice the starts."""
    flags = "--epochs 2 --save-every-steps 4"
    sweep = sandbox.write_sweep({"seed": [0]}, name="val", max_attempts=40,
                                command=f"python {RNN} --seed {{seed}} {flags}")
    result = sandbox.run("launch", str(sweep), env={"SWEEPRUN_CRASH_AT": "metrics.after_append@9"},
                         timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    status = sandbox.status(sweep)
    assert {row["state"] for row in status.values()} == {"done"}
    runs_dir = sandbox.store / "val" / "runs"
    for run_id, row in status.items():
        assert row["attempts"] > 1, "the crash point never fired"
        reference = ExampleRun(sandbox.root / f"ref-{run_id}", ("--seed", str(row["params"]["seed"]),
                                                               *flags.split()), RNN)
        assert reference.complete().returncode == 0
        assert (runs_dir / run_id / "metrics.jsonl").read_bytes() == reference.metrics.read_bytes()
        got, want = load_checkpoint(runs_dir / run_id), reference.final_state()
        assert_same_tree(got["objects"], want["objects"], f"{run_id} objects")
