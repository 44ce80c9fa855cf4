"""`sweeprun show SWEEP.yaml RUN`: one run up close, read-only, on local disk and on S3."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from test_manage import CKPT_SCRIPT, api_sweep, cli, runs_dir

from sweeprun import Sweep, load_spec
from sweeprun.manage import resolve_run, run_detail
from sweeprun.render import run_view

from conftest import Sandbox


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")} if folder.exists() else {}


def test_show_a_done_run_with_checkpoints(sandbox: Sandbox) -> None:
    sweep = api_sweep(sandbox, steps=4)
    assert sandbox.run("launch", str(sweep)).returncode == 0
    (run_id,) = sandbox.status(sweep)
    ckpts = runs_dir(sandbox) / run_id / "checkpoints"
    corrupt = sorted(ckpts.glob("ckpt-*.pt"))[1]
    corrupt.write_bytes(corrupt.read_bytes()[:-10])  # truncated: show says so, and why
    before = tree(sandbox.root)

    detail = run_detail(Sweep(load_spec(sweep), str(sandbox.ledger)), run_id)
    console = Console(record=True, width=120)
    console.print(run_view(detail))
    text = console.export_text()
    assert f"run {run_id} · done" in text
    assert "params: steps=4" in text
    assert "attempts (from the ledger)" in text and "done" in text.split("checkpoints")[0]
    assert text.count("yes") == 4 and f"no: truncated: {corrupt.stat().st_size} bytes" in text
    assert "step 4 · loss 2.5 · acc 3" in text  # the last metrics entry, whole
    assert tree(sandbox.root) == before  # show writes nothing, not even a ledger

    as_json = json.loads(cli(sandbox, "show", str(sweep), run_id.rsplit("-", 1)[1], "--json").stdout)
    assert as_json["run_id"] == run_id and as_json["state"] == "done"
    assert [(a["attempt"], a["outcome"], a["exit_code"]) for a in as_json["attempts"]] == [(1, "done", 0)]
    assert [c["step"] for c in as_json["checkpoints"]] == [1, 2, 3, 4, 4]
    assert [c["verified"] for c in as_json["checkpoints"]] == [True, False, True, True, True]
    assert as_json["metrics"][-1] == {"step": 4, "loss": 2.5, "acc": 3.0}
    assert tree(sandbox.root) == before


def test_show_a_failed_run_has_its_exit_code_and_log_tail(sandbox: Sandbox) -> None:
    sweep = sandbox.write_sweep({"a": [1], "fail": [True]}, {"steps": 1, "sleep": 0}, max_attempts=2)
    assert sandbox.run("launch", str(sweep)).returncode == 1
    result = cli(sandbox, "show", str(sweep), "fail=true")
    assert result.returncode == 0, result.stderr
    assert "failed" in result.stdout and "failing on purpose" in result.stdout
    detail = json.loads(cli(sandbox, "show", str(sweep), "fail=true", "--json").stdout)
    assert [(a["attempt"], a["outcome"], a["exit_code"]) for a in detail["attempts"]] == [
        (1, "failed", 7), (2, "failed", 7)]
    assert detail["log"] == "logs/attempt-2.log" and detail["log_tail"] == ["failing on purpose"]


def test_on_a_new_machine_attempts_come_from_the_store(sandbox: Sandbox, tmp_path: Path) -> None:
    sweep = sandbox.write_sweep({"a": [1]}, {"steps": 2, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    fresh = tmp_path / "new-machine.sqlite"
    result = sandbox.run("show", str(sweep), "a=1", "--json", "--ledger", str(fresh))
    assert result.returncode == 0, result.stderr
    detail = json.loads(result.stdout)
    assert detail["attempts_from"] == "store"
    (attempt,) = detail["attempts"]
    assert attempt["attempt"] == 1 and attempt["worker"] and attempt["started_at"]
    assert attempt["outcome"] == "done" and attempt["exit_code"] == 0  # from DONE
    assert not fresh.exists()


@pytest.mark.parametrize("name, message", [
    ("zz-not-a-run", "no run of sweep t matches 'zz-not-a-run'"),
    ("a=", "'a=' matches 3 runs of sweep t: a=1-"),
])
def test_an_unknown_or_ambiguous_run_is_one_line(sandbox: Sandbox, name: str, message: str) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2, 3]}, {"steps": 1, "sleep": 0})
    result = cli(sandbox, "show", str(sweep), name)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_show_resolves_runs_of_the_store_not_in_the_file(sandbox: Sandbox) -> None:
    """A run of an older grid (the file was edited since) is still there to look at."""
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 1, "sleep": 0})
    assert sandbox.run("launch", str(sweep)).returncode == 0
    spec = yaml.safe_load(sweep.read_text())
    spec["grid"]["a"] = [2]
    sweep.write_text(yaml.safe_dump(spec))
    s = Sweep(load_spec(sweep), str(sandbox.ledger))
    run_id = resolve_run(s, "a=1")
    assert run_detail(s, run_id).params == {"a": 1, "sleep": 0, "steps": 1}


@pytest.mark.slow  # a variant: the fast subset keeps the file's other tests
def test_show_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    script = tmp_path / "ckpts.py"
    script.write_text(CKPT_SCRIPT)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "command": f"{sys.executable} {script}",
                                     "store": f"{s3_bucket}/sweeps", "grid": {"steps": [3]}}))
    sandbox = Sandbox(tmp_path)
    (tmp_path / "locks").mkdir()
    assert sandbox.run("launch", str(sweep), timeout=300).returncode == 0
    detail = json.loads(cli(sandbox, "show", str(sweep), "steps=3", "--json").stdout)
    assert detail["state"] == "done"
    assert [c["verified"] for c in detail["checkpoints"]] == [True] * 4
    assert detail["metrics"][-1]["step"] == 3
    assert detail["attempts"][0]["outcome"] == "done"
