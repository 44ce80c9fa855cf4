"""What keeps sweeprun quick at any size, checked by what it does rather than how long it takes.

(How long it takes is for benchmarks/: never a timed assertion on a shared machine.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import sweeprun

HEAVY = ("numpy", "rich", "fsspec", "sqlite_utils", "torch", "psycopg", "s3fs")

LOADED = """
import json, sys
{code}
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def heavy_modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", LOADED.format(code=code, heavy=HEAVY)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_help_imports_nothing_heavy() -> None:
    """`sweeprun --help` answers before any of the launcher's machinery loads."""
    code = ("from sweeprun.cli import main\n"
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--help']) == 0\n"
            "    assert main(['launch', '--help']) == 0")
    assert heavy_modules_after(code) == []


def test_import_sweeprun_is_light() -> None:
    assert heavy_modules_after("import sweeprun") == []


def test_a_bad_flag_is_one_line_without_loading_the_launcher(tmp_path: object) -> None:
    code = ("from sweeprun.cli import main\n"
            "assert main(['launch', 'x.yaml', '--workers', 'many']) == 2")
    assert heavy_modules_after(code) == ["rich"]  # the error line is printed with rich


@pytest.mark.parametrize("name", [n for n in sweeprun.__all__
                                  if n not in ("init", "Run", "load_checkpoint", "ResumableSampler")])
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(sweeprun, name) is not None
    assert name in dir(sweeprun)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sweeprun.nope  # noqa: B018


def test_the_ledger_does_not_load_numpy() -> None:
    """sqlite-utils would import numpy (~60 ms of every launch and status) for nothing."""
    assert "numpy" not in heavy_modules_after("import sweeprun.ledger.sqlite")
    # ... and a process that then uses numpy gets it whole
    assert "numpy" in heavy_modules_after("import sweeprun.ledger.sqlite\nimport numpy\nnumpy.zeros(1)")
