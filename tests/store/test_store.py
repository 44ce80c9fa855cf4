"""The store layout over fsspec, on local disk and memory://, and the library used in-process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fsspec
import pytest

from sweeprun import Sweep, open_store, parse_spec
from sweeprun.errors import StoreError
from sweeprun.render import PlainEvents
from sweeprun.runner import Launcher, LaunchOptions
from sweeprun.store import atomic_write


@pytest.fixture(params=["local", "memory"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        url = f"memory://sweeprun-test/{tmp_path.name}"
        yield url
        fsspec.filesystem("memory").rm(f"/sweeprun-test/{tmp_path.name}", recursive=True)
    else:
        yield str(tmp_path / "store")


def test_layout_and_atomic_writes(store_url: str) -> None:
    store = open_store(store_url)
    sweep = store.sweep("demo")
    run = sweep.run("lr=0.1-abcdef12")
    assert run.dir.endswith("/demo/runs/lr=0.1-abcdef12")
    assert run.log(3).endswith("/logs/attempt-3.log")
    atomic_write(store.fs, run.params, b'{"lr": 0.1}')
    atomic_write(store.fs, run.params, b'{"lr": 0.2}')  # replaces whole
    assert json.loads(store.fs.cat_file(run.params)) == {"lr": 0.2}
    assert not run.is_done()
    run.write_done({"attempt": 1})
    assert run.is_done() and run.read_done()["attempt"] == 1
    assert sweep.done_ids() == {"lr=0.1-abcdef12"}
    # no temp files left behind
    assert sorted(p.rsplit("/", 1)[1] for p in store.fs.find(run.dir)) == ["DONE", "params.json"]


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b"])
def test_unsafe_run_ids_are_refused(bad: str) -> None:
    with pytest.raises(StoreError):
        open_store("memory://x").sweep("s").run(bad)


def test_library_launch_on_a_memory_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI is thin: the same sweep runs in-process through the library, here on memory://."""
    from rich.console import Console

    monkeypatch.setenv("SWEEPRUN_HOME", str(tmp_path))
    spec = parse_spec(f"""
name: mem
command: {sys.executable} -c "import os; print('hi from', os.environ['SWEEPRUN_RUN_ID'])"
store: memory://sweeprun-lib/{tmp_path.name}
grid:
  x: [1, 2]
""")
    sweep = Sweep(spec, ephemeral_ok=True)
    ledger = sweep.prepare()
    console = Console(record=True, width=100)
    result = Launcher(sweep, ledger, LaunchOptions(workers=2), PlainEvents(console, 2, 0)).run()
    ledger.close()
    assert result.exit_code == 0 and result.started == 2
    fs = sweep.store.fs
    assert fs.cat_file(sweep.paths.spec).decode() == spec.text
    for run in sweep.runs:
        paths = sweep.paths.run(run.run_id)
        assert json.loads(fs.cat_file(paths.params)) == run.params
        assert fs.cat_file(paths.log(1)).decode() == f"hi from {run.run_id}\n"
        assert paths.is_done()
    assert f"[{sweep.runs[0].run_id}] hi from" in console.export_text()
    assert [row.state.value for row in sweep.status()] == ["done", "done"]
