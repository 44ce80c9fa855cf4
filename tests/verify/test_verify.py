"""``sweeprun verify -- COMMAND``: run as a user runs it, a real process that starts, signals and
re-runs the real script, then compares.

The example passes; the example with one piece of its state left out of checkpoints
(``--unsafe-omit``) fails, and the verdict names that piece. The diagnosis rules are
also shown on their own, with the numbers a real run produces, so they read as a table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sweeprun.errors import SpecError
from sweeprun.verify import MetricsDiff, compare_states, diagnose, diff_metrics, plan_kills

from _training_helpers import sweeprun_verify

REPO = Path(__file__).resolve().parents[2]
#: The example, short: 2 epochs of 16 steps, saves every 7 steps so a SIGKILL replays some.
EXAMPLE = (sys.executable, "examples/train_mlp.py", "--epochs", "2", "--seed", "3", "--save-every-steps", "7")

#: A script with no model at all: the smallest user of the training API. Its "loss" draws
#: from Python's RNG, which sweeprun checkpoints, so it resumes exactly unless told not to.
TINY = """\
import os, random, signal, sys, time
from sweeprun.training import init

random.seed(0)
run = init(every_steps=3)
if "--unseeded" in sys.argv:
    random.seed()          # a fresh seed from the OS: two runs differ from their first step
if "--no-restore" not in sys.argv:
    run.restore()
seen = []                  # --running-mean: a mean over the process's own steps, not saved
late, theirs = [], None    # --late-signal: a fast end, where a SIGTERM sent at 28 acts after 30
while run.step < 30:
    if "--late-signal" in sys.argv and run.step == 27:
        theirs = signal.signal(signal.SIGTERM, lambda *_: late.append(1))
    time.sleep(0.01)
    loss = random.random()
    seen.append(loss)
    run.end_step(loss=loss, **({"mean_loss": sum(seen) / len(seen)} if "--running-mean" in sys.argv else {}))
if theirs:
    time.sleep(1)
    signal.signal(signal.SIGTERM, theirs)
    if late:
        os.kill(os.getpid(), signal.SIGTERM)
