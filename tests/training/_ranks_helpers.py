"""Run a user's multi-rank script as real processes: N ranks started here with the variables
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, a free
``MASTER_PORT``), forked from the tests' fork server as a standalone script is
(:mod:`_zygote`), with no torchrun; or through ``python -m torch.distributed.run`` itself
(:meth:`RankRun.torchrun`).

Each rank's stderr goes to a file next to the run (``rank<r>.err``): a pipe nobody reads
would block a chatty rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from _training_helpers import REPO, assert_same_tree, made_once
from _zygote import preload_for, spawn
from servers import free_port

SCRIPTS = REPO / "tests" / "scripts"
DDP = SCRIPTS / "ddp_train.py"
FSDP = SCRIPTS / "fsdp_train.py"
#: 48 samples, 2 ranks, batches of 4: 6 steps per epoch, 2 epochs; saves every 4 steps
TOTAL_STEPS = 12


@dataclass
class RankRun:
    """One run folder of a multi-rank script, started as often as a test needs."""

    script: Path
    out: Path                          # a local folder (or, with ``logs``, a bucket URL as a str)
    world: int = 2
    flags: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 120             # guards a hung test only
    logs: Path | None = None           # where the ranks' stderr and the final state go (default: beside out)

    @property
    def _beside(self) -> Path:
        return self.logs if self.logs is not None else Path(self.out).parent / Path(self.out).name

    @property
    def final(self) -> Path:
        """Where the script's rank 0 writes the full state it gathered at its end."""
        return Path(f"{self._beside}.final.pt")

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    def err(self, rank: int) -> str:
        path = Path(f"{self._beside}.rank{rank}.err")
        return path.read_text() if path.exists() else ""

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPRUN_")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **self.env, **(extra or {}))
        return env

    def _args(self, extra: tuple[str, ...]) -> list[str]:
        out = [] if "SWEEPRUN_RUN_DIR" in self.env else ["--out", str(self.out)]
        return [str(self.script), *self.flags, *out, "--final", str(self.final), *extra]

    def start(self, *extra: str, world: int | None = None,
              rank_env: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen[str]]:
        """Start the ranks (``world`` of them: another world size than the run's own)."""
        world = self.world if world is None else world
        port = str(free_port())
        procs = []
        self._beside.parent.mkdir(parents=True, exist_ok=True)
        for rank in range(world):
            env = self._env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                             "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": port, **(rank_env or {}).get(rank, {})})
            with open(f"{self._beside}.rank{rank}.err", "w") as err:
                procs.append(spawn([sys.executable, *self._args(extra)], env, preload_for(self.script),
                                   stdout=subprocess.DEVNULL, stderr=err))
        return procs

    def wait(self, procs: list[subprocess.Popen[str]]) -> list[int]:
        return [p.wait(timeout=self.timeout_s) for p in procs]

    def complete(self, *extra: str, world: int | None = None) -> list[int]:
        return self.wait(self.start(*extra, world=world))

    def torchrun(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """The same run started as users start it: ``torchrun --standalone``."""
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc-per-node", str(self.world), *self._args(extra)],
                              env=self._env(None), text=True, capture_output=True, timeout=self.timeout_s)

    def last_step(self) -> int:
        if not self.metrics.exists():
            return 0
        lines = self.metrics.read_text().split("\n")[:-1]
        return json.loads(lines[-1])["step"] if lines else 0

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines()]

    def signal_at(self, procs: list[subprocess.Popen[str]], step: int, rank: int, signum: int) -> int:
        """Signal one rank once rank 0 has logged ``step``; the step seen then."""
        deadline = time.monotonic() + self.timeout_s
        while self.last_step() < step and procs[rank].poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        seen = self.last_step()
        procs[rank].send_signal(signum)
        return seen

    def final_state(self) -> dict[str, Any]:
        return torch.load(self.final, weights_only=True)

    def manifests(self) -> list[dict[str, Any]]:
        folder = self.out / "checkpoints"
        return [json.loads(p.read_text()) for p in sorted(folder.glob("ckpt-*.json"))]


def reference(shared_dir: Path, script: Path) -> RankRun:
    """The script at 2 ranks, never interrupted: made once per session, then only read."""
    def train(folder: Path) -> None:
        run = RankRun(script, folder / "run")
        assert run.complete() == [0, 0], run.err(0) + run.err(1)

    return RankRun(script, made_once(shared_dir, f"ranks-reference-{script.stem}", train) / "run")


def assert_same_result(run: RankRun, want: RankRun) -> None:
    """Bit for bit the same gathered model and optimizer, and the same metrics, one per step."""
    got, ref = run.final_state(), want.final_state()
    assert got["step"] == ref["step"] == TOTAL_STEPS
    assert_same_tree(got["model"], ref["model"], "model")
    assert_same_tree(got["optimizer"], ref["optimizer"], "optimizer")
    entries = run.entries()
    assert [e["step"] for e in entries] == list(range(1, TOTAL_STEPS + 1))
    assert entries == want.entries()


SIGTERM, SIGKILL = signal.SIGTERM, signal.SIGKILL
