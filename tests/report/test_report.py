"""``sweeprun report``: one HTML file that a real (headless) Chromium opens offline, with the
grid's table as ``status`` tells it and the charts drawn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sweeprun import Sweep, load_spec
from sweeprun.report import render
from sweeprun.report.data import collect, curves_of, downsample, higher_is_better, points_per_curve

from _browser import browser, console_errors, drawn, origins, requested_urls, table
from conftest import Sandbox, wait_for

GRID = {"lr": [0.001, 0.01, 0.1], "batch": [8, 16], "seed": [1, 2]}   # 12 runs


def interrupted_sweep(sandbox: Sandbox) -> Path:
    """A 12-run sweep whose launcher was SIGKILLed mid-way (its runs with it), then run again
    to the end: some runs have two attempts, the first of them lost with its worker."""
    sweep = sandbox.write_sweep(GRID, {"api": True, "steps": 10, "sleep": 0.08})
    first = sandbox.sweeprun("launch", str(sweep), "--workers", "3")
    wait_for(lambda: len({e["run"] for e in sandbox.events() if e["event"] == "first_step"}) >= 4,
             what="four runs under way")
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    again = sandbox.run("launch", str(sweep), "--workers", "3", timeout=300)
    assert again.returncode == 0, again.stderr
    return sweep


@pytest.mark.slow
def test_the_report_opens_offline_with_each_runs_attempts_and_state_and_its_charts(sandbox: Sandbox) -> None:
    sweep = interrupted_sweep(sandbox)
    result = sandbox.run("report", str(sweep), "--ledger", str(sandbox.ledger))
    assert result.returncode == 0, result.stderr
    page = sandbox.store / "t" / "report.html"
    assert result.stdout.startswith(f"wrote file://{page}: 12 run(s)"), result.stdout
    status = sandbox.status(sweep)
    assert any(row["attempts"] > 1 for row in status.values())      # the kill left its mark

    with browser() as driver:
        requested_urls(driver)                                        # the browser's own start
        driver.get(page.as_uri())
        wait_for(lambda: driver.execute_script(
            "return document.querySelectorAll('#timeline .bars .point').length") > 0, what="the timeline")
        shown = table(driver)
        assert {run: (int(cells["attempts"]), cells["state"]) for run, cells in shown.items()} == {
            run: (row["attempts"], row["state"]) for run, row in status.items()}
        assert all(cells["step"] == "10" for cells in shown.values())
        drawn_charts = driver.execute_script("""return {
            parallel: document.querySelectorAll('#parallel .parcoords').length,
            curves: document.querySelectorAll('#curves .scatterlayer .trace').length,
            bars: document.querySelectorAll('#timeline .bars .point').length}""")
        assert drawn_charts["parallel"] == 1 and drawn_charts["curves"] == 12
        assert drawn_charts["bars"] == sum(row["attempts"] for row in status.values())
        assert drawn(driver.get_screenshot_as_png()) > 50           # not a blank page
        assert console_errors(driver) == []
        assert origins(requested_urls(driver)) <= {"file", "data", "blob"}      # nothing left the machine


@pytest.mark.slow  # a sweep trained and its page opened twice: the full suite's
def test_report_to_a_local_file_and_without_a_ledger(sandbox: Sandbox) -> None:
    """``-o`` writes a copy where the user says; on a machine whose ledger never saw the sweep
    the table still comes from the store (the timeline is then empty)."""
    sweep = sandbox.write_sweep({"lr": [0.1, 0.2]}, {"api": True, "steps": 4, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    out = sandbox.root / "copy.html"
    result = sandbox.run("report", str(sweep), "-o", str(out), "--ledger", str(sandbox.root / "elsewhere.sqlite"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: 2 run(s)")
    assert not (sandbox.store / "t" / "report.html").exists()
    data = json.loads(out.read_text().split('type="application/json">', 1)[1].split("</script>", 1)[0])
    assert [r["state"] for r in data["runs"]] == ["done", "done"] and data["metrics"] == ["loss"]
    assert all(r["timeline"] == [] for r in data["runs"])


def test_bad_input_is_one_line_and_writes_nothing(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"lr": [0.1]}, {"steps": 1})
    result = sandbox.run("report", str(sweep))              # never launched: no store yet
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and not (sandbox.store / "t" / "report.html").exists()
    missing = sandbox.run("report", str(sandbox.root / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_the_core_commands_never_load_plotly(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"lr": [0.1]}, {"steps": 1, "sleep": 0})
    code = ("import sys; from sweeprun.cli import main; rc = main(['launch', sys.argv[1], '--ledger', sys.argv[2]]);"
            "main(['status', sys.argv[1], '--ledger', sys.argv[2]]);"
            "assert 'plotly' not in sys.modules and 'sweeprun.report' not in sys.modules, 'loaded'")
    result = subprocess.run([sys.executable, "-c", code, str(sweep), str(sandbox.ledger)], env=sandbox.env(),
                            cwd=sandbox.root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_spike_survives_downsampling_and_the_best_value_uses_every_point() -> None:
    steps = [float(s) for s in range(10_000)]
    values = [1.0] * 10_000
    values[4321] = 50.0                   # a spike a stride would step over
    values[9000] = 0.25
    xs, ys = downsample(steps, values, 100)
    assert len(xs) <= 100 and 50.0 in ys and xs[-1] == 9999.0 and xs == sorted(xs)
    entries = [{"step": s, "loss": v, "val_acc": v / 100} for s, v in zip(range(10_000), values, strict=True)]
    curves = curves_of(entries, 100)
    assert curves["loss"].best == (0.25, 9000.0) and curves["val_acc"].best == (0.5, 4321.0)
    assert higher_is_better("val_acc") and not higher_is_better("loss")
    assert points_per_curve(12) == 1_000 and points_per_curve(10_000) == 40


@pytest.mark.slow  # the fast subset reads a report through the command
def test_collect_reads_what_status_reads(sandbox: Sandbox) -> None:
    sweep_file = sandbox.write_sweep({"lr": [0.1, float("nan")]}, {"api": True, "steps": 4, "sleep": 0})
    assert sandbox.run("launch", str(sweep_file)).returncode == 0
    data = collect(Sweep(load_spec(sweep_file), str(sandbox.ledger)))
    assert data["params"] == ["lr"] and len(data["runs"]) == 2
    assert [r["params"]["lr"] for r in data["runs"]] == [0.1, "nan"]     # JSON has no NaN
    assert "report.html" not in render(data, plotly="")                # the page is drawn
    run = data["runs"][0]
    assert run["state"] == "done" and run["attempts"] == 1 and run["step"] == 4
    assert [a["outcome"] for a in run["timeline"]] == ["done"]
    assert len(data["curves"][run["id"]]["loss"][0]) == 4


@pytest.mark.slow  # the bucket variant
def test_the_report_of_a_sweep_in_a_bucket_is_written_into_the_bucket(sandbox: Sandbox, s3_bucket: str) -> None:
    """The page goes where the sweep is, so it opens from the bucket's console or a synced copy."""
    import fsspec

    sweep = sandbox.write_sweep({"lr": [0.1, 0.2]}, {"api": True, "steps": 4, "sleep": 0}, store=f"{s3_bucket}/sweeps")
    assert sandbox.run("launch", str(sweep), timeout=300).returncode == 0
    result = sandbox.run("report", str(sweep), "--ledger", str(sandbox.ledger))
    assert result.returncode == 0, result.stderr
    url = f"{s3_bucket}/sweeps/t/report.html"
    assert result.stdout.startswith(f"wrote {url}: 2 run(s)"), result.stdout
    page = fsspec.filesystem("s3").cat_file(url).decode()
    data = json.loads(page.split('type="application/json">', 1)[1].split("</script>", 1)[0])
    assert [len(data["curves"][r["id"]]["loss"][0]) for r in data["runs"]] == [4, 4]    # metrics in the bucket
    assert [r["state"] for r in data["runs"]] == ["done", "done"]
