"""``nproc:`` and ``on_world_size_change:`` in the sweep file: what they accept, what they refuse
(one line naming file, line and key, exit 2, nothing written), and that nproc never renames a run."""

from __future__ import annotations

import pytest

from sweeprun import parse_spec
from sweeprun.errors import SpecError

from conftest import Sandbox

BASE = "name: t\ncommand: python train.py {lr}\nstore: /tmp/s\ngrid:\n  lr: [0.1, 0.01]\n  world: [1, 2]\n"


def test_nproc_is_one_by_default_and_every_run_says_how_many_it_takes() -> None:
    spec = parse_spec(BASE)
    assert spec.nproc == 1 and spec.on_world_size_change == "reshard"
    assert {spec.nproc_of(run) for run in spec.runs()} == {1}
    assert parse_spec(BASE + "nproc: 4\n").max_nproc() == 4


def test_nproc_from_a_parameter_mixes_one_and_n_process_runs() -> None:
    spec = parse_spec(BASE + 'nproc: "{world}"\non_world_size_change: refuse\n')
    assert sorted(spec.nproc_of(run) for run in spec.runs()) == [1, 1, 2, 2]
    assert spec.max_nproc() == 2 and spec.on_world_size_change == "refuse"
    zipped = parse_spec("name: t\ncommand: python x.py\nzip:\n  world: [1, 3]\n  lr: [1, 2]\nnproc: '{world}'\n")
    assert zipped.max_nproc() == 3


def test_nproc_is_not_part_of_a_run_identity() -> None:
    """Moving a run from 1 to 2 processes (or back) resumes the same run, never a new one."""
    ids = {n: [run.run_id for run in parse_spec(BASE + f"nproc: {n}\n").runs()] for n in (1, 2, 8)}
    assert ids[1] == ids[2] == ids[8] == [run.run_id for run in parse_spec(BASE).runs()]
    assert ids[1] == [run.run_id for run in parse_spec(BASE + "on_world_size_change: refuse\n").runs()]


@pytest.mark.parametrize("line, message", [
    ("nproc: 0", "t.yaml:8: nproc must be an integer from 1 to 1,024 (processes per run)"),
    ("nproc: 2000", "t.yaml:8: nproc must be an integer from 1 to 1,024"),
    ("nproc: true", "t.yaml:8: nproc must be an integer from 1 to 1,024 (processes per run), or \"{param}\" "
                    "naming a parameter that gives it, got true"),
    ("nproc: 1.5", "got 1.5"),
    ("nproc: '2'", "t.yaml:8: nproc '2' must be an integer, or \"{param}\" naming one of the sweep's parameters"),
    ("nproc: '{wrld}'", "t.yaml:8: nproc '{wrld}' must be an integer, or \"{param}\" naming one of the "
                        "sweep's parameters (did you mean 'world'?)"),
    ("nproc: '{lr}'", "t.yaml:5: grid.lr: nproc is '{lr}', so every value of lr must be a number of "
                      "processes, an integer from 1 to 1,024; got 0.1"),
    ("on_world_size_change: reshardd", "t.yaml:8: on_world_size_change must be one of reshard, refuse, got "
                                       "'reshardd' (did you mean 'reshard'?)"),
    ("on_world_size_change: 1", "t.yaml:8: on_world_size_change must be one of reshard, refuse, got 1"),
])
def test_a_bad_value_is_one_line_naming_file_line_and_key(sandbox: Sandbox, line: str, message: str) -> None:
    sweep = sandbox.root / "t.yaml"
    sweep.write_text(BASE.replace("/tmp/s", str(sandbox.store)) + "params: {}\n" + line + "\n")
    with pytest.raises(SpecError, match="nproc|on_world_size_change"):
        parse_spec(sweep.read_text(), str(sweep))
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not sandbox.store.exists()
