"""Paired values (``zip:``) and skipped points (``exclude:``) in the sweep file.

A large model needs a smaller batch, and some corners of a grid are known to
diverge: both are written as values, both keep every run's id what its
parameters alone make it, and every mistake is one line naming the line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweeprun import parse_spec, run_id
from sweeprun.errors import SpecError

from conftest import Sandbox

ECHO = "python -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
HEAD = "name: t\ncommand: python train.py --model {model} --batch {batch} --lr {lr}\nstore: /tmp/s\n"


def ids(text: str) -> list[str]:
    return [run.run_id for run in parse_spec(text, "s.yaml").runs()]


def points(text: str) -> list[dict[str, object]]:
    return [run.params for run in parse_spec(text, "s.yaml").runs()]


def test_a_plain_grid_keeps_its_run_ids() -> None:
    """The ids of the SPEC's example, pinned from before zip and exclude existed."""
    spec = parse_spec("name: mlp\ncommand: python train.py {lr} {weight_decay} {seed} {epochs}\n"
                      "store: /tmp/s\ngrid:\n  lr: [0.1, 0.01, 0.001]\n  weight_decay: [0.0, 0.0001]\n"
                      "  seed: [0, 1, 2]\nparams:\n  epochs: 20\n")
    runs = spec.runs()
    assert (spec.size(), len(runs), spec.varying()) == (18, 18, ["lr", "weight_decay", "seed"])
    assert [runs[0].run_id, runs[9].run_id, runs[-1].run_id] == [
        "lr=0.1,seed=0,weight_decay=0-693de470", "lr=0.01,seed=0,weight_decay=0.0001-0dd0ac03",
        "lr=0.001,seed=2,weight_decay=0.0001-2952d09c"]
    assert [run.index for run in runs] == list(range(18))


def test_zip_values_vary_together() -> None:
    text = HEAD + "grid:\n  lr: [0.1, 0.01]\nzip:\n  model: [small, large]\n  batch: [64, 16]\n"
    assert points(text) == [
        {"batch": 64, "lr": 0.1, "model": "small"}, {"batch": 16, "lr": 0.1, "model": "large"},
        {"batch": 64, "lr": 0.01, "model": "small"}, {"batch": 16, "lr": 0.01, "model": "large"}]
    assert ids(text)[0] == run_id({"model": "small", "batch": 64, "lr": 0.1})
    assert ids(text)[0].startswith("batch=64,lr=0.1,model=small-")  # every varying key labels the id
    assert parse_spec(text).size() == 4


def test_axes_vary_in_the_order_the_file_lists_them() -> None:
    """The first axis varies slowest; a zip group is one axis, placed where ``zip:`` is written.
    Order decides only which runs start first: the same points have the same ids."""
    grid_first = HEAD + "grid:\n  lr: [0.1, 0.01]\nzip:\n  model: [small, large]\n  batch: [64, 16]\n"
    zip_first = HEAD + "zip:\n  model: [small, large]\n  batch: [64, 16]\ngrid:\n  lr: [0.1, 0.01]\n"
    assert [(p["lr"], p["model"]) for p in points(grid_first)] == [
        (0.1, "small"), (0.1, "large"), (0.01, "small"), (0.01, "large")]
    assert [(p["lr"], p["model"]) for p in points(zip_first)] == [
        (0.1, "small"), (0.01, "small"), (0.1, "large"), (0.01, "large")]
    assert sorted(ids(grid_first)) == sorted(ids(zip_first))


def test_a_key_moved_between_grid_and_zip_keeps_its_runs() -> None:
    """Identity is the parameters only: a grid key rewritten as a group of one gives the same runs."""
    as_grid = HEAD + "grid:\n  lr: [0.1, 0.01]\n  model: [small]\n  batch: [64]\n"
    as_zip = HEAD + "grid:\n  lr: [0.1, 0.01]\nzip:\n  model: [small]\n  batch: [64]\n"
    assert ids(as_grid) == ids(as_zip)


def test_several_zip_groups_multiply() -> None:
    text = ("name: t\ncommand: python train.py {model} {batch} {opt} {lr}\nstore: /tmp/s\nzip:\n"
            "  - {model: [small, large], batch: [64, 16]}\n  - {opt: [sgd, adam], lr: [0.1, 0.001]}\n")
    assert [(p["model"], p["opt"]) for p in points(text)] == [
        ("small", "sgd"), ("small", "adam"), ("large", "sgd"), ("large", "adam")]
    assert all((p["model"] == "small") == (p["batch"] == 64) and (p["opt"] == "sgd") == (p["lr"] == 0.1)
               for p in points(text))


def test_a_zip_column_may_repeat_a_value() -> None:
    """Two models with one batch size are two points, not a duplicate."""
    text = HEAD + "grid:\n  lr: [0.1]\nzip:\n  model: [small, base, large]\n  batch: [64, 64, 16]\n"
    assert [p["batch"] for p in points(text)] == [64, 64, 16]


