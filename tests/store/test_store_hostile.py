"""Hostile stores and URLs, as a user meets them through the CLI: links inside the store,
credentials and options in URLs whatever characters they hold, a dead endpoint, a missing
bucket, glob characters in a path. Each is one line on stderr and exit 2, with nothing
written or deleted outside the store and no secret printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from sweeprun.errors import StoreError
from sweeprun.spec import load_spec
from sweeprun.store import (
    S3_FIRST_CONTACT,
    S3_RETRIES,
    atomic_write,
    create_only,
    open_store,
    read_regular,
    remove,
)

from conftest import Sandbox
from servers import free_port

# What a password may hold: quotes, <, >, spaces, slashes, '@', '?', '#'. Each piece between
# them is distinctive, so any piece that shows up anywhere is a leak.
PASSWORD = 'QuoteXY"LessXY<SpaceXY SpaceZZ>SlashXY/AtXY@HashXY#QmarkXY?EndXY'
PIECES = [p for p in re.split(r"[^A-Za-z0-9]+", PASSWORD) if len(p) >= 3]


def _one_line_refusal(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _no_secret(text: str, pieces: list[str] = PIECES) -> None:
    leaked = [p for p in pieces if p in text]
    assert not leaked, (leaked, text)


def _cli(sandbox: Sandbox, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``sweeprun ARGS`` with the ledger the arguments or ``env`` give (not the sandbox's)."""
    return subprocess.run([sys.executable, "-m", "sweeprun", *args], env=sandbox.env(**env),
                          cwd=sandbox.root, text=True, capture_output=True, timeout=120)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _sweep(sandbox: Sandbox, store: str | None = None) -> Path:
    extra = {"store": store} if store else {}
    return sandbox.write_sweep({"a": [1, 2]}, command="python -c pass", **extra)


def _run_id(sweep: Path) -> str:
    return load_spec(sweep).runs()[0].run_id


# -- 1, 2: links inside the store ---------------------------------------------------------------


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """A folder of the user's, outside the store, that a link in the store points at."""
    folder = tmp_path / "home-of-user"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work\n")
    (folder / ".complete").write_text("")  # looks like a done index's marker: still not trusted
    return folder


@pytest.mark.parametrize("where", ["done", "runs", "resets", "trash", "ID", "sweep.yaml"])
def test_a_link_in_the_sweep_folder_is_refused_before_anything_is_written(
        sandbox: Sandbox, user_folder: Path, where: str) -> None:
    """The done index linked to a user's folder: the first launch wrote the index there, the
    second deleted the user's files. Now every launch refuses, and the folder is untouched."""
    sweep = _sweep(sandbox)
    (sandbox.store / "t").mkdir(parents=True)
    target = user_folder / "thesis.tex" if where in ("ID", "sweep.yaml") else user_folder
    (sandbox.store / "t" / where).symlink_to(target)
    before = _files(user_folder)
    for _ in range(2):
        line = _one_line_refusal(sandbox.run("launch", str(sweep)), f"t/{where} is a symbolic link",
                                 "replace it with a real folder")
        assert _files(user_folder) == before, line
    assert not sandbox.ledger.exists()  # refused before the ledger was opened
    assert sorted(p.name for p in (sandbox.store / "t").iterdir()) == [where]


def test_a_done_index_linked_later_is_not_trusted(sandbox: Sandbox, user_folder: Path) -> None:
    """status judges from the runs' own DONE files; the next launch refuses the link."""
    sweep = _sweep(sandbox)
    assert sandbox.run("launch", str(sweep)).returncode == 0
    done = sandbox.store / "t" / "done"
    for entry in done.iterdir():
        (user_folder / entry.name).write_text("{}")
        entry.unlink()
    done.rmdir()
    done.symlink_to(user_folder)
    sandbox.ledger.unlink()  # judged from the store alone
    before = _files(user_folder)
    assert {row["state"] for row in sandbox.status(sweep).values()} == {"done"}
    _one_line_refusal(sandbox.run("launch", str(sweep)), "t/done is a symbolic link")
    assert _files(user_folder) == before


@pytest.mark.parametrize("where, code", [
    ("", 2),             # the run's folder itself
    ("lease", 2),        # store leases: a link there is not a passing failure to retry forever
    ("attempts", 2),
    ("logs", 0),         # a log that cannot be written never stops a run; none goes through the link
])
def test_a_link_inside_a_run_folder_is_never_written_through(
        sandbox: Sandbox, user_folder: Path, where: str, code: int) -> None:
    sweep = _sweep(sandbox)
    run_dir = sandbox.store / "t" / "runs" / _run_id(sweep)
    if where:
        run_dir.mkdir(parents=True)
        (run_dir / where).symlink_to(user_folder)
    else:
        run_dir.parent.mkdir(parents=True)
        run_dir.symlink_to(user_folder)
    before = _files(user_folder)
    result = sandbox.run("launch", str(sweep))
    assert result.returncode == code, result.stderr
    if code == 2:
        assert result.stderr.splitlines()[-1].startswith("error: ") and "is a symbolic link" in result.stderr
        assert "Traceback" not in result.stderr
    assert _files(user_folder) == before


