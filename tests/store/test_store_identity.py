"""One spelling per store: ``Store.canonical_url`` is the same for every way of naming one place.

The default ledger is keyed by it; two spellings that gave two strings would give two
ledgers, and every run would execute twice at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sweeprun import open_store
from sweeprun.errors import StoreError


def test_every_spelling_of_a_local_store_is_one_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real"
    (real / "store").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    monkeypatch.setenv("HOME", str(real))
    monkeypatch.chdir(real)
    spellings = [
        str(real / "store"),
        f"file://{real}/store",
        f"local://{real}/store",
        f"{real}/store/",
        f"{real}/store/../store",
        f"{real}/./store",
        "store",
        "./store/",
        "~/store",
        str(tmp_path / "link" / "store"),            # through a symlink
        f"file://{tmp_path}/link/store/",
    ]
    urls = {spelling: open_store(spelling).canonical_url for spelling in spellings}
    assert set(urls.values()) == {os.path.realpath(real / "store")}, urls


def test_colab_my_drive_and_mydrive_are_one_store(tmp_path: Path) -> None:
    """Colab mounts ``MyDrive`` and symlinks ``My Drive`` to it; the store need not exist yet."""
    drive = tmp_path / "content" / "drive"
    (drive / "MyDrive").mkdir(parents=True)
    (drive / "My Drive").symlink_to(drive / "MyDrive", target_is_directory=True)
    first = open_store(str(drive / "My Drive" / "sweeps")).canonical_url
    second = open_store(str(drive / "MyDrive" / "sweeps")).canonical_url
    assert first == second == os.path.realpath(drive / "MyDrive") + "/sweeps"


def test_two_places_stay_two_urls(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert open_store(str(tmp_path / "a")).canonical_url != open_store(str(tmp_path / "b")).canonical_url


def test_a_url_is_protocol_and_path_without_query_or_credentials() -> None:
    base = "sweeprun-canon/x"
    spellings = [f"memory://{base}", f"memory:///{base}", f"memory://{base}/"]
    assert {open_store(s).canonical_url for s in spellings} == {f"memory://{base}"}
    for options in (f"memory://{base}?token=abc", f"memory://{base}#frag"):  # never part of a name
        with pytest.raises(StoreError, match="takes no query string"):
            open_store(options)
    assert "s3cr3t" not in open_store(f"memory://me:s3cr3t@{base}").canonical_url