def test_exclude_skips_the_runs_that_match_every_key_of_an_entry() -> None:
    text = (HEAD + "grid:\n  lr: [0.1, 0.01]\nzip:\n  model: [small, large]\n  batch: [64, 16]\n"
            "exclude:\n  - {model: large, lr: 0.1}\n")
    assert [(p["model"], p["lr"]) for p in points(text)] == [("small", 0.1), ("small", 0.01), ("large", 0.01)]
    runs = parse_spec(text).runs()
    assert [run.index for run in runs] == [0, 1, 2]  # claim order counts the runs kept
    full = ids(text.split("exclude:")[0])
    assert set(ids(text)) < set(full)  # the runs kept keep their ids


def test_exclude_entries_of_one_key_and_of_one_group() -> None:
    text = (HEAD + "grid:\n  lr: [0.1, 0.01, 0.001]\nzip:\n  model: [small, base, large]\n"
            "  batch: [64, 32, 16]\nexclude:\n  - lr: 0.001\n  - {model: base, batch: 32}\n")
    assert sorted({(p["model"], p["lr"]) for p in points(text)}) == [
        ("large", 0.01), ("large", 0.1), ("small", 0.01), ("small", 0.1)]


def test_one_exclude_mapping_is_one_entry() -> None:
    text = HEAD + "grid:\n  lr: [0.1, 0.01]\n  model: [a, b]\n  batch: [1]\nexclude: {model: b, lr: 0.1}\n"
    assert len(points(text)) == 3


def test_exclude_values_mean_what_grid_values_mean() -> None:
    """``1e-1`` is ``0.1``, ``[64, 64]`` is one list value, and ``1`` is never ``true``."""
    text = ("name: t\ncommand: python train.py {lr} {layers} {fp16}\nstore: /tmp/s\ngrid:\n"
            "  lr: [0.1, 0.01]\n  layers: [[64, 64], [128]]\n  fp16: [true, false]\n"
            "exclude:\n  - {lr: 1e-1, layers: [64, 64], fp16: true}\n")
    assert len(points(text)) == 7
    with pytest.raises(SpecError, match=r"s.yaml:9: exclude\[0\]: fp16 = 1 matches no run; fp16 takes true, false"):
        parse_spec(text.replace("fp16: true}", "fp16: 1}"), "s.yaml")


def test_an_exclusion_that_skips_everything_is_refused() -> None:
    spec = parse_spec(HEAD + "grid:\n  lr: [0.1]\n  model: [a]\n  batch: [1]\nexclude:\n  - {lr: 0.1}\n", "s.yaml")
    with pytest.raises(SpecError, match=r"^s.yaml: exclude skips every one of the sweep's 1 runs; remove an entry$"):
        spec.runs()


def test_size_counts_points_without_expanding_them() -> None:
    """``size`` stays a product of lengths (exclusions only remove runs), and ``max_runs``
    bounds it, so a huge grid times a zip group is refused before any run is made."""
    values = ", ".join(map(str, range(2000)))
    spec = parse_spec(HEAD + f"max_runs: 4000000\ngrid:\n  lr: [{values}]\n"
                      f"zip:\n  model: [{values}]\n  batch: [{values}]\nexclude:\n  - {{lr: 1, model: 2}}\n")
    assert spec.size() == 4_000_000
    with pytest.raises(SpecError, match=r":6: grid and zip give 4,000,000 runs, more than max_runs \(1,000,000\)"):
        parse_spec(HEAD + f"grid:\n  lr: [{values}]\nzip:\n  model: [{values}]\n  batch: [{values}]\n")
    with pytest.raises(SpecError, match=r":4: zip gives 4,000,000 runs, more than max_runs \(1,000,000\)"):
        parse_spec(HEAD + f"zip:\n  - {{model: [{values}], batch: [{values}]}}\n  - {{lr: [{values}]}}\n")


ZIP = "zip:\n  model: [small, large]\n  batch: [64, 16]\n"
GRID = "grid:\n  lr: [0.1, 0.01]\n"


