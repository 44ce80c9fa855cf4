"""Unreachable or unsupported stores: one redacted line, exit 2, nothing written, no traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from sweeprun import open_store
from sweeprun.errors import StoreError

from conftest import Sandbox

CASES = [
    ("ftp-no-server", "ftp://me:s3cr3t@nonexistent.invalid/sweeps", "cannot connect"),
    ("ftp-refused", "ftp://127.0.0.1:1/sweeps", "cannot connect: Connection refused"),
    ("zip", "zip://x", "zip:// is read-only and cannot hold a sweep"),
    ("chained", "simplecache::memory://x", "chained URLs"),
    ("unknown-protocol", "foo://x", "Protocol not known: foo://"),
    ("backend-missing", "az://AKIAEXAMPLE:s3cr3t@bucket/x", "store az://***@bucket/x: Install adlfs"),
    ("s3-credentials-in-url", "s3://AKIAEXAMPLE:s3cr3t@bucket/x",
     "store s3://***@bucket/x: credentials do not belong in the store URL"),
    ("not-utf8", os.fsdecode(b"/tmp/sweeps-\xff"), "is not valid UTF-8"),
    ("missing-drive", "{root}/content/drive/MyDrive/sweeps", "does not exist (is the drive mounted?)"),
]


def _sweep_file(sandbox: Sandbox) -> Path:
    path = sandbox.root / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "command": "python -c pass",
                                    "store": str(sandbox.store), "grid": {"a": [1]}}))
    return path


@pytest.mark.parametrize("command", ["launch", "status"])
@pytest.mark.parametrize("store, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_unusable_store_is_one_line(sandbox: Sandbox, command: str, store: str, fragment: str) -> None:
    sweep = _sweep_file(sandbox)
    before = set(sandbox.root.rglob("*"))
    result = sandbox.run(command, str(sweep), "--store", store.replace("{root}", str(sandbox.root)),
                         timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0] and "Traceback" not in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout
    assert set(sandbox.root.rglob("*")) == before  # no store, no ledger


def test_a_not_utf8_name_is_shown_escaped() -> None:
    with pytest.raises(StoreError, match=r"store /tmp/sweeps-\\udcff is not valid UTF-8"):
        open_store(os.fsdecode(b"/tmp/sweeps-\xff"))


def test_memory_store_stays_usable_by_the_library() -> None:
    store = open_store(f"memory://sweeprun-open/{os.getpid()}")
    store.check_writable()
    assert store.canonical_url == f"memory://sweeprun-open/{os.getpid()}"


@pytest.mark.skipif(sys.platform != "linux", reason="a missing mount point, as on Colab")
def test_check_writable_names_the_missing_parent(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="parent folder .*/drive/MyDrive does not exist"):
        open_store(str(tmp_path / "drive" / "MyDrive" / "sweeps")).check_writable()