run.finish()
"""



@pytest.fixture
def tiny(tmp_path: Path) -> str:
    script = tmp_path / "tiny.py"
    script.write_text(TINY)
    return str(script)


# -- as a user runs it ---------------------------------------------------------------------

#: The command docs/verify.md shows (tests/docs parses it; this test runs it).
DOCUMENTED = ("python", "examples/train_mlp.py", "--epochs", "2", "--save-every-steps", "7")


@pytest.mark.slow   # fresh starts of the documented example; the fast subset keeps the wrapper's
def test_the_documented_command_resumes_exactly(tmp_path: Path) -> None:
    """SIGTERMed, then SIGKILLed, at steps the seed (0 by default) fixes, and resumed each time."""
    assert f"sweeprun verify -- {' '.join(DOCUMENTED)}\n" in (REPO / "docs" / "verify.md").read_text()
    result = sweeprun_verify("--", *DOCUMENTED, tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    planned = re.search(r"interrupting at \(seed 0\): SIGTERM after step (\d+), SIGKILL after step (\d+)$",
                        result.stdout, re.MULTILINE)
    assert planned, result.stdout
    assert [int(s) for s in planned.groups()] == [k.step for k in plan_kills(range(1, 33), 2, 0)]
    assert "[verify] attempt 1: from step 0; SIGTERM after step" in result.stdout
    assert re.search(r"\[verify\] attempt 3: resumed from step \d+; exit 0", result.stdout)
    assert re.search(r"^EXACT: interrupted 2 time\(s\) .* the same 32 metric lines, the final state "
                     r"at step 32 equal bit for bit \(model, optimizer, scheduler, data: \d+ tensors\)",
                     result.stdout, re.MULTILINE)
    assert list(tmp_path.glob("sweeprun-verify-*")) == [], "an exact run leaves nothing behind"


@pytest.mark.slow  # three starts of the example each: one interruption already loses the piece
@pytest.mark.parametrize(("piece", "named"), [   # a forgotten RNG: test_verify_integrations
    ("optimizer", "the optimizer was not restored: the first step after resuming from step"),
    ("scheduler", "the LR scheduler was not restored: the learning rate differs"),
    ("data", "the data position was not restored"),
])
def test_a_forgotten_piece_of_state_is_named(tmp_path: Path, piece: str, named: str) -> None:
    # seed 7: the kill aims at step 11 of 32, with training left after it even when it lands late
    result = sweeprun_verify("--kills", "1", "--seed", "7", "--", *EXAMPLE, "--unsafe-omit", piece, tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NOT EXACT" in result.stdout
    (likely,) = [line for line in result.stdout.splitlines() if line.startswith("  likely: ")]
    assert named in likely
    kept = re.search(r"both runs are kept in (\S+):", result.stdout)
    assert kept and Path(kept[1]).parent == tmp_path, "kept where the user can look"
    assert (Path(kept[1]) / "interrupted" / "logs" / "attempt-2.log").exists()


@pytest.mark.slow  # a whole verify with kills: the full suite's
def test_a_script_that_never_restores_is_not_exact(tmp_path: Path, tiny: str) -> None:
    """Starting over after each kill reproduces the same numbers: exact-looking and wrong."""
    result = sweeprun_verify("--kills", "1", "--", sys.executable, tiny, "--no-restore", tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "NOT EXACT: no attempt resumed from a checkpoint" in result.stdout
    assert "does the script call run.restore()" in result.stdout


@pytest.mark.slow  # two verifies, six starts that import torch to save
def test_a_logged_average_that_spans_the_resume_is_told_apart_from_the_training(
        tmp_path: Path, tiny: str) -> None:
    """The state resumes exactly; only a mean kept outside the checkpoint is logged differently.
    The verdict says so, and does not send the user after a piece of training state."""
    result = sweeprun_verify("--kills", "1", "--", sys.executable, tiny, "--running-mean", tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"^NOT EXACT: interrupted 1 time\(s\) .*, it trained exactly as the uninterrupted "
                     r"run \(the final state at step 30 equal bit for bit: no objects tracked\), but its logged "
                     r"metrics differ$", result.stdout, re.MULTILINE), result.stdout
    (likely,) = [line for line in result.stdout.splitlines() if line.startswith("  likely: ")]
    assert likely.startswith("  likely: a logged value spans the resume: mean_loss differ first at step ")
    assert "generator" not in result.stdout and "not restored" not in result.stdout
    ignored = sweeprun_verify("--kills", "1", "--ignore", "mean_loss", "--", sys.executable, tiny,
                              "--running-mean", tmp=tmp_path)
    assert ignored.returncode == 0, ignored.stdout + ignored.stderr


@pytest.mark.slow  # three starts that import torch to save
def test_an_interruption_that_lands_after_the_last_step_verifies_nothing(tmp_path: Path, tiny: str) -> None:
    """Aimed after step 28 of 30 (seed 0), the SIGTERM reaches a fast script after its last step:
    the resume has nothing left to train, and saying EXACT would prove nothing."""
    result = sweeprun_verify("--kills", "1", "--", sys.executable, tiny, "--late-signal", tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[verify] attempt 2: resumed from step 30; exit 0" in result.stdout, result.stdout
    assert re.search(r"^NOT VERIFIED: every interruption took effect after the last step \(SIGTERM after "
                     r"step (28|29|30); resumed from step 30, the last\): the resumed run had nothing "
                     r"left to train", result.stdout, re.MULTILINE), result.stdout


@pytest.mark.slow  # three uninterrupted runs of a script: the full suite's
def test_a_script_random_even_uninterrupted_is_told_so(tmp_path: Path, tiny: str) -> None:
    result = sweeprun_verify("--kills", "1", "--", sys.executable, tiny, "--unseeded", tmp=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "likely: the runs differ from step 1, before any resume" in result.stdout


# -- bad input: exit 2, one line -------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    ((), "no command to verify: give it after --"),
    (("--", "no-such-program-xyz"), "cannot start 'no-such-program-xyz'"),
    (("--kills", "0", "--", "true"), "--kills"),
    (("--atol", "-1", "--", "true"), "--atol"),
    (("--nproc", "0", "--", "true"), "--nproc"),
    (("--resume-nproc", "2000", "--", "true"), "--resume-nproc"),
    (("--", sys.executable, "-c", "print('boom'); raise SystemExit(3)"),
     "the uninterrupted run exited with 3, so there is nothing to compare; its last line: 'boom'"),
    (("--", sys.executable, "-c", "pass"), "logged no steps to"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = sweeprun_verify(*args, tmp=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_run_dir_in_the_command_becomes_the_run_directory(tmp_path: Path) -> None:
    """For scripts that take their directory as a flag (``--out {run_dir}``)."""
    result = sweeprun_verify("--", sys.executable, "-c", "import sys; print(sys.argv[1])", "{run_dir}",
                             tmp=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(r"its last line: '\S+/sweeprun-verify-\w+/uninterrupted/run'", result.stderr)


@pytest.mark.slow  # four starts that import torch to save
def test_signals_reach_a_script_behind_a_wrapper(tmp_path: Path, tiny: str) -> None:
    """``sh -c`` forks the script: signals go to the whole session, so SIGTERM still means
    "save and exit" to the script inside, and the next attempt waits until it has (the shell
    itself dies of SIGTERM at once, which the verdict points out)."""
    wrapped = f"{sys.executable} {tiny}; exit $?"
    result = sweeprun_verify("--seed", "2", "--", "sh", "-c", wrapped, tmp=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    sigterm = re.search(r"attempt 1: from step 0; SIGTERM after step (\d+), exit -15; not 75: .* or a "
                        r"wrapper died of it first", result.stdout)
    assert sigterm, result.stdout
    resumed = re.search(r"attempt 2: resumed from step (\d+); SIGKILL after step \d+( \(inside a save\))?, exit -9",
                        result.stdout)  # the tiny script saves every 3 steps: a kill may land in one
    assert resumed, result.stdout
    assert int(resumed[1]) - int(sigterm[1]) in (0, 1), "the script inside saved where SIGTERM found it"
    assert "EXACT: interrupted 2 time(s)" in result.stdout


def test_credentials_the_script_prints_are_not_repeated(tmp_path: Path) -> None:
    script = "print('connecting to postgresql://me:hunter2@db/sweeps'); raise SystemExit(1)"
    result = sweeprun_verify("--", sys.executable, "-c", script, tmp=tmp_path)
    assert result.returncode == 2
    assert "postgresql://***@db/sweeps" in result.stderr and "hunter2" not in result.stdout + result.stderr


def test_too_short_a_run_for_the_kills_asked_is_exit_2(tmp_path: Path) -> None:
    script = "from sweeprun.training import init\nrun = init(every_steps=1)\nrun.end_step(loss=1.0)\nrun.finish()\n"
    result = sweeprun_verify("--", sys.executable, "-c", script, tmp=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "logged 1 step(s) to metrics.jsonl; 2 interruption(s) need at least 3" in result.stderr


def test_the_cli_does_not_import_torch_before_comparing(tmp_path: Path) -> None:
    code = ("import sys; from sweeprun.cli import main; "
            "rc = main(['verify', '--', sys.executable, '-c', 'pass']); "
            "print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}, timeout=120)
    assert result.stdout.split()[-2:] == ["2", "False"], result.stdout + result.stderr


def test_help_shows_the_command_after_a_double_dash() -> None:
    result = subprocess.run([sys.executable, "-m", "sweeprun", "verify", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "[-- COMMAND]" in result.stdout and "--seed" in result.stdout and "--atol" in result.stdout


# -- the pieces, in process ------------------------------------------------------------------

def test_kill_points_are_fixed_by_the_seed_and_spread_over_the_run() -> None:
    steps = list(range(1, 65))
    plan = plan_kills(steps, 3, seed=7)
    assert plan == plan_kills(steps, 3, seed=7) != plan_kills(steps, 3, seed=8)
    assert [k.name for k in plan] == ["SIGTERM", "SIGKILL", "SIGTERM"]
    assert plan[0].step <= 21 < plan[1].step <= 42 < plan[2].step < 64  # one in each third, never the last
    with pytest.raises(SpecError, match="need at least 4"):
        plan_kills([1, 2, 3], 3, seed=0)


def test_metrics_differences_start_at_the_first_differing_line() -> None:
    a = [{"step": s, "loss": 1.0 / s, "lr": 0.1, "time_s": s * 0.3} for s in range(1, 6)]
    b = [dict(e, time_s=e["time_s"] + 1) for e in a]  # the clock never matches: not compared
    assert diff_metrics(a, b).same
    b[3]["loss"] += 1e-9
    found = diff_metrics(a, b)
    assert (found.step, found.keys) == (4, ["loss"])
    assert diff_metrics(a, b, atol=1e-6).same
    assert diff_metrics(a, b, ignore={"loss"}).same, "--ignore loss"
    assert diff_metrics(a, a + [{"step": 6, "loss": 0.1}]).detail == "5 lines vs 6"


def test_final_states_are_compared_tensor_by_tensor() -> None:
    weights = {"w": torch.ones(3), "b": torch.zeros(2)}
    adam = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}
    a = {"step": 5, "objects": {"model": weights, "optimizer": adam}, "rng": None}
    b = {"step": 5, "objects": {"model": {**weights, "w": torch.ones(3) + 1e-7},
                                "optimizer": {**adam, "state": {0: {"step": torch.tensor(5.0),
                                                                    "exp_avg": torch.zeros(3)}}}}, "rng": None}
    found = compare_states(a, b)
    assert sorted(found) == ["model", "optimizer"]
    assert [d.path for d in found["optimizer"]] == [("state", 0, "exp_avg")]
    assert sorted(compare_states(a, b, atol=1e-6)) == ["optimizer"], "within --atol is equal"


TRACKED = {"objects": {"model": {"w": torch.ones(1)},
                       "optimizer": {"state": {}, "param_groups": []},
                       "scheduler": {"last_epoch": 9, "_last_lr": [0.1]},
                       "data": {"epoch": 0, "offset": 64, "seed": 3}},
           "rng": {"torch": torch.zeros(4, dtype=torch.uint8)}}


@pytest.mark.parametrize(("step", "keys", "lines", "state", "cause"), [
    (16, ["lr"], (32, 32), TRACKED, "the LR scheduler was not restored"),
    (17, ["loss"], (32, 32), TRACKED, "the optimizer was not restored"),
    (16, ["loss"], (32, 32), {**TRACKED, "rng": None}, "the RNG state was not restored"),
    (16, ["loss"], (32, 41), TRACKED, "the data position was not restored: the resumed run logged 41"),
    (3, ["loss"], (32, 32), TRACKED, "before any resume"),
    (25, ["loss"], (32, 32), TRACKED, "10 steps after resuming from step 15"),
])
def test_where_the_metrics_diverge_names_the_piece(step: int, keys: list[str], lines: tuple[int, int],
                                                    state: dict, cause: str) -> None:
    """Resumed from step 15, with every step logged: the scheduler shows in the LR of step 16,
    the RNG and the data position in the loss of step 16, the optimizer in the loss of step 17."""
    metrics = MetricsDiff(lines, index=step - 1, step=step, keys=keys)
    (found,) = diagnose(metrics, resumes=[15], resumed_steps=range(1, lines[1] + 1), state=state)
    assert cause in found


def test_a_kill_that_lands_late_still_names_the_optimizer() -> None:
    """Aimed after step 28 of 32, the SIGTERM of a loaded machine landed after step 31: the one
    step left logs the same loss (taken before its update) and only the final weights differ."""
    untracked = {**TRACKED, "objects": {k: v for k, v in TRACKED["objects"].items() if k != "optimizer"}}
    same = MetricsDiff((32, 32))
    (found,) = diagnose(same, resumes=[31], resumed_steps=range(1, 33), state=untracked, differ=["model"])
    assert found.startswith("the optimizer was not restored: every logged metric matches, and the final "
                            "state differs (model) after resuming from step 31")
    assert found.endswith("no optimizer is tracked: run.track(optimizer=optimizer)")
    (found,) = diagnose(same, resumes=[31], resumed_steps=range(1, 33), state=TRACKED, differ=["model"])
    assert "too few steps after it to tell which piece" in found, "the optimizer is tracked and equal"
    assert diagnose(same, resumes=[31], resumed_steps=range(1, 33), state=TRACKED) == [], "nothing differs"


def test_a_metric_one_run_logs_and_the_other_does_not_names_a_counter_not_the_optimizer() -> None:
    """With gradient accumulation, the second logged step after a resume is the first update:
    where a script's own step counter (kept outside run.extras) moves its evaluation, the line
    there has a ``val_loss`` in one run and none in the other. That is the counter's signature,
    not the optimizer's, whatever the step."""
    a = [{"step": s, "loss": 1.0 / s, **({"val_loss": 0.5} if s == 18 else {})} for s in range(1, 33)]
    b = [{"step": s, "loss": 1.0 / s, **({"val_loss": 0.5} if s == 20 else {})} for s in range(1, 33)]
    metrics = diff_metrics(a, b)
    assert (metrics.step, metrics.keys, metrics.absent) == (18, ["val_loss"], ["val_loss"])
    (found,) = diagnose(metrics, resumes=[16], resumed_steps=range(1, 33), state=TRACKED)
    assert found.startswith("the runs log different metrics at step 18 (val_loss in one run only), "
                            "2 steps after resuming from step 16: a counter")
    assert "run.extras" in found


def test_a_fault_is_blamed_on_the_resume_that_caused_it() -> None:
    """Resumed at 20 without the optimizer, saved at 21 (the cadence), killed, resumed at 21: the
    loss of step 22 differs. Measured from 21 it looks like a first-step fault (RNG, data);
    measured from 20, the older resume, it is the optimizer's signature, and the right answer."""
    metrics = MetricsDiff((32, 32), index=21, step=22, keys=["loss"])
    (found,) = diagnose(metrics, resumes=[20, 21], resumed_steps=range(1, 33), state=TRACKED)
    assert found.startswith("the optimizer was not restored: the first step after resuming from step 20")
