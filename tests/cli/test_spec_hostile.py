"""Hostile or huge sweep files: each is refused in one line, quickly, with nothing written.

Every case runs the real CLI in its own process; the timeout only keeps a regression
(a hang, a memory blow-up) from stalling the suite, it asserts nothing about speed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sweeprun import run_id

from conftest import Sandbox

HEAD = "name: t\ncommand: python x.py {lr}\nstore: STORE\n"


def bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return HEAD + "\n".join(lines) + "\ngrid:\n  lr: *a9\n"


CASES = [
    ("recursive-alias", HEAD + "grid:\n  lr: &a [1, *a]\n", ":5: alias *a refers to the value that contains it"),
    ("alias-bomb", bomb(), "aliases expand the file to more than 1,000,000 values"),
    ("deep-flow-nesting", HEAD + "grid:\n  lr: " + "[" * 100_000 + "]" * 100_000 + "\n",
     ":5: values are nested more than 64 levels deep"),
    ("deep-block-nesting", HEAD + "grid:\n" + "".join(" " * i + "- \n" for i in range(2, 300)),
     "values are nested more than 64 levels deep"),
    ("huge-integer", HEAD + "grid:\n  lr: [" + "7" * 5000 + "]\n", ":5: an integer of 5,000 digits is too long"),
    ("huge-hex-integer", HEAD + "grid:\n  lr: [0x" + "f" * 5000 + "]\n", ":5: an integer over 4300 digits"),
    ("nul-in-value", HEAD + 'grid:\n  lr: ["a\\0b"]\n', "grid.lr: value 'a\\x00b' contains a NUL character"),
    ("nul-in-command", HEAD.replace("python x.py {lr}", '"python x.py {lr} \\0"') + "grid:\n  lr: [1]\n",
     ":2: command contains a NUL character"),
    ("nul-in-flag", HEAD + "grid:\n  lr: [true]\nflags:\n  lr: \"--a\\0\"\n", "flags.lr must be the flag"),
    ("raw-nul", HEAD + "grid:\n  lr: [a\0b]\n", "invalid YAML: unacceptable character #x0000"),
    ("timestamp-tag", HEAD + "grid:\n  lr: [!!timestamp 2024-01-01]\n", "tag tag:yaml.org,2002:timestamp is not"),
    ("merge-key", HEAD + "grid:\n  lr: [1]\nparams: {!!merge <<: {a: 1}}\n", "merge keys (<<) are not supported"),
    ("billion-runs", HEAD + "grid:\n" + "".join(f"  p{i}: [0,1,2,3,4,5,6,7,8,9]\n" for i in range(9))
     + "  lr: [1]\n", ":4: the grid has 1,000,000,000 runs, more than max_runs (1,000,000)"),
    ("billion-paired-runs", HEAD + "zip:\n" + "".join(f"  - {{p{i}: [0,1,2,3,4,5,6,7,8,9], q{i}: [0,1,2,3,4,5,6,7,8,9]}}\n"
                                                     for i in range(9)) + "grid:\n  lr: [1]\n",
     ":4: grid and zip give 1,000,000,000 runs, more than max_runs (1,000,000)"),
    ("exclude-shapes", HEAD + "grid:\n" + "".join(f"  p{i}: [0, 1]\n" for i in range(8)) + "  lr: [1]\nexclude:\n"
     + "".join(f"  - {{p{i}: 0, p{j}: 1}}\n" for i in range(8) for j in range(i + 1, 8)),
     ":31: exclude names more than 16 different sets of keys"),
    ("over-raised-limit", HEAD + "max_runs: 99\ngrid:\n  lr: [" + ", ".join(map(str, range(100))) + "]\n",
     "the grid has 100 runs, more than max_runs (99)"),
    ("name-too-long", HEAD.replace("name: t", "name: " + "n" * 300) + "grid:\n  lr: [1]\n",
     ":1: name is 300 characters; at most 128"),
    ("argument-too-long", HEAD + "grid:\n  lr: [short, " + "x" * 200_000 + "]\n",
     "argument 3 of the command would be 200,001 bytes with lr = 'xxx"),
    ("command-too-long", HEAD.replace("{lr}", " ".join(["{lr}"] * 12)) + "grid:\n  lr: [" + "y" * 100_000 + "]\n",
     "the command would be 1,200,"),
]


@pytest.mark.parametrize("text,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_file_is_refused_in_one_line(sandbox: Sandbox, text: str, fragment: str) -> None:
    sweep = sandbox.root / "s.yaml"
    sweep.write_text(text.replace("STORE", str(sandbox.store)))
    result = sandbox.run("launch", str(sweep), timeout=120)
    assert (result.returncode, result.stdout) == (2, "")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert fragment in lines[0], lines[0][:2000]
    assert len(lines[0]) < 1000  # a 200 KB value is shown cut short
    assert not sandbox.store.exists() and not sandbox.ledger.exists()


def test_the_error_names_the_run_with_the_long_argument(sandbox: Sandbox) -> None:
    sweep = sandbox.root / "s.yaml"
    sweep.write_text(HEAD.replace("STORE", str(sandbox.store))
                     + "grid:\n  lr: [short, " + "x" * 200_000 + "]\n  seed: [1, 2]\n")
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == 2
    worst = run_id({"lr": "x" * 200_000, "seed": 1}, label_keys=["lr", "seed"])
    assert f":2: run {worst}: argument 3 of the command" in result.stderr


def test_a_raised_limit_allows_the_grid(sandbox: Sandbox) -> None:
    sweep = sandbox.root / "s.yaml"
    sweep.write_text(HEAD.replace("STORE", str(sandbox.store)).replace("{lr}", "{lr} {b}")
                     + "max_runs: 2000000\ngrid:\n  lr: [" + ", ".join(map(str, range(2000))) + "]\n"
                     "  b: [" + ", ".join(map(str, range(1000))) + "]\n")
    from sweeprun import load_spec

    assert load_spec(sweep).size() == 2_000_000


def test_a_long_zip_with_an_exclusion_per_point_stays_linear() -> None:
    """5,000 points and an exclusion for all but one: each entry is a set lookup, never a
    scan of the points (25 million steps if it were; nothing here is timed)."""
    from sweeprun import parse_spec

    n = 5_000
    text = ("name: t\ncommand: python x.py {x} {y}\nstore: /tmp/s\nzip:\n"
            f"  x: [{', '.join(map(str, range(n)))}]\n  y: [{', '.join(str(i % 97) for i in range(n))}]\n"
            "exclude:\n" + "".join(f"  - {{x: {i}, y: {i % 97}}}\n" for i in range(1, n)))
    assert [run.params for run in parse_spec(text).runs()] == [{"x": 0, "y": 0}]


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "too-big", "folder"])
def test_only_a_bounded_regular_file_is_read(sandbox: Sandbox, kind: str) -> None:
    """``/dev/zero`` would be read until memory runs out; a FIFO would block forever."""
    path: Path | str
    if kind == "dev-zero":
        path, fragment = "/dev/zero", "is not a regular file"
    elif kind == "fifo":
        path = sandbox.root / "pipe.yaml"
        os.mkfifo(path)
        fragment = "is not a regular file"
    elif kind == "too-big":
        path = sandbox.root / "big.yaml"
        path.write_text(HEAD + "grid:\n  lr: [" + "1, " * 400_000 + "2]\n")
        fragment = "is over 1024 KiB"
    else:
        path, fragment = sandbox.root, "is a folder"
    result = sandbox.run("launch", str(path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert not sandbox.store.exists()
