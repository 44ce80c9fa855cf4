"""Run identity: one id per parameter set, whatever its spelling; every id a safe path segment."""

from __future__ import annotations

import itertools
import random
import string

from hypothesis import given
from hypothesis import strategies as st

from sweeprun.identity import (
    LABEL_MAX_CHARS,
    RunSpec,
    canonical_json,
    product_runs,
    run_id,
    sweep_runs,
)

names = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=12)
scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                    st.booleans(), st.text(max_size=300), st.none())
values = st.one_of(scalars, st.lists(scalars, max_size=4))
param_sets = st.dictionaries(names, values, min_size=0, max_size=6)


def test_spec_example_shape() -> None:
    rid = run_id({"lr": 0.01, "seed": 0, "weight_decay": 0.0001, "epochs": 20},
                 label_keys=["lr", "weight_decay", "seed"])
    assert rid.startswith("lr=0.01,seed=0,weight_decay=0.0001-")
    assert len(rid.rsplit("-", 1)[1]) == 8


@given(param_sets, st.randoms())
def test_key_order_does_not_matter(params: dict, rnd) -> None:
    items = list(params.items())
    rnd.shuffle(items)
    assert run_id(dict(items)) == run_id(params)


@given(st.integers(-10**9, 10**9))
def test_int_and_float_spellings_are_one_id(n: int) -> None:
    assert run_id({"x": n}) == run_id({"x": float(n)})


def test_number_spellings() -> None:
    assert run_id({"lr": 1e-4}) == run_id({"lr": 0.0001}) == run_id({"lr": float("1E-04")})
    assert run_id({"x": -0.0}) == run_id({"x": 0})
    assert run_id({"flag": True}) != run_id({"flag": 1})
    assert run_id({"s": "caf\u00e9"}) == run_id({"s": "cafe\u0301"})  # NFC


@given(param_sets, param_sets)
def test_different_params_give_different_ids(a: dict, b: dict) -> None:
    from sweeprun.identity import canonical_json

    if canonical_json(a) != canonical_json(b):
        assert run_id(a) != run_id(b)


@given(param_sets)
def test_ids_are_safe_path_segments(params: dict) -> None:
    rid = run_id(params)
    assert rid and rid not in (".", "..")
    assert "/" not in rid and "\\" not in rid and "\x00" not in rid
    assert all(c in string.ascii_letters + string.digits + "._+=,-" for c in rid)
    assert len(rid) <= LABEL_MAX_CHARS + 9


def test_hostile_values_stay_inside_the_store() -> None:
    for value in ["../../etc/passwd", "/abs/path", "..", "a\nb", "; rm -rf ~", "x" * 10_000, "日本語"]:
        rid = run_id({"name": value})
        assert "/" not in rid and ".." != rid and len(rid) <= LABEL_MAX_CHARS + 9


def test_a_grid_expanded_at_once_names_every_run_as_one_run_at_a_time_would() -> None:
    """``product_runs`` encodes each value once and joins the pieces; the ids, params and
    order must be exactly those of ``RunSpec.from_params`` per point, for awkward values."""
    rnd = random.Random(7)
    values = [0, 1, 1.5, -0.0, 2.0, "a b", "é", "x/../y", True, False, None, [1, 2.0], "nan", 1e300,
              3e-7, "ç" * 60, ".", "=,"]
    for _ in range(200):
        grid = {f"k{rnd.randint(0, 9)}{i}": rnd.sample(values, rnd.randint(1, 3)) for i in range(rnd.randint(1, 4))}
        fixed = {f"f{i}": rnd.choice(values) for i in range(rnd.randint(0, 3))}
        axes = list(grid)
        one_by_one = [RunSpec.from_params({**fixed, **dict(zip(axes, point, strict=True))}, label_keys=axes, index=i)
                      for i, point in enumerate(itertools.product(*grid.values()))]
        at_once = list(product_runs(fixed, grid))
        assert [(r.run_id, r.params, r.index) for r in at_once] == [
            (r.run_id, r.params, r.index) for r in one_by_one], (grid, fixed)


def test_zip_groups_and_exclusions_name_every_run_as_one_run_at_a_time_would() -> None:
    """``sweep_runs`` with axes of several keys (zip groups) and exclusions: the runs kept are
    the product's points that match no entry, in product order, each exactly as
    ``RunSpec.from_params`` names it, with ``index`` counting the kept runs."""
    rnd = random.Random(11)
    values = [0, 1, 1.5, -0.0, 2.0, "a b", "é", True, False, None, [1, 2.0], "nan", 3e-7, "=,", "x/../y"]
    for _ in range(300):
        axes: list[dict[str, list]] = []
        for a in range(rnd.randint(1, 3)):
            length = rnd.randint(1, 3)
            axes.append({f"k{a}{c}": [rnd.choice(values) for _ in range(length)] for c in range(rnd.randint(1, 3))})
        fixed = {f"f{i}": rnd.choice(values) for i in range(rnd.randint(0, 2))}
        varying = [k for axis in axes for k in axis]
        rows = [list(zip(*axis.values(), strict=True)) for axis in axes]
        points = [{k: v for axis, row in zip(axes, combo, strict=True) for k, v in zip(axis, row, strict=True)}
                  for combo in itertools.product(*rows)]
        exclude = [{k: p[k] for k in rnd.sample(varying, rnd.randint(1, len(varying)))}
                   for p in rnd.sample(points, rnd.randint(0, min(3, len(points))))]
        kept = [p for p in points if not any(
            all(canonical_json({k: p[k]}) == canonical_json({k: v}) for k, v in entry.items()) for entry in exclude)]
        one_by_one = [RunSpec.from_params({**fixed, **p}, label_keys=varying, index=i) for i, p in enumerate(kept)]
        at_once = list(sweep_runs(fixed, axes, exclude))
        assert [(r.run_id, r.params, r.index) for r in at_once] == [
            (r.run_id, r.params, r.index) for r in one_by_one], (axes, fixed, exclude)


def test_the_spec_example_keeps_its_ids() -> None:
    """Ids written by earlier versions for the SPEC's example grid: a plain grid names its runs
    exactly as before zip and exclude existed, so finished runs stay finished."""
    grid = {"lr": [0.1, 0.01, 0.001], "weight_decay": [0.0, 0.0001], "seed": [0, 1, 2]}
    ids = [run.run_id for run in product_runs({"epochs": 20}, grid)]
    assert ids[:3] == ["lr=0.1,seed=0,weight_decay=0-693de470", "lr=0.1,seed=1,weight_decay=0-f761c982",
                       "lr=0.1,seed=2,weight_decay=0-b532f5bb"]
    assert ids[9] == "lr=0.01,seed=0,weight_decay=0.0001-0dd0ac03"
    assert ids[-1] == "lr=0.001,seed=2,weight_decay=0.0001-2952d09c"
