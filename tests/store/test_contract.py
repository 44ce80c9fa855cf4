"""The store contract (:mod:`sweeprun.store.contract`) on local disk, in memory and on S3 (moto)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from sweeprun.store import LocalBackend, MemoryBackend, open_store
from sweeprun.store.contract import NativeStoreContract, StoreContract


class TestLocal(NativeStoreContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return str(tmp_path / "store")


class TestMemory(StoreContract):
    @pytest.fixture
    def url(self) -> str:
        return f"memory://contract-{secrets.token_hex(4)}"


class TestS3(StoreContract):
    @pytest.fixture
    def url(self, s3_bucket: str) -> str:
        return f"{s3_bucket}/store"


def test_each_store_gets_its_backend(tmp_path: Path) -> None:
    assert type(open_store(str(tmp_path)).backend) is LocalBackend
    assert type(open_store("memory://picked").backend) is MemoryBackend
    drive = tmp_path / "content" / "drive" / "MyDrive" / "sweeps"
    drive.mkdir(parents=True)
    late = open_store(str(drive)).backend
    assert late.kind == "late" and late.settle_s > 0 and "Google Drive" in (late.settle_why or "")