def test_the_store_filesystem_never_writes_deletes_or_reads_through_a_link(
        tmp_path: Path, user_folder: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    (tmp_path / "store" / "t").mkdir(parents=True)
    (tmp_path / "store" / "t" / "lease").symlink_to(user_folder)
    lease = f"{store.root}/t/lease"
    before = _files(user_folder)
    for attempt in (lambda: atomic_write(store.fs, f"{lease}/1.json", b"{}"),
                    lambda: create_only(store.fs, f"{lease}/1.json", b"{}"),
                    lambda: store.fs.pipe_file(f"{lease}/1.json", b"{}"),
                    lambda: store.fs.rm_file(f"{lease}/thesis.tex"),
                    lambda: remove(store.fs, [f"{lease}/thesis.tex"]),
                    lambda: store.fs.rm(f"{lease}/thesis.tex"),
                    lambda: read_regular(store.fs, f"{lease}/thesis.tex", 100)):
        with pytest.raises(StoreError, match="is a symbolic link"):
            attempt()
    assert _files(user_folder) == before
    # The store's own root may be a link (Colab's "My Drive"): only what is below it is checked.
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    aliased = open_store(str(tmp_path / "alias"))
    atomic_write(aliased.fs, f"{aliased.root}/t/runs/x/params.json", b"{}")
    assert (tmp_path / "real" / "t" / "runs" / "x" / "params.json").read_bytes() == b"{}"


# -- 3, 4, 5: credentials and options in URLs -----------------------------------------------------


@pytest.mark.parametrize("command", ["launch", "status"])
@pytest.mark.parametrize("url", [
    f"s3://AKIAEXAMPLEKEY:{PASSWORD}@bucket/x",
    f"s3://AKIAEXAMPLEKEY:{quote(PASSWORD, safe='')}@bucket/x",
    "s3://AKIAEXAMPLEKEY:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/x",  # an AWS secret with '/'
])
def test_s3_credentials_in_the_store_url_are_refused_unprinted(
        sandbox: Sandbox, command: str, url: str) -> None:
    sweep = _sweep(sandbox)
    result = sandbox.run(command, str(sweep), "--store", url)
    _one_line_refusal(result, "credentials do not belong in the store URL")
    _no_secret(result.stdout + result.stderr,
               PIECES + ["AKIAEXAMPLEKEY", "wJalrXUtnFEMI", "K7MDENG", "bPxRfiCYEXAMPLEKEY"])
    assert not sandbox.ledger.exists()


@pytest.mark.parametrize("command", ["launch", "status"])
def test_a_password_in_a_usable_url_is_never_printed(sandbox: Sandbox, command: str) -> None:
    """ftp:// takes its credentials from the URL; errors quote the URL, never the password."""
    sweep = _sweep(sandbox)
    url = f"ftp://me:{quote(PASSWORD, safe='')}@127.0.0.1:{free_port()}/x"
    result = sandbox.run(command, str(sweep), "--store", url)
    _one_line_refusal(result, "cannot connect")
    _no_secret(result.stdout + result.stderr)


@pytest.mark.parametrize("command", ["launch", "status"])
@pytest.mark.parametrize("password", [PASSWORD, quote(PASSWORD, safe="")])
def test_a_ledger_url_password_is_never_printed(sandbox: Sandbox, command: str, password: str) -> None:
    sweep = _sweep(sandbox)
    url = f"postgresql://me:{password}@127.0.0.1:{free_port()}/sweeps"
    result = _cli(sandbox, command, str(sweep), "--ledger", url)
    _one_line_refusal(result, "ledger")
    _no_secret(result.stdout + result.stderr)


@pytest.mark.parametrize("command", ["launch", "status"])
@pytest.mark.parametrize("url", [
    "s3://bucket/x?secret_access_key=SecretQueryXY",
    "s3://bucket/x?endpoint_url=http://h&key=SecretQueryXY",
    "gs://bucket/x?token=SecretQueryXY",
    "s3://bucket/x#SecretQueryXY",
])
def test_options_in_a_store_url_are_refused_unprinted(sandbox: Sandbox, command: str, url: str) -> None:
    """fsspec took them as part of the path: the secret was in every object's key."""
    sweep = _sweep(sandbox)
    result = sandbox.run(command, str(sweep), "--store", url)
    _one_line_refusal(result, "takes no query string or fragment", "environment")
    _no_secret(result.stdout + result.stderr, ["SecretQueryXY"])
    assert not sandbox.ledger.exists()


@pytest.mark.parametrize("command", ["launch", "status"])
@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_libpq_keyword_string_is_no_ledger_path(sandbox: Sandbox, command: str, how: str) -> None:
    """It used to become a SQLite file named with the password."""
    sweep = _sweep(sandbox)
    ledger = "host=db.example port=5432 user=me password=PwdXYsecret dbname=sweeps"
    args = [command, str(sweep)] + (["--ledger", ledger] if how == "flag" else [])
    result = _cli(sandbox, *args, **({"SWEEPRUN_LEDGER": ledger} if how == "env" else {}))
    _one_line_refusal(result, "PostgreSQL keyword string", "postgresql://")
    _no_secret(result.stdout + result.stderr, ["PwdXYsecret"])
    assert not any("PwdXYsecret" in p.name for p in sandbox.root.rglob("*"))
    assert not (sandbox.store / "t").exists()


# -- 6, 7: a dead endpoint, a missing bucket ------------------------------------------------------


def test_first_contact_with_s3_is_bounded_and_later_io_keeps_its_retries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    store = open_store("s3://bucket/x")
    probe = store.first_contact().config_kwargs
    assert _retries(probe)["max_attempts"] <= 3 and probe["connect_timeout"] <= 5
    assert _retries(store.fs.config_kwargs) == S3_RETRIES
    assert S3_FIRST_CONTACT["retries"] == {"mode": "standard", "max_attempts": 2}, "never rewritten"
    assert S3_FIRST_CONTACT["retries"]["max_attempts"] < S3_RETRIES["max_attempts"]


def _retries(config: dict[str, Any]) -> dict[str, Any]:
    """fsspec hands back the filesystem an earlier test of this process made, and botocore
    rewrites its retries in place once a client exists (max_attempts n -> total n + 1)."""
    retries = dict(config["retries"])
    if "total_max_attempts" in retries:
        retries["max_attempts"] = retries.pop("total_max_attempts") - 1
    return retries


@pytest.mark.parametrize("command", ["launch", "status"])
@pytest.mark.parametrize("store", ["s3://bucket/x", "s3://bucket"])
def test_a_dead_s3_endpoint_is_one_line_soon(sandbox: Sandbox, command: str, store: str) -> None:
    sweep = _sweep(sandbox)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
    started = time.monotonic()
    result = sandbox.run(command, str(sweep), "--store", store, env=env)
    took_s = time.monotonic() - started
    _one_line_refusal(result, "s3://bucket")
    assert took_s < 40, took_s  # it took 57-78 s of retries; now a few seconds (wide margin)


@pytest.mark.parametrize("command", ["launch", "status"])
def test_a_missing_bucket_is_refused(sandbox: Sandbox, s3_env: dict[str, str], command: str) -> None:
    """status showed every run pending, as if the sweep had not started."""
    sweep = _sweep(sandbox)
    result = sandbox.run(command, str(sweep), "--store", f"s3://no-such-bucket-{os.getpid()}/x")
    _one_line_refusal(result, "does not exist")
    assert not sandbox.ledger.exists()


# -- 8: glob characters -----------------------------------------------------------------------------


def test_a_local_store_with_brackets_is_taken_literally(sandbox: Sandbox) -> None:
    sibling = _sweep(sandbox, str(sandbox.root / "out1"))
    assert sandbox.run("launch", str(sibling)).returncode == 0
    sweep = sandbox.write_sweep({"a": [1, 2]}, command="python -c pass", name="t",
                                store=str(sandbox.root / "out[1]"))
    assert sibling == sweep  # the same file, now pointing at out[1]
    rows = sandbox.status(sweep)
    assert {row["state"] for row in rows.values()} == {"pending"}  # out1's runs are not these
    assert sandbox.run("launch", str(sweep)).returncode == 0
    assert {row["state"] for row in sandbox.status(sweep).values()} == {"done"}
    assert sorted(p.name for p in (sandbox.root / "out[1]" / "t" / "done").iterdir() if p.name[0] != ".") \
        == sorted(rows)


@pytest.mark.slow  # a sweep trained in a bucket: the full suite's
def test_an_object_store_with_brackets_shows_its_own_runs(sandbox: Sandbox, s3_bucket: str) -> None:
    sweep = _sweep(sandbox, f"{s3_bucket}/out[1]")
    assert sandbox.run("launch", str(sweep)).returncode == 0
    other = sandbox.write_sweep({"a": [1, 2]}, command="python -c pass", name="t",
                                store=f"{s3_bucket}/out1")
    sandbox.ledger.unlink()
    assert {row["state"] for row in sandbox.status(other).values()} == {"pending"}
    sweep = sandbox.write_sweep({"a": [1, 2]}, command="python -c pass", name="t",
                                store=f"{s3_bucket}/out[1]")
    assert {row["state"] for row in sandbox.status(sweep).values()} == {"done"}
