"""End to end: real launchers, real children, real signals, a real SQLite ledger.

The children run tests/scripts/steps.py, which logs every start/finish to a
side log and holds a per-run flock, so these tests see exactly what executed.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

from conftest import Sandbox, wait_for

GRID_3X3 = {"a": [1, 2, 3], "b": ["x", "y", "z"]}


def done_in_store(sandbox: Sandbox) -> set[str]:
    """Runs whose DONE marker is in the store: the only definition of finished that counts."""
    return {p.parent.name for p in (sandbox.store / "t" / "runs").glob("*/DONE")}


def starts(events: list[dict]) -> Counter:
    return Counter(e["run"] for e in events if e["event"] == "start")


def finishes(events: list[dict]) -> Counter:
    return Counter(e["run"] for e in events if e["event"] == "finish")


def test_sigkill_mid_sweep_then_relaunch_skips_done_and_resumes_the_rest(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep(GRID_3X3, {"steps": 12, "sleep": 0.05})
    first = sandbox.sweeprun("launch", str(sweep), "--workers", "3")
    def half_way() -> bool:
        events = sandbox.events()
        running = set(starts(events)) - set(finishes(events))
        return len(finishes(events)) >= 3 and any(
            (sandbox.store / "t" / "runs" / r / "ckpt.json").exists() for r in running)

    wait_for(half_way, what="a sweep half-way, with a checkpointed run in flight")
    os.killpg(first.pid, signal.SIGKILL)  # a lost machine: launcher and children die at once
    first.wait()
    before = sandbox.events()
    done_before = done_in_store(sandbox)
    interrupted = set(starts(before)) - set(finishes(before))
    assert done_before

    second = sandbox.run("launch", str(sweep), "--workers", "3")
    assert second.returncode == 0, second.stderr
    after = sandbox.events()[len(before):]
    # finished runs are not executed again
    assert not done_before & set(starts(after))
    # interrupted runs continue from their own checkpoint
    resumed = {e["run"]: e["from_step"] for e in after if e["event"] == "start"}
    assert interrupted <= set(resumed)
    assert any(resumed[r] > 0 for r in interrupted)
    # every run's work completed exactly once (a run killed between its last step and DONE
    # restarts at its final checkpoint and has nothing left to do)
    assert set(finishes(before + after)) == set(sandbox.status(sweep))
    assert all(e["from_step"] == 12 for e in after if e["event"] == "start" and e["run"] in finishes(before))
    assert {row["state"] for row in sandbox.status(sweep).values()} == {"done"}
    assert not [e for e in before + after if e["event"] == "overlap"]


def test_four_launchers_at_once_run_everything_exactly_once(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep(GRID_3X3, {"steps": 4, "sleep": 0.05})
    launchers = [sandbox.sweeprun("launch", str(sweep)) for _ in range(4)]
    for p in launchers:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    events = sandbox.events()
    assert not [e for e in events if e["event"] == "overlap"], "two processes held one run at once"
    assert starts(events) == Counter({r: 1 for r in sandbox.status(sweep)})
    assert len({e["pid"] for e in events}) == 9
    assert {row["attempts"] for row in sandbox.status(sweep).values()} == {1}


def test_a_failing_run_ends_failed_after_max_attempts_others_finish(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2, 3], "fail": [False, True]}, {"steps": 2, "sleep": 0.01},
                                max_attempts=2)
    result = sandbox.run("launch", str(sweep), "--workers", "2")
    assert result.returncode == 1
    status = sandbox.status(sweep)
    failed = {r for r, row in status.items() if row["params"]["fail"]}
    assert {status[r]["state"] for r in failed} == {"failed"}
    assert {status[r]["attempts"] for r in failed} == {2}
    assert {row["state"] for r, row in status.items() if r not in failed} == {"done"}
    assert "failing on purpose" in (sandbox.store / "t" / "runs" / sorted(failed)[0] / "logs"
                                    / "attempt-2.log").read_text()
    # relaunching does not retry it again, raising --max-attempts does
    assert sandbox.run("launch", str(sweep)).returncode == 1
    assert sum(1 for e in sandbox.events() if e["event"] == "fail") == 6
    assert sandbox.run("launch", str(sweep), "--max-attempts", "3").returncode == 1
    assert sum(1 for e in sandbox.events() if e["event"] == "fail") == 9


def test_sigterm_interrupts_without_using_an_attempt_and_relaunch_resumes(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 200, "sleep": 0.02}, max_attempts=1)
    launcher = sandbox.sweeprun("launch", str(sweep), "--grace-s", "20")
    wait_for(lambda: len(starts(sandbox.events())) == 1
             and any((sandbox.store / "t" / "runs").glob("*/ckpt.json")), what="the run to checkpoint")
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=60)
    assert launcher.returncode == 143
    (row,) = sandbox.status(sweep).values()
    assert (row["state"], row["failures"]) == ("interrupted", 0)
    preempted = [e for e in sandbox.events() if e["event"] == "preempted"]
    assert len(preempted) == 1

    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stderr
    restart = [e for e in sandbox.events() if e["event"] == "start"][-1]
    assert restart["from_step"] == preempted[0]["step"] and restart["attempt"] == 2
    (row,) = sandbox.status(sweep).values()
    assert (row["state"], row["failures"], row["attempts"]) == ("done", 0, 2)


def test_relaunching_a_finished_sweep_starts_nothing(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep(GRID_3X3, {"steps": 1, "sleep": 0})
    assert sandbox.run("launch", str(sweep), "--workers", "3").returncode == 0
    before = sandbox.events()
    again = sandbox.run("launch", str(sweep))
    assert again.returncode == 0
    assert sandbox.events() == before
    assert "0 process(es) started" in again.stdout


def test_deleted_ledger_is_rebuilt_without_rerunning_done_runs(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep(GRID_3X3, {"steps": 8, "sleep": 0.05})
    first = sandbox.sweeprun("launch", str(sweep), "--workers", "3")
    wait_for(lambda: len(done_in_store(sandbox)) >= 3, what="three runs done")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = done_in_store(sandbox)
    for f in sandbox.ledger.parent.glob("ledger.sqlite*"):
        f.unlink()
    n_before = len(sandbox.events())
    assert sandbox.run("launch", str(sweep), "--workers", "3").returncode == 0
    rerun = set(starts(sandbox.events()[n_before:]))
    assert not done_before & rerun
    for f in sandbox.ledger.parent.glob("ledger.sqlite*"):
        f.unlink()
    n_before = len(sandbox.events())
    assert sandbox.run("launch", str(sweep)).returncode == 0
    assert len(sandbox.events()) == n_before
    assert {row["state"] for row in sandbox.status(sweep).values()} == {"done"}


def test_a_launcher_killed_alone_takes_its_children_with_it(sandbox: Sandbox) -> None:
    """SIGKILL of the launcher only (not its group): no orphan keeps training beside the next launcher."""
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 100, "sleep": 0.05})
    launcher = sandbox.sweeprun("launch", str(sweep), "--workers", "2")
    wait_for(lambda: len(starts(sandbox.events())) == 2, what="two runs started")
    launcher.kill()
    launcher.wait()
    pids = [e["pid"] for e in sandbox.events() if e["event"] == "start"]

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return open(f"/proc/{pid}/stat").read().split()[2] == "Z"

    wait_for(lambda: all(gone(p) for p in pids), timeout=10, what="children to die with the launcher")


def test_ctrl_c_in_a_terminal_interrupts_the_sweep_with_130(sandbox: Sandbox) -> None:
    """A terminal sends SIGINT to the whole foreground group: launcher and children alike."""
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 200, "sleep": 0.02})
    launcher = sandbox.sweeprun("launch", str(sweep), "--workers", "2")
    wait_for(lambda: len(list((sandbox.store / "t" / "runs").glob("*/ckpt.json"))) == 2,
             what="both runs to checkpoint")
    os.killpg(launcher.pid, signal.SIGINT)
    launcher.communicate(timeout=60)
    assert launcher.returncode == 130
    assert {(r["state"], r["failures"]) for r in sandbox.status(sweep).values()} == {("interrupted", 0)}
    assert sandbox.run("launch", str(sweep), "--workers", "2").returncode == 0
    resumed = [e for e in sandbox.events() if e["event"] == "start" and e["attempt"] == 2]
    assert len(resumed) == 2 and all(e["from_step"] > 0 for e in resumed)


def test_each_run_is_told_the_sweeps_mean_time_between_interruptions(sandbox: Sandbox) -> None:
    """What ``every_s="auto"`` spaces checkpoints by: measured from the ledger's attempts,
    the 6 h prior while none was interrupted; a figure the user sets wins."""
    sweep = sandbox.write_sweep({"a": [1]}, command="python -c 'import os; print(\"mtbi\", os.environ[\"SWEEPRUN_MTBI_S\"])'")
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (log,) = sandbox.store.glob("t/runs/*/logs/attempt-1.log")
    assert abs(float(log.read_text().split()[1]) - 6 * 3600) < 60
    again = sandbox.write_sweep({"a": [2]}, command="python -c 'import os; print(\"mtbi\", os.environ[\"SWEEPRUN_MTBI_S\"])'")
    assert sandbox.run("launch", str(again), env={"SWEEPRUN_MTBI_S": "900"}).returncode == 0
    (log,) = [p for p in sandbox.store.glob("t/runs/a=2*/logs/attempt-1.log")]
    assert log.read_text().split()[1] == "900"


def test_a_live_view_hears_each_running_runs_step_and_metric(sandbox: Sandbox, monkeypatch) -> None:
    """The launcher reads running runs' progress at each heartbeat for an events object that
    shows it (the terminal's live view), and for no other."""
    from sweeprun import Sweep, load_spec
    from sweeprun.runner import Launcher, LaunchOptions

    class Recorder:
        wants_progress = True

        def __init__(self) -> None:
            self.seen: list[tuple[str, int | None, tuple[str, float] | None]] = []

        def started(self, *a: object) -> None: ...
        def output(self, *a: object) -> None: ...
        def ended(self, *a: object) -> None: ...
        def note(self, *a: object) -> None: ...

        def progress(self, run_id: str, step: int | None, metric: tuple[str, float] | None) -> None:
            self.seen.append((run_id, step, metric))

    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    sweep = Sweep(load_spec(sandbox.write_sweep({"a": [1]}, {"steps": 30, "sleep": 0.05})), str(sandbox.ledger))
    ledger = sweep.prepare()
    events = Recorder()
    try:
        result = Launcher(sweep, ledger, LaunchOptions(heartbeat_s=0.2), events).run()  # type: ignore[arg-type]
    finally:
        ledger.close()
    assert result.exit_code == 0
    steps = [step for _, step, _ in events.seen if step is not None]
    assert steps and steps == sorted(steps) and 0 < steps[-1] <= 30
    assert all(metric is None or metric[0] == "loss" for _, _, metric in events.seen)
