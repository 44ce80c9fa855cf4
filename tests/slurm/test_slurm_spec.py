"""The sweep file's ``slurm:`` section and ``deadline:``, and how tasks are planned per lane:
what they accept, what they refuse (one line naming file, line and key, exit 2, nothing
written), with no cluster needed."""

from __future__ import annotations

import pytest

from sweeprun import parse_spec
from sweeprun.errors import SpecError
from sweeprun.fleet import StopRequests
from sweeprun.slurm import Fallback, SlurmError, SlurmSpec, lane_of, switch_at
from sweeprun.slurm.submit import Task, plan
from sweeprun.sweep import Sweep

from conftest import Sandbox

BASE = "name: t\ncommand: python train.py {lr}\nstore: /tmp/s\ngrid:\n  lr: [0.1, 0.01]\n"


def test_a_full_section_becomes_each_lanes_sbatch_options() -> None:
    spec = parse_spec(BASE + """\
slurm:
  partition: spot
  time: "4:00:00"
  cpus_per_task: 8
  gpus_per_run: 2
  mem: 64G
  account: ml
  qos: low
  max_jobs: 16
  signal_s: 300
  sbatch: ["--constraint=a100"]
  fallback: {partition: ondemand, after_interruptions: 2}
deadline: 2026-12-24T18:00Z
nproc: 2
""")
    slurm = spec.slurm
    assert slurm is not None and slurm.max_jobs == 16 and slurm.signal_s == 300
    assert slurm.options("main") == ["--partition=spot", "--qos=low", "--account=ml", "--time=4:00:00",
                                     "--cpus-per-task=8", "--gres=gpu:2", "--mem=64G", "--constraint=a100"]
    assert slurm.options("fallback")[0] == "--partition=ondemand", "the fallback's partition, the rest alike"
    assert spec.deadline == 1798135200.0
    assert parse_spec(BASE + "slurm:\n").slurm == SlurmSpec(), "an empty section: SLURM's defaults"
    assert parse_spec(BASE).slurm is None


def test_a_run_moves_to_the_fallback_lane_after_its_interruptions_or_at_the_deadline() -> None:
    fallback = Fallback(partition="ondemand", after_interruptions=2)
    assert [lane_of(n, fallback, None) for n in (0, 1, 2, 5)] == ["main", "main", "fallback", "fallback"]
    at = switch_at(deadline=130.0, grace_s=30.0)  # when the main lane's runs are asked to save
    assert at == 100.0 and switch_at(None, 30.0) is None
    assert lane_of(0, fallback, at, now=99.0) == "main"
    assert lane_of(0, fallback, at, now=100.0) == "fallback"
    assert lane_of(9, None, None) == "main", "no fallback: one lane"


@pytest.mark.parametrize(("left", "active", "max_jobs", "submit"), [
    ({"main": 10}, {}, 4, {"main": 4, "fallback": 0}),               # a task per run, up to max_jobs
    ({"main": 10}, {"main": 4}, 4, {"main": 0, "fallback": 0}),      # covered: the relaunch adds none
    ({"main": 2}, {"main": 1}, 4, {"main": 1, "fallback": 0}),
    ({"main": 10, "fallback": 1}, {"main": 4}, 4, {"main": 0, "fallback": 1}),  # the fallback first
    ({"main": 10, "fallback": 3}, {}, 4, {"main": 1, "fallback": 3}),
    ({}, {"main": 2}, 4, {"main": 0, "fallback": 0}),                # done: nothing
])
def test_a_launch_submits_only_the_tasks_the_runs_left_need(left: dict, active: dict, max_jobs: int,
                                                            submit: dict) -> None:
    assert plan(left, active, max_jobs) == submit


