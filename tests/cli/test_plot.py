"""``sweeprun plot``: a PNG a user can open, one curve per run, one colour per value of --by."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sweeprun import Sweep, load_spec
from sweeprun.plot import plot_sweep

from conftest import Sandbox

pytest.importorskip("matplotlib")  # the plot extra; CI installs it with the test extra


def finished_sweep(sandbox: Sandbox) -> Path:
    sweep = sandbox.write_sweep({"a": [1, 2, 3], "b": [0, 1]}, {"steps": 6, "sleep": 0})
    assert sandbox.run("launch", str(sweep), "--workers", "2").returncode == 0
    return sweep


def test_plot_writes_a_png_with_one_line_per_run_coloured_by_a_parameter(sandbox: Sandbox) -> None:
    import matplotlib.image

    sweep = finished_sweep(sandbox)
    out = sandbox.root / "curves.png"
    result = subprocess.run([sys.executable, "-m", "sweeprun", "plot", str(sweep), "--metric", "loss",
                             "--by", "a", "-o", str(out)], env=sandbox.env(), cwd=sandbox.root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}: 6 run(s)" in result.stdout
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (500, 800)  # 8 x 5 inches at 100 dpi
    drawn = plot_sweep(Sweep(load_spec(sweep)), "loss", str(sandbox.root / "again.png"), by="a")
    assert drawn.lines == 6 and not drawn.skipped
    assert sorted(drawn.colours) == ["1", "2", "3"] and len(set(drawn.colours.values())) == 3


@pytest.mark.parametrize("args, message", [
    (["--metric", "accuracy"], "no run of sweep t logged 'accuracy'; metrics logged: loss"),
    (["--by", "lr"], "--by 'lr' is not a parameter of sweep t"),
])
def test_a_plot_of_something_that_is_not_there_is_one_line(sandbox: Sandbox, args: list[str], message: str) -> None:
    sweep = finished_sweep(sandbox)
    result = subprocess.run([sys.executable, "-m", "sweeprun", "plot", str(sweep), *args, "-o",
                             str(sandbox.root / "x.png")], env=sandbox.env(), cwd=sandbox.root,
                            capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (sandbox.root / "x.png").exists()