@pytest.mark.parametrize("text,message", [
    (GRID + "zip:\n  model: [small, large]\n  batch: [64, 16, 8]\n",
     "s.yaml:8: zip lists go together value by value, so they must be equally long: model has 2 values, "
     "batch has 3"),
    (GRID + "zip:\n  - {model: [a, b], batch: [1, 2]}\n  - {lr2: [1], seed: [1, 2]}\n",
     "s.yaml:8: zip[1] lists go together value by value, so they must be equally long: lr2 has 1 values, "
     "seed has 2"),
    (GRID + "zip: [small, large]\n", "s.yaml:6: zip must map parameter names to lists whose i-th values go "
     "together, e.g. `zip: {model: [small, large], batch: [64, 16]}`"),
    (GRID + "zip:\n  - {model: [a], batch: [1]}\n  - [small, large]\n",
     "s.yaml:8: zip[1] must map parameter names to lists"),
    (GRID + "zip:\n  model: small\n  batch: [64]\n", "s.yaml:7: zip.model must be a list of values; write "
     "['small'] for one value"),
    (GRID + "zip:\n  model: []\n  batch: []\n", "s.yaml:7: zip.model is an empty list, so the sweep has no runs"),
    (GRID + "zip:\n  lr: [1, 2]\n  batch: [64, 16]\n", "s.yaml:7: 'lr' is both in grid and in zip; keep one"),
    (GRID + "zip:\n  - {model: [a], batch: [1]}\n  - {model: [b], seed: [1]}\n",
     "s.yaml:8: 'model' is both in zip[0] and in zip[1]; keep one"),
    (GRID + ZIP + "params:\n  batch: 8\n", "s.yaml:10: 'batch' is both in zip and in params; keep one"),
    (GRID + "zip:\n  model: [small, small]\n  batch: [64, 64]\n",
     "s.yaml:6: zip gives the point (model='small', batch=64) twice (points 1 and 2); keep one"),
    (GRID + "zip:\n  model: [1, '1']\n  batch: [64, 64]\n", "s.yaml:6: zip points 1 and 2, (model=1, batch=64) "
     "and (model='1', batch=64), give the same command line; keep one"),
    (GRID + "zip:\n  model: [small, 2]\n  batch: [{a: 1}, 16]\n",
     "s.yaml:8: zip.batch: values must be scalars or lists, not a mapping"),
    (GRID + "zip:\n  model-size: [a]\n  batch: [1]\n", "s.yaml:7: parameter name 'model-size' must be a "
     "Python identifier"),
    (GRID + ZIP + "exclude:\n  - {model: xl}\n",
     "s.yaml:10: exclude[0]: model = 'xl' matches no run; model takes 'small', 'large'"),
    (GRID + ZIP + "exclude:\n  - {modle: large}\n",
     "s.yaml:10: exclude[0]: 'modle' is not a key of grid or zip (did you mean 'model'?)"),
    (GRID + ZIP + "exclude:\n  - {model: large, batch: 64}\n",
     "s.yaml:10: exclude[0] matches no run: no point of zip has model = 'large' and batch = 64"),
    (GRID + ZIP + "exclude:\n  - {lr: 0.1}\n  - {}\n",
     "s.yaml:11: exclude[1] is empty, so it would skip every run"),
    (GRID + ZIP + "exclude:\n  - lr\n", "s.yaml:10: exclude[0] must be a partial point, a mapping such as "
     "`{model: large, lr: 0.1}`"),
    (GRID + ZIP + "exclude: lr\n", "s.yaml:9: exclude must be a list of partial points"),
    (GRID + ZIP + "params:\n  epochs: 3\nexclude:\n  - {epochs: 3}\n",
     "s.yaml:12: exclude[0]: 'epochs' is fixed in params, the same in every run; exclude names keys of grid "
     "or zip"),
    (GRID + ZIP + "exclude:\n  - {lr: [0.1, 0.01]}\n", "s.yaml:10: exclude[0]: lr = [0.1,0.01] matches no run; "
     "lr takes 0.1, 0.01 (an entry is one point: write one entry per value)"),
])
def test_bad_zip_or_exclude_is_one_line_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(HEAD + text, "s.yaml")
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_zip_keys_are_placeholders_and_flags() -> None:
    """Paired keys take part in the command's checks like grid keys: a typo is caught, a
    boolean can be a flag, and two values that format alike refuse only when their runs
    would then have the same command line."""
    with pytest.raises(SpecError, match=r"unknown placeholder \{batchsize\} \(did you mean 'batch'\?\)"):
        parse_spec(HEAD.replace("{batch}", "{batchsize}") + GRID + ZIP)
    spec = parse_spec("name: t\ncommand: python t.py {model} {amp}\nstore: /tmp/s\n"
                      "zip:\n  model: [small, large]\n  amp: [false, true]\nflags:\n  amp: --amp\n")
    assert [spec.argv(run)[2:] for run in spec.runs()] == [["small"], ["large", "--amp"]]
    merged = "name: t\ncommand: python t.py {model} --lr={lr:.0e}\nstore: /tmp/s\nzip:\n  model: [a, b]\n"
    assert len(parse_spec(merged + "  lr: [0.0001, 0.00011]\n").runs()) == 2  # a and b still differ
    with pytest.raises(SpecError, match=r"zip points 1 and 2, \(model='a', lr=0.0001\) and \(model='a', "
                                        r"lr=0.00011\), give the same command line"):
        parse_spec(merged.replace("[a, b]", "[a, a]") + "  lr: [0.0001, 0.00011]\n")


