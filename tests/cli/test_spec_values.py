"""What a value in the sweep file means (YAML 1.2) and what it becomes on the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sweeprun import parse_spec
from sweeprun.errors import SpecError

from conftest import Sandbox

ECHO = "python -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"


def axis(values: str, command: str = "python train.py {v}", extra: str = "") -> list[object]:
    return parse_spec(f"name: t\ncommand: {command}\nstore: /tmp/s\n{extra}grid:\n  v: {values}\n").grid["v"]


def rendered(values: str, command: str = "python train.py {v}", extra: str = "") -> list[list[str]]:
    spec = parse_spec(f"name: t\ncommand: {command}\nstore: /tmp/s\n{extra}grid:\n  v: {values}\n")
    return [spec.argv(run)[2:] for run in spec.runs()]


@pytest.mark.parametrize("text,value,shown", [
    ("NO", "NO", "NO"), ("yes", "yes", "yes"), ("on", "on", "on"), ("Off", "Off", "Off"), ("y", "y", "y"),
    ("true", True, "true"), ("True", True, "true"), ("TRUE", True, "true"),
    ("false", False, "false"), ("False", False, "false"), ("FALSE", False, "false"), ("tRUE", "tRUE", "tRUE"),
    ("010", 10, "10"), ("0o10", 8, "8"), ("0x10", 16, "16"), ("-7", -7, "-7"), ("+3", 3, "3"),
    ("1e-4", 0.0001, "0.0001"), ("1E3", 1000, "1000"), ("2.50", 2.5, "2.5"), ("-.5", -0.5, "-0.5"),
    ("1.0", 1, "1"), (".inf", "inf", "inf"), ("-.Inf", "-inf", "-inf"), (".nan", "nan", "nan"),
    ("2024-01-01", "2024-01-01", "2024-01-01"), ("12:30", "12:30", "12:30"), ("1_000", "1_000", "1_000"),
    ("0b11", "0b11", "0b11"), ("~", None, "null"), ("null", None, "null"), ("NULL", None, "null"),
    ("''", "", ""), ("'010'", "010", "010"), ("[1, a, true]", [1, "a", True], "1,a,true"),
])
def test_yaml_1_2_meanings_and_the_command_line(text: str, value: object, shown: str) -> None:
    assert axis(f"[{text}]") == [value]
    assert rendered(f"[{text}]") == [[shown]]


def test_empty_value_is_null() -> None:
    spec = parse_spec("name: t\ncommand: python x.py {v}\nstore: /tmp/s\ngrid:\n  v: [1]\nparams:\n  e:\n")
    assert spec.params == {"e": None}


def test_a_date_like_name_is_a_name(sandbox: Sandbox) -> None:
    """``name: 2024-01-01`` was a ``datetime.date`` to YAML 1.1 and refused with a Python repr."""
    sweep = sandbox.root / "s.yaml"
    sweep.write_text(f"name: 2024-01-01\ncommand: {ECHO} {{v}}\nstore: {sandbox.store}\n"
                     "grid:\n  v: [NO, 010, 0x10, 1e-4, 2024-01-01, true, ~]\n")
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stderr
    logs = sorted((sandbox.store / "2024-01-01" / "runs").glob("*/logs/attempt-1.log"))
    seen = sorted(json.loads(log.read_text())[0] for log in logs)
    assert seen == sorted(["NO", "10", "16", "0.0001", "2024-01-01", "true", "null"])


@pytest.mark.parametrize("values", ["[1, true]", "[0, false]", "[1, '1.5', 1.25]", "[null, 'nul']"])
def test_values_that_only_look_alike_are_kept(values: str) -> None:
    assert len(axis(values)) == len(values.split(","))


@pytest.mark.parametrize("values,first,second,text", [
    ("[1, '1']", "1", "'1'", "'1'"),
    ("[true, 'true']", "true", "'true'", "'true'"),
    ("[~, 'null']", "null", "'null'", "'null'"),
    ("[[1, 2], '1,2']", "[1,2]", "'1,2'", "'1,2'"),
    ("[.inf, inf]", "'inf'", "'inf'", None),
])
def test_two_values_with_one_command_line_are_refused(values: str, first: str, second: str,
                                                       text: str | None) -> None:
    with pytest.raises(SpecError) as info:
        axis(values)
    message = str(info.value)
    if text is None:
        assert "more than once" in message
    else:
        assert f"lists {first} and {second}, which both give {text} on the command line" in message


def test_duplicate_check_is_linear(sandbox: Sandbox) -> None:
    """100,000 values (the old check compared every pair: minutes); the guard only stops a hang."""
    sweep = sandbox.root / "s.yaml"
    values = ", ".join(str(i) for i in range(100_000))
    sweep.write_text(f"name: t\ncommand: python x.py {{v}}\nstore: {sandbox.store}\n"
                     f"grid:\n  v: [{values}, 5]\n")
    result = sandbox.run("launch", str(sweep), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {sweep}:5: grid.v lists 5 more than once"]
    assert not sandbox.store.exists()


def test_format_specs_render_numbers(sandbox: Sandbox) -> None:
    sweep = sandbox.root / "s.yaml"
    sweep.write_text(f"name: t\ncommand: {ECHO} --lr={{lr:.0e}} {{seed:03d}} {{tag:>5}}\nstore: {sandbox.store}\n"
                     "grid:\n  lr: [1e-4, 0.001]\n  seed: [7]\nparams:\n  tag: ab\n")
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stderr
    logs = (sandbox.store / "t" / "runs").glob("*/logs/attempt-1.log")
    assert sorted(json.loads(log.read_text()) for log in logs) == [
        ["--lr=1e-03", "007", "   ab"], ["--lr=1e-04", "007", "   ab"]]


def test_format_spec_that_merges_two_values_is_refused() -> None:
    with pytest.raises(SpecError, match=r"lists 0.0001 and 0.00011, which both give '1e-04' in \{v:.0e\}"):
        axis("[0.0001, 0.00011]", command="python x.py --lr={v:.0e}")


def test_flags_are_present_or_absent(sandbox: Sandbox) -> None:
    sweep = sandbox.root / "s.yaml"
    sweep.write_text(f"name: t\ncommand: {ECHO} --lr {{lr}} {{fp16}} {{compile}}\nstore: {sandbox.store}\n"
                     "grid:\n  lr: [0.1]\n  fp16: [true, false]\nparams:\n  compile: true\n"
                     "flags:\n  fp16: --fp16\n  compile: --compile --mode 'max autotune'\n")
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stderr
    logs = (sandbox.store / "t" / "runs").glob("*/logs/attempt-1.log")
    assert sorted(json.loads(log.read_text()) for log in logs) == [
        ["--lr", "0.1", "--compile", "--mode", "max autotune"],
        ["--lr", "0.1", "--fp16", "--compile", "--mode", "max autotune"]]
    rows = sandbox.status(sweep)
    assert sorted(r["params"]["fp16"] for r in rows.values()) == [False, True]


def test_nan_and_inf_stay_distinct_from_numbers() -> None:
    values = axis("[.nan, .inf, -.inf, 1.5]")
    assert values == ["nan", "inf", "-inf", 1.5]
    assert not any(isinstance(v, float) and math.isnan(v) for v in values)


def test_relative_store_is_relative_to_the_sweep_file(sandbox: Sandbox, tmp_path: Path) -> None:
    """``status`` from another folder sees the same runs as the launch did."""
    project = sandbox.root / "project"
    project.mkdir()
    sweep = project / "s.yaml"
    sweep.write_text("name: t\ncommand: python x.py {v}\nstore: ./out\ngrid:\n  v: [1]\n"
                     "ledger: state/ledger.sqlite\n")
    spec = parse_spec(sweep.read_text(), str(sweep), base=project)
    assert spec.store == str(project / "out")
    assert spec.ledger == str(project / "state" / "ledger.sqlite")
    assert spec.text == sweep.read_text()
    home = parse_spec("name: t\ncommand: x {v}\nstore: ~/sweeps\ngrid:\n  v: [1]\n", base=project)
    assert home.store == str(Path.home() / "sweeps")
    url = parse_spec("name: t\ncommand: x {v}\nstore: memory://bucket/x\ngrid:\n  v: [1]\n", base=project)
    assert url.store == "memory://bucket/x"