@pytest.mark.parametrize("section, message", [
    ("slurm: spot", "t.yaml:6: slurm must map settings (partition, time, ...) to values"),
    ("slurm:\n  partiton: spot", "t.yaml:7: unknown key slurm.partiton (did you mean 'partition'?)"),
    ("slurm:\n  time: 4 hours", "t.yaml:7: slurm.time must be one word (no spaces or quotes), got '4 hours'"),
    ("slurm:\n  time: '4h'", "t.yaml:7: slurm.time '4h' is not a SLURM time: give minutes, HH:MM:SS or D-HH:MM:SS"),
    ("slurm:\n  max_jobs: 0", "t.yaml:7: slurm.max_jobs must be an integer from 1 to 100,000, got 0"),
    ("slurm:\n  gpus_per_run: 1\nnproc: 2", "t.yaml:7: slurm.gpus_per_run is 1, but a run takes up to 2 "
                                            "processes (nproc), one GPU each; raise it to 2"),
    ("slurm:\n  sbatch: ['--array=0-3']", "t.yaml:7: slurm.sbatch sets --array, which sweeprun sets itself"),
    ("slurm:\n  sbatch: 'exclusive'", "t.yaml:7: slurm.sbatch must be a list of sbatch options"),
    ("slurm:\n  fallback: {after_interruptions: 2}", "t.yaml:7: slurm.fallback needs a partition or a qos"),
    ("slurm:\n  fallback: {partition: od, after_interruptions: 0}",
     "t.yaml:7: slurm.fallback.after_interruptions must be an integer from 1 to 1,000,000, got 0"),
    ("deadline: 2026-12-24T18:00Z", "t.yaml:6: deadline sends the runs left to slurm.fallback, and the file has none"),
    ("slurm:\n  fallback: {qos: high}\ndeadline: tomorrow", "t.yaml:8: deadline 'tomorrow' is not a time"),
    ("slurm:\n  fallback: {qos: high}\ndeadline: 2026-12-24T18:00",
     "t.yaml:8: deadline '2026-12-24T18:00' names no time zone: add it (2026-12-24T18:00+01:00 or "
     "2026-12-24T17:00Z); the nodes that read the file may not share this machine's"),
    ("slurm:\n  signal_s: 35", "t.yaml:7: slurm.signal_s is 35 s, but the runs get grace_s (30 s) to save after "
                              "SLURM's warning, and the task then requeues itself before the time limit: give "
                              "signal_s at least 40, or a smaller grace_s"),
    ("slurm:\n  time: 3", "t.yaml:7: slurm.time 3 is no longer than the warning before it (signal_s 120 s, "
                          "which SLURM may send up to 60 s early)"),
])
def test_a_bad_section_is_one_line_naming_file_line_and_key(section: str, message: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_spec(BASE + section + "\n", "t.yaml")
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_launch_on_slurm_with_a_bad_section_is_one_line_exit_2_and_writes_nothing(sandbox: Sandbox) -> None:
    """The command line's side of the table above (the same message, on stderr, exit 2)."""
    sweep = sandbox.root / "t.yaml"
    sweep.write_text(BASE.replace("/tmp/s", str(sandbox.store)) + "slurm:\n  partiton: spot\n")
    result = sandbox.run("launch", str(sweep), "--on", "slurm")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "t.yaml:7: unknown key slurm.partiton" in result.stderr, result.stderr
    assert not sandbox.store.exists(), "nothing written"


def test_launch_on_another_scheduler_or_without_slurm_says_what_is_missing(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"lr": [0.1]})
    other = sandbox.run("launch", str(sweep), "--on", "pbs")
    assert other.returncode == 2 and "--on 'pbs': the scheduler sweeprun submits to is slurm" in other.stderr
    here = sandbox.run("launch", str(sweep), "--on", "slurm", "--workers", "2", "--notice", "aws")
    assert here.returncode == 2 and "--on slurm with --workers, --notice: those are for a worker on this " \
                                    "machine" in here.stderr
    missing = sandbox.run("launch", str(sweep), "--on", "slurm", env={"PATH": "/nonexistent"})
    assert missing.returncode == 2, missing.stderr
    assert "sbatch is not on the PATH: --on slurm runs on a SLURM login node" in missing.stderr
    assert not sandbox.store.exists(), "nothing written"


def test_a_task_on_a_node_without_the_sweeps_store_refuses_and_one_after_a_stop_ends(sandbox: Sandbox) -> None:
    """A store path that is each node's own disk would run the sweep again there: the task
    names the store it sees and exits 2. A task submitted before `sweeprun stop` and started
    after it ends without running anything."""
    sweep_path = sandbox.write_sweep({"lr": [0.1]})
    spec = parse_spec(sweep_path.read_text(), str(sweep_path))
    sweep = Sweep(spec)
    sweep.prepare().close()
    ident = sweep.ledger_key().rsplit("#", 1)[-1]
    elsewhere = Task(spec, "main", str(sweep_path), [], ident="f" * 32, stop_seen=None)
    with pytest.raises(SlurmError, match=r"this node sees the store .* without the sweep's id ffffffff\.\.\. "
                                         r"\(another\): every node must see the same store"):
        elsewhere.check(sweep)
    assert Task(spec, "main", str(sweep_path), [], ident=ident, stop_seen=None).check(sweep) is None
    StopRequests(sweep.paths).request()
    said = Task(spec, "main", str(sweep_path), [], ident=ident, stop_seen=None).check(sweep)
    assert said == "`sweeprun stop` was run for this sweep after this task was submitted: it ends"
