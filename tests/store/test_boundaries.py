"""The store package is the one place that knows which kind of store it is talking to."""

from __future__ import annotations

import re
from pathlib import Path

import sweeprun

PACKAGE = Path(sweeprun.__file__).parent
ASKS_THE_KIND = re.compile(r"\bis_local\b|\b_strip_protocol\b|\bLocalFileSystem\b")


def test_only_the_store_package_asks_which_kind_of_store_it_is() -> None:
    outside = [f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
               for path in sorted(PACKAGE.rglob("*.py")) if "store" not in path.relative_to(PACKAGE).parts[:1]
               for n, line in enumerate(path.read_text().splitlines(), 1) if ASKS_THE_KIND.search(line)]
    assert outside == []


def test_no_store_module_is_over_600_lines() -> None:
    sizes = {path.name: len(path.read_text().splitlines()) for path in (PACKAGE / "store").glob("*.py")}
    assert max(sizes.values()) <= 600, sizes
