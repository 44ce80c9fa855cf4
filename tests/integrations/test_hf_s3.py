"""The Hugging Face Trainer with a bucket as the run directory, against a real S3 server (moto).

examples/hf_trainer.py runs standalone with ``--out s3://...``: the Trainer writes into
a local staging folder and sweeprun uploads each sealed folder, the seal last. A kill
in the middle of an upload leaves a folder without a seal in the store; the same
command run again on a machine with an empty staging folder (a new Colab session)
resumes from the previous complete folder, downloaded and verified, and ends equal
(``torch.equal``) to the run never interrupted. ``save_total_limit`` applies in the
store too.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("s3fs")
from safetensors.torch import load_file  # noqa: E402
from test_hf_trainer import TOTAL_STEPS, HFRun, differences, losses, reference  # noqa: E402,F401

from sweeprun import open_store  # noqa: E402
from sweeprun.store import RunPaths  # noqa: E402
from sweeprun.training.metrics import read_run_metrics  # noqa: E402

SEAL = "sweeprun-seal.json"


@dataclass
class S3HFRun:
    """The example run with its run directory in a bucket; ``home`` holds its staging folder."""

    url: str
    home: Path

    def complete(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """The example run to its end (or its crash point) as :class:`HFRun` runs it, with
        ``--out`` the bucket and the staging folder under ``home``."""
        return HFRun(self.url).complete(  # type: ignore[arg-type]  (a URL where HFRun has a path)
            "--save-total-limit", "2", *extra, env={"SWEEPRUN_HOME": str(self.home), **(env or {})})

    @property
    def fs(self) -> Any:
        return open_store(self.url).fs

    def trainer(self, name: str = "") -> str:
        return f"{self.url}/trainer/{name}".rstrip("/")

    def folders(self) -> dict[str, set[str]]:
        """``checkpoint-<step>`` -> the names of its files, as the store has them."""
        fs, root = self.fs, open_store(self.trainer()).root
        out: dict[str, set[str]] = {}
        for path in fs.find(root):
            folder, _, name = path[len(root) + 1:].partition("/")
            out.setdefault(folder, set()).add(name)
        return out

    def entries(self) -> list[dict[str, Any]]:
        store = open_store(self.url)
        return read_run_metrics(RunPaths(store.fs, store.root))

    def final(self, step: int = TOTAL_STEPS) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        local = self.home / "downloaded" / f"checkpoint-{step}"
        self.fs.get(self.trainer(f"checkpoint-{step}") + "/", str(local) + "/", recursive=True)
        return (load_file(local / "model.safetensors"),
                torch.load(local / "optimizer.pt", weights_only=True))


@pytest.mark.slow  # three processes that each load transformers, plus the reference
def test_a_kill_during_an_upload_resumes_from_the_previous_complete_folder_on_a_new_machine(
        s3_bucket: str, tmp_path: Path, reference: Any) -> None:  # noqa: F811 (the fixture)
    run = S3HFRun(f"{s3_bucket}/hf", tmp_path / "machine-1")
    # the third folder (step 15): one file uploaded, then the machine is gone
    crashed = run.complete(env={"SWEEPRUN_CRASH_AT": "checkpoint.mid_write@3"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    folders = run.folders()
    assert SEAL in folders["checkpoint-10"] and SEAL in folders["checkpoint-5"]
    assert folders["checkpoint-15"] and SEAL not in folders["checkpoint-15"]   # cut short, never sealed

    run.home = tmp_path / "machine-2"                   # a new session: nothing staged locally
    result = run.complete()
    assert result.returncode == 0, result.stderr
    assert "checkpoint-15 (it was never sealed in the store: the upload was cut short)" in result.stderr
    assert "resuming from checkpoint-10" in result.stderr
    assert differences(run, reference) == []            # type: ignore[arg-type]
    assert losses(run) == losses(reference)             # type: ignore[arg-type]
    assert sorted(losses(run)) == list(range(1, TOTAL_STEPS + 1))   # type: ignore[arg-type]
    # save_total_limit=2 in the store; the cut-short folder set aside, not deleted
    folders = run.folders()
    assert sorted(f for f in folders if f.startswith("checkpoint-")) == ["checkpoint-35", "checkpoint-40"]
    assert all(SEAL in folders[f] for f in ("checkpoint-35", "checkpoint-40"))
    assert any(name.startswith("checkpoint-15-a") for name in
               {p.split("/")[0] for p in folders[".sweeprun-rejected"]})
    # done: the staged copies are gone (they are in the store), or a sweep would fill the disk
    staged = list(run.home.glob("hf-staging/*/trainer/checkpoint-*"))
    assert list(run.home.glob("hf-staging/*/trainer")) and staged == [], staged


@pytest.mark.slow
def test_a_folder_damaged_in_the_store_is_caught_after_download_and_the_previous_one_used(
        s3_bucket: str, tmp_path: Path) -> None:
    run = S3HFRun(f"{s3_bucket}/hf", tmp_path / "machine-1")
    stopped = run.complete("--max-steps", "12")          # seals 5, 10 and 12 (the last step)
    assert stopped.returncode == 0, stopped.stderr
    weights = run.trainer("checkpoint-12/model.safetensors")
    run.fs.pipe_file(weights, run.fs.cat_file(weights)[:1000])   # truncated after the seal
    # the same machine, staging still full: the store decides, not the staged copy
    result = run.complete("--max-steps", "12")
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stderr.splitlines() if "folder(s) skipped" in line)
    assert "checkpoint-12 (model.safetensors is truncated or changed" in warning
    assert "resuming from checkpoint-10" in warning
    assert SEAL in run.folders()["checkpoint-12"]        # trained again, uploaded and sealed again


def test_no_verified_folder_in_the_store_stops_in_one_line_and_moves_nothing(
        s3_bucket: str, tmp_path: Path) -> None:
    from sweeprun.errors import CheckpointError
    from sweeprun.integrations.hf_store import StoreFolders

    store = open_store(f"{s3_bucket}/hf")
    paths = RunPaths(store.fs, store.root)
    store.fs.pipe_file(f"{store.root}/trainer/checkpoint-5/model.safetensors", b"weights")
    store.fs.pipe_file(f"{store.root}/trainer/checkpoint-5/{SEAL}",
                       b'{"format": 1, "step": 5, "files": {"model.safetensors": {"size": 99, "sha256": "0"}}}')
    folders = StoreFolders(paths, str(tmp_path / "staging"), 1)
    for _ in range(2):
        with pytest.raises(CheckpointError, match=r"no checkpoint folder in s3://.*/hf/trainer verifies: "
                           r"checkpoint-5 \(model.safetensors is truncated or changed: 7 bytes, sealed 99\)"):
            folders.pull()
    assert store.fs.exists(f"{store.root}/trainer/checkpoint-5/{SEAL}")
