"""The training-side API in-process, on local disk and on memory:// (an object store without append).

Time is a fast-forward clock handed to ``init(clock=...)``: cadence and time budget
are tested without sleeping and without asserting anything about wall time.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sweeprun.errors import CheckpointError
from sweeprun.ledger.contract import FakeClock
from sweeprun.runenv import PREEMPTED_EXIT
from sweeprun.training import Run, init, load_checkpoint
from sweeprun.training.checkpoints import FORMAT, Manifest
from sweeprun.training.metrics import read_metrics
from sweeprun.training.sampler import ResumableSampler


@pytest.fixture(params=["local", "memory"])
def run_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A run directory URL: a local path, or memory:// (no append, no rename: like S3)."""
    if request.param == "local":
        yield str(tmp_path / "run dir; with 'quotes'")
    else:
        url = f"memory://sweeprun-tests/{uuid.uuid4().hex}/run"
        yield url
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)


@dataclass
class Trainer:
    """A tiny model trained through the API, the way a script would."""

    run: Run
    model: nn.Module
    optimizer: torch.optim.Optimizer

    @classmethod
    def start(cls, run_dir: str, clock: FakeClock | None = None, **options: Any) -> Trainer:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        run = init(params={"lr": 0.1}, local_dir=run_dir, clock=clock or FakeClock(), **options)
        run.track(model=model, optimizer=optimizer)
        return cls(run, model, optimizer)

    def train(self, steps: int, clock: FakeClock | None = None, step_s: float = 0.0,
              **metrics: list[float]) -> None:
        for _ in range(steps):
            loss = self.model(torch.randn(8, 4)).pow(2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            if clock:
                clock.advance(step_s)
            i = self.run.step
            self.run.end_step(loss=loss, **{k: v[i] for k, v in metrics.items()})


def saved_steps(run: Run) -> list[int]:
    return [m.step for m in run.checkpoints()]


def metrics_of(run: Run) -> list[dict[str, Any]]:
    return read_metrics(run.paths.fs, run.paths.metrics)


# -- retention and cadence -------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "best_step"), [("min", 2), ("max", 4)])
def test_keeps_the_last_k_and_the_best(run_dir: str, mode: Literal["min", "max"], best_step: int) -> None:
    t = Trainer.start(run_dir, every_steps=1, keep_last=2, best="val", mode=mode)
    t.train(7, val=[5.0, 1.0, 4.0, 9.0, 6.0, 7.0, 8.0])
    t.run.close()
    assert saved_steps(t.run) == sorted({best_step, 6, 7})
    best = load_checkpoint(run_dir, which="best", best="val", mode=mode)
    assert best["step"] == best_step
    assert load_checkpoint(run_dir, which="best")["step"] == best_step  # the script's own best
    assert load_checkpoint(run_dir, which="best", best="val")["step"] == best_step  # and its mode


def test_best_needs_a_metric_when_the_script_kept_none(run_dir: str) -> None:
    t = Trainer.start(run_dir, every_steps=1)
    t.train(2)
    t.run.close()
    with pytest.raises(CheckpointError, match="record no best metric"):
        load_checkpoint(run_dir, which="best")


def test_cadence_by_steps_and_a_final_save(run_dir: str) -> None:
    t = Trainer.start(run_dir, every_steps=3, keep_last=10)
    t.train(10)
    t.run.finish()
    assert saved_steps(t.run) == [3, 6, 9, 10]


def test_cadence_by_time_with_a_fast_forward_clock(run_dir: str) -> None:
    clock = FakeClock()
    t = Trainer.start(run_dir, clock, every_s=60, keep_last=10)
    t.train(7, clock, step_s=25)                 # 25, 50, 75 -> save; 100, 125, 150 -> save; 175
    t.run.close()
    assert saved_steps(t.run) == [3, 6]


def test_the_automatic_interval_is_the_default_cadence(run_dir: str) -> None:
    """Saves that cost nothing (this clock does not move during one) come as often as
    ``min_every_s`` allows: 30 s, so every third step of 10 s."""
    clock = FakeClock()
    t = Trainer.start(run_dir, clock, keep_last=10)
    t.train(10, clock, step_s=10)
    t.run.close()
    assert saved_steps(t.run) == [3, 6, 9]


def test_steps_or_time_whichever_comes_first(run_dir: str) -> None:
    clock = FakeClock()
    t = Trainer.start(run_dir, clock, every_steps=4, every_s=60, keep_last=10)
    t.train(3, clock, step_s=1)                  # step 3: neither
    t.train(1, clock, step_s=1)                  # step 4: steps
    t.train(1, clock, step_s=100)                # step 5: time
    t.run.close()
    assert saved_steps(t.run) == [4, 5]


def test_orphans_of_a_crash_are_removed_at_the_next_save(tmp_path: Path) -> None:
    t = Trainer.start(str(tmp_path), every_steps=2)
    t.train(2)
    t.run.wait()                                 # the step-2 save is written in the background
    folder = tmp_path / "checkpoints"
    (folder / "ckpt-a1-00000009-step0000000003.pt").write_bytes(b"data with no manifest")
    (folder / ".tmp-ckpt-a1-00000010-step0000000004-x1y2.pt").write_bytes(b"half a file")
    (folder / ".tmp-k3j_-ckpt-a1-00000008-step0000000003.json").write_bytes(b"half a manifest")
    (folder / ".tmp-ckpt-a9-00000011-step0000000004-x1y2.pt").write_bytes(b"a newer attempt's")
    t.train(2)
    t.run.close()
    assert sorted(p.name for p in folder.iterdir()) == [
        ".tmp-ckpt-a9-00000011-step0000000004-x1y2.pt",  # attempt 9 may be alive: not ours to touch
        "ckpt-a1-00000001-step0000000002.json", "ckpt-a1-00000001-step0000000002.pt",
        "ckpt-a1-00000010-step0000000004.json", "ckpt-a1-00000010-step0000000004.pt"]


# -- resume: state and metrics -----------------------------------------------------------------


def test_resume_restores_state_and_trims_metrics_past_the_checkpoint(run_dir: str) -> None:
    first = Trainer.start(run_dir, every_steps=2)
    first.run.extras["best"] = 0.5
    first.train(5)                               # saved at 4; step 5 is logged but lost
    first.run.close()                            # the process dies here, no final save
    assert [e["step"] for e in metrics_of(first.run)] == [1, 2, 3, 4, 5]

    second = Trainer.start(run_dir, every_steps=2)
    assert second.run.restore()
    assert (second.run.step, second.run.extras) == (4, {"best": 0.5})
    assert [e["step"] for e in metrics_of(second.run)] == [1, 2, 3, 4]
    second.train(2)
    second.run.finish()
    assert [e["step"] for e in metrics_of(second.run)] == [1, 2, 3, 4, 5, 6]


def test_a_torn_last_metrics_line_is_dropped(tmp_path: Path) -> None:
    first = Trainer.start(str(tmp_path), every_steps=2)
    first.train(2)
    first.run.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')      # SIGKILL in the middle of an append
    second = Trainer.start(str(tmp_path), every_steps=2)
    second.run.restore()
    second.train(1)
    second.run.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_a_fresh_start_clears_metrics_of_a_run_that_never_saved(run_dir: str) -> None:
    first = Trainer.start(run_dir, every_steps=100)
    first.train(3)
    first.run.close()
    second = Trainer.start(run_dir, every_steps=100)
    assert not second.run.restore()
    second.train(1)
    second.run.finish()
    assert [e["step"] for e in metrics_of(second.run)] == [1]


def test_rng_states_round_trip_including_numpy_generators(run_dir: str) -> None:
    """Python, NumPy legacy, a NumPy Generator, a torch.Generator and torch CPU continue exactly."""

    def draw(gen: np.random.Generator, tgen: torch.Generator) -> list[Any]:
        return [random.random(), np.random.rand(3).tolist(), gen.integers(0, 2**62, 3).tolist(),
                torch.rand(3, generator=tgen).tolist(), torch.rand(3).tolist()]

    def start() -> tuple[Run, np.random.Generator, torch.Generator]:
        gen, tgen = np.random.default_rng(1), torch.Generator().manual_seed(2)
        run = init(local_dir=run_dir, clock=FakeClock()).track(numpy_gen=gen, torch_gen=tgen)
        return run, gen, tgen

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    run, gen, tgen = start()
    draw(gen, tgen)
    run.save()
    expected = draw(gen, tgen)
    run.close()

    random.seed(9), np.random.seed(9), torch.manual_seed(9)   # a new process starts elsewhere
    run, gen, tgen = start()
    assert run.restore()
    assert draw(gen, tgen) == expected
    run.close()


def test_registering_more_than_the_checkpoint_holds_is_an_error(tmp_path: Path) -> None:
    t = Trainer.start(str(tmp_path))
    t.run.finish()
    again = Trainer.start(str(tmp_path))
    again.run.track(scheduler=torch.optim.lr_scheduler.StepLR(again.optimizer, 2))
    with pytest.raises(CheckpointError, match="no state for scheduler"):
        again.run.restore()
    again.run.close()


# -- ownership, corruption, tampering ----------------------------------------------------------


def test_a_checkpoint_from_another_run_is_refused(run_dir: str) -> None:
    """Checkpoints copied into another run's folder, or another sweep's, are not resumed from."""
    def env(run_id: str, sweep: str) -> dict[str, str]:
        return {"SWEEPRUN_RUN_DIR": f"{run_dir}/{run_id}", "SWEEPRUN_RUN_ID": run_id,
                "SWEEPRUN_SWEEP": sweep, "SWEEPRUN_PARAMS": '{"lr": 0.1}', "SWEEPRUN_ATTEMPT": "2"}

    owner = init(env=env("lr=0.1-aaaa", "grid"), clock=FakeClock())
    assert (owner.params, owner.attempt, owner.run_id) == ({"lr": 0.1}, 2, "lr=0.1-aaaa")
    owner.finish()
    fs, root = fsspec.core.url_to_fs(run_dir)
    fs.copy(f"{root}/lr=0.1-aaaa/checkpoints", f"{root}/lr=0.2-bbbb/checkpoints", recursive=True)
    for run_id, sweep in [("lr=0.2-bbbb", "grid"), ("lr=0.1-aaaa", "other-sweep")]:
        intruder = init(env=env(run_id, sweep), clock=FakeClock())
        with pytest.raises(CheckpointError) as err:
            intruder.restore()
        intruder.close()
        assert "lr=0.1-aaaa of sweep grid" in str(err.value)
        assert f"{run_id} of sweep {sweep}" in str(err.value)


def test_a_run_folder_given_with_another_runs_id_is_refused(tmp_path: Path) -> None:
    env = {"SWEEPRUN_RUN_DIR": str(tmp_path / "lr=0.1-aaaa"), "SWEEPRUN_RUN_ID": "lr=0.2-bbbb",
           "SWEEPRUN_SWEEP": "grid", "SWEEPRUN_PARAMS": "{}", "SWEEPRUN_ATTEMPT": "1"}
    with pytest.raises(CheckpointError, match="folder of run lr=0.1-aaaa, not of SWEEPRUN_RUN_ID=lr=0.2-bbbb"):
        init(env=env, clock=FakeClock())
    assert not (tmp_path / "lr=0.1-aaaa").exists()


def _newest_data(run: Run) -> tuple[fsspec.AbstractFileSystem, str]:
    newest = run.checkpoints()[-1]
    return run.paths.fs, f"{run.paths.checkpoints}/{newest.data}"


@pytest.mark.parametrize("damage", ["truncate", "flip a bit"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
        run_dir: str, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    t = Trainer.start(run_dir, every_steps=2)
    t.train(6)
    t.run.close()
    fs, path = _newest_data(t.run)
    data = bytearray(fs.cat_file(path))
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x10
    fs.pipe_file(path, bytes(data))
    capsys.readouterr()

    again = Trainer.start(run_dir, every_steps=2)
    assert again.run.restore()
    again.run.close()
    assert again.run.step == 4
    err = capsys.readouterr().err
    assert "ckpt-a1-00000003-step0000000006.pt" in err       # the damaged one, and why
    assert ("truncated" if damage == "truncate" else "corrupt") in err
    assert "resuming from ckpt-a1-00000002-step0000000004.pt (step 4)" in err


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    t = Trainer.start(str(tmp_path), every_steps=1, keep_last=1)
    t.train(1)
    t.run.close()
    fs, path = _newest_data(t.run)
    fs.pipe_file(path, b"")
    again = Trainer.start(str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        again.run.restore()
    again.run.close()


class Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_a_checkpoint_that_runs_code_on_load_is_refused(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"format": FORMAT, "step": 99, "epoch": 0, "extras": {}, "objects": {}, "rng": None,
               "x": Exploit(marker)}
    if container == "torch.save":
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
    else:
        import pickle

        data = pickle.dumps(payload, protocol=2)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    name = "ckpt-a1-00000001-step0000000099"
    (folder / f"{name}.pt").write_bytes(data)
    # A valid manifest: checksums catch accidents, not attackers; weights_only is the defence.
    manifest = Manifest(attempt=1, seq=1, step=99, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        run_id=None, sweep=None, data=f"{name}.pt")
    (folder / f"{name}.json").write_bytes(manifest.to_bytes())

    run = init(local_dir=tmp_path / "run", clock=FakeClock())
    with pytest.raises(CheckpointError, match="refused"):
        run.restore()
    run.close()
    assert not marker.exists()


# -- preemption --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_time_limit_saves_and_exits_75(run_dir: str, source: str) -> None:
    clock = FakeClock()
    options: dict[str, Any] = ({"time_limit_s": 100} if source == "argument" else
                               {"env": {"SWEEPRUN_TIME_LIMIT": "100"}, "local_dir": run_dir})
    options["every_s"] = 300                     # no cadence save before the limit's
    if source == "argument":
        t = Trainer.start(run_dir, clock, **options)
    else:
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        t = Trainer(init(clock=clock, **options).track(model=model, optimizer=optimizer), model, optimizer)
    with pytest.raises(SystemExit) as exit_info:
        t.train(10, clock, step_s=30)            # after step 3, one more step would pass 100 s
    assert exit_info.value.code == PREEMPTED_EXIT
    assert saved_steps(t.run) == [3]
    assert [e["step"] for e in metrics_of(t.run)] == [1, 2, 3]


def test_a_signal_stops_at_the_end_of_the_step(tmp_path: Path) -> None:
    import signal

    t = Trainer.start(str(tmp_path), stop_signals=[signal.SIGUSR1])
    t.train(2)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert t.run.should_stop
    with pytest.raises(SystemExit) as exit_info:
        t.train(5)
    assert exit_info.value.code == PREEMPTED_EXIT
    assert saved_steps(t.run) == [3]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL    # handlers given back


# -- the resumable sampler -----------------------------------------------------------------------


def test_sampler_yields_exactly_the_remaining_indices_after_restore() -> None:
    first = ResumableSampler(10, seed=4)
    consumed = list(itertools.islice(iter(first), 6))
    state = first.state_dict()

    resumed = ResumableSampler(10, seed=4)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert sorted(consumed + rest) == list(range(10))
    assert consumed + rest == first.order(0)
    assert list(resumed) == first.order(1) != first.order(0)


def test_sampler_restored_at_an_epoch_boundary_starts_the_next_epoch() -> None:
    first = ResumableSampler(10, seed=4)
    assert list(first) == first.order(0)
    state = first.state_dict()

    auto = ResumableSampler(10, seed=4)
    auto.load_state_dict(state)
    assert list(auto) == first.order(1)

    counted = ResumableSampler(10, seed=4)        # a loop that counts epochs itself
    counted.load_state_dict(state)
    counted.set_epoch(0)
    assert list(counted) == []                    # epoch 0 was finished
    counted.set_epoch(1)
    assert list(counted) == first.order(1)


@pytest.mark.parametrize("stop_after_batches", [0, 1, 3, 4])
def test_sampler_in_a_dataloader_resumes_mid_epoch(stop_after_batches: int) -> None:
    data = TensorDataset(torch.arange(14))

    def loader(sampler: ResumableSampler) -> DataLoader[Any]:
        return DataLoader(data, batch_size=4, sampler=sampler)

    whole = ResumableSampler(data, seed=1)
    expected = [b.tolist() for _ in range(2) for (b,) in loader(whole)]

    first = ResumableSampler(data, seed=1)
    seen = [b.tolist() for (b,) in itertools.islice(loader(first), stop_after_batches)]
    resumed = ResumableSampler(data, seed=1)
    resumed.load_state_dict(first.state_dict())
    for epoch in range(2):                        # the usual loop, which counts epochs itself
        resumed.set_epoch(epoch)
        seen += [b.tolist() for (b,) in loader(resumed)]
    assert seen == expected


def test_sampler_refuses_state_of_another_dataset() -> None:
    with pytest.raises(ValueError, match="dataset or its seed changed"):
        ResumableSampler(11, seed=4).load_state_dict(ResumableSampler(10, seed=4).state_dict())


def test_standalone_without_a_directory_says_what_to_do() -> None:
    with pytest.raises(CheckpointError, match="pass local_dir"):
        init(env={})


# -- the checksum, hashed on a helper thread while the file is written --------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_the_checksum_covers_every_byte_in_file_order(run_dir: str, async_save: bool) -> None:
    """Large storages are hashed in place (views), headers in batches, a large pickle (a big
    numpy array in extras) on the spot: whatever the mix, the manifest describes the file."""
    big = torch.randn(300_000)                                 # 1.2 MB: hashed as a view
    objects = {"big": big, "view": big[10:20], "empty": torch.empty(0), "half": torch.ones(5, dtype=torch.bfloat16),
               "small": [torch.full((3,), float(i)) for i in range(200)]}
    run = init(params={}, local_dir=run_dir, every_steps=1, async_save=async_save)
    run.track(state=TensorState(objects))
    run.extras["table"] = np.arange(200_000, dtype=np.int64)   # 1.6 MB inside the pickle
    run.end_step()
    manifest = run.wait() if async_save else run.checkpoints()[-1]
    assert manifest is not None
    fs, path = fsspec.core.url_to_fs(run_dir)
    data = fs.cat_file(f"{path}/checkpoints/{manifest.data}")
    assert (manifest.size, manifest.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    saved = load_checkpoint(run_dir)                           # verifies it too
    assert torch.equal(saved["objects"]["state"]["big"], big)
    assert np.array_equal(saved["extras"]["table"], run.extras["table"])
    run.close()


class TensorState:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def test_the_hashing_thread_never_outlives_a_failed_save() -> None:
    from sweeprun.training.digest import StreamDigest

    data = torch.arange(100_000, dtype=torch.float64)
    view = memoryview(data.numpy()).cast("B")
    with pytest.raises(OSError, match="disk full"), StreamDigest({(data.data_ptr(), len(view))}) as digest:
        digest.update(view)
        raise OSError("disk full")                             # as a write would fail
    assert not [t for t in __import__("threading").enumerate() if t.name == "sweeprun-checkpoint-hash"]


def test_a_shard_is_hashed_as_written_and_its_writeback_started_on_the_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard of a sharded save goes through DCP's own writer: its record (size, XXH3-128)
    describes the file's bytes, and on local disk the kernel is asked to start writing it
    back every few MiB while the rest is serialised (what keeps the save near a plain
    ``dcp.save``), never past what was written."""
    import torch.distributed.checkpoint as dcp
    import xxhash
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from sweeprun.training import dcp_io, writer

    hints: list[tuple[int, int]] = []
    real = writer._start_writeback
    monkeypatch.setattr(writer, "_start_writeback", lambda fd, offset, length: (
        hints.append((offset, length)), real(fd, offset, length)))
    state = {"model": {f"w{i}": torch.randn(1_500_000) for i in range(3)}, "step": torch.tensor(7)}
    storage = FileSystemWriter(str(tmp_path), sync_files=True)
    hashing = storage.fs = dcp_io.HashingFileSystem(storage.fs, dcp_io.local_memory(state), local=True)
    dcp.save(state, storage_writer=storage, no_dist=True)

    for name, record in hashing.records.items():
        data = (tmp_path / name).read_bytes()
        assert record == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    shard = (tmp_path / "__0_0.distcp").stat().st_size
    assert len(hints) >= 2 and hints[0][0] == 0               # 18 MB: hinted more than once
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(hints))   # in order, no gap
    assert hints[-1][0] + hints[-1][1] <= shard
    loaded = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}, "step": torch.tensor(0)}
    dcp.load(loaded, storage_reader=FileSystemReader(str(tmp_path)), no_dist=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