def test_too_many_shapes_of_exclusion_are_refused() -> None:
    """Each distinct set of keys across axes is one lookup per run: the count is bounded."""
    keys = [f"k{i}" for i in range(7)]
    grid = "".join(f"  {k}: [0, 1]\n" for k in keys)
    entries = "".join(f"  - {{{a}: 0, {b}: 0}}\n" for i, a in enumerate(keys) for b in keys[i + 1:])
    text = f"name: t\ncommand: python t.py {' '.join('{' + k + '}' for k in keys)}\nstore: /tmp/s\ngrid:\n{grid}"
    assert len(parse_spec(text + "exclude:\n" + "".join(entries.splitlines(True)[:16]), "s.yaml").runs()) > 0
    with pytest.raises(SpecError, match=r"s.yaml:29: exclude names more than 16 different sets of keys"):
        parse_spec(text + "exclude:\n" + entries, "s.yaml")


def test_a_sweep_with_pairs_and_exclusions_runs_end_to_end(sandbox: Sandbox) -> None:
    """``launch`` runs each kept point once with its paired values on its command line;
    launching again finds them all done and starts nothing."""
    sweep = sandbox.root / "pairs.yaml"
    sweep.write_text(f"name: pairs\ncommand: {ECHO} --model {{model}} --batch {{batch}} --lr {{lr}}\n"
                     f"store: {sandbox.store}\n"
                     "zip:\n  model: [small, large]\n  batch: [64, 16]\n"
                     "grid:\n  lr: [0.1, 0.01]\n"
                     "exclude:\n  - {model: large, lr: 0.1}\n")
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 0, result.stderr
    runs = sandbox.store / "pairs" / "runs"
    argvs = {path.parent.parent.name: json.loads(path.read_text())
             for path in runs.glob("*/logs/attempt-1.log")}
    expected = {run_id({"model": m, "batch": b, "lr": lr}): ["--model", m, "--batch", str(b), "--lr", str(lr)]
                for m, b, lr in [("small", 64, 0.1), ("small", 64, 0.01), ("large", 16, 0.01)]}
    assert argvs == expected
    assert all(json.loads((runs / rid / "params.json").read_text())["batch"] in (64, 16) for rid in expected)
    status = sandbox.status(sweep)
    assert set(status) == set(expected) and {row["state"] for row in status.values()} == {"done"}
    again = sandbox.run("launch", str(sweep))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in runs.glob("*/logs/attempt-*.log")) == ["attempt-1.log"] * 3


@pytest.mark.parametrize("body,message", [
    ("zip:\n  model: [small, large]\n  batch: [64]\n",
     "{sweep}:6: zip lists go together value by value, so they must be equally long: model has 2 values, "
     "batch has 1"),
    ("zip:\n  model: [small]\n  batch: [64]\nexclude:\n  - {model: small}\n",
     "{sweep}: exclude skips every one of the sweep's 1 runs; remove an entry"),
])
def test_a_bad_zip_or_exclude_is_exit_2_with_nothing_written(sandbox: Sandbox, body: str, message: str) -> None:
    sweep = sandbox.root / "bad.yaml"
    sweep.write_text(f"name: bad\ncommand: python t.py {{model}} {{batch}}\nstore: {sandbox.store}\n" + body)
    result = sandbox.run("launch", str(sweep))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.strip().splitlines() == ["error: " + message.format(sweep=sweep)]
    assert not sandbox.store.exists()


def test_status_shows_the_paired_keys(sandbox: Sandbox) -> None:
    """Two runs that differ only in their zip values must not look alike in ``status``."""
    sweep = sandbox.root / "pairs.yaml"
    sweep.write_text(f"name: pairs\ncommand: {ECHO} {{model}} {{batch}} {{lr}}\nstore: {sandbox.store}\n"
                     "zip:\n  model: [small, large]\n  batch: [64, 16]\ngrid:\n  lr: [0.1]\n")
    assert sandbox.run("launch", str(sweep)).returncode == 0
    shown = sorted(tuple(sorted(row["params"])) for row in sandbox.status(sweep).values())
    assert shown == [("batch", "lr", "model")] * 2


def test_the_example_sweep_file() -> None:
    from sweeprun import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "pairs.yaml")
    runs = spec.runs()
    assert (spec.size(), len(runs)) == (8, 6)
    assert {(r.params["optimizer"], r.params["lr"]) for r in runs} == {("sgd", 0.1), ("adamw", 0.003)}
    assert not any(r.params["optimizer"] == "sgd" and r.params["batch_size"] == 16 for r in runs)
    assert spec.argv(runs[0])[1:] == ["examples/train_mlp.py", "--optimizer", "sgd", "--lr", "0.1",
                                      "--batch-size", "64", "--seed", "0", "--epochs", "4"]
