"""The layout: every name a sweep writes is built and parsed by one module, and read back
exactly as written (and nothing that only looks like it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from sweeprun.store import layout
from sweeprun.store.layout import CheckpointName, LeaseName

#: Look-alikes every number in a name refuses: a sign, spaces, Unicode digits (``int()``
#: takes ``'١٢'``), a trailing newline (``$`` would take it), 19 digits (past SQLite's int).
HOSTILE_NUMBERS = ["", "+1", "-1", " 1", "1 ", "1\n", "²", "١٢", "1_0", "0x1", "1.0", "1" * 19]


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("attempt", [1, 2, 10, 10**18 - 1])
def test_attempt_names_round_trip(attempt: int) -> None:
    assert layout.parse_log(layout.log_name(attempt)) == attempt
    assert layout.parse_metrics_part(layout.metrics_part_name(attempt)) == attempt
    for kind in ("json", "started", "finished"):
        assert layout.parse_attempt_record(layout.attempt_record_name(attempt, kind)) == (attempt, kind)


@pytest.mark.parametrize("attempt, seq, step", [(1, 0, 0), (2, 7, 120), (12, 10**8, 10**10),
                                                (10**18 - 1, 10**18 - 1, 10**18 - 1)])
def test_checkpoint_names_round_trip(attempt: int, seq: int, step: int) -> None:
    name = CheckpointName(attempt, seq, step)
    assert CheckpointName.parse(name.data) == CheckpointName.parse(name.manifest) == name
    assert name.data == name.stem + ".pt" and name.manifest == name.stem + ".json"
    assert CheckpointName.in_temp(name.pruned) == name
    assert CheckpointName.in_temp(name.temp_prefix + "k2j3_x.pt") == name          # the writer's temp
    assert CheckpointName.in_temp(f".tmp-ab12_c-{name.manifest}") == name          # the store's temp


def test_checkpoint_names_order_newest_last_as_integers() -> None:
    names = [CheckpointName(2, 1, 5), CheckpointName(1, 10, 900), CheckpointName(2, 10, 1)]
    assert sorted(names) == [CheckpointName(1, 10, 900), CheckpointName(2, 1, 5), CheckpointName(2, 10, 1)]
    assert CheckpointName(2, 7, 120).data == "ckpt-a2-00000007-step0000000120.pt"


@pytest.mark.parametrize("generation", [0, 1, 99_999_999, 100_000_000, layout.GENERATION_MAX])
def test_lease_names_round_trip(generation: int) -> None:
    for kind in ("json", "beat", "released"):
        name = layout.lease_name(generation, kind)
        assert LeaseName.parse(name) == LeaseName(generation, kind)
    claim = layout.lease_name(generation, "claim", "00af")
    assert LeaseName.parse(claim) == LeaseName(generation, "claim", "00af")
    assert layout.lease_name(3) == "00000003.json"


@pytest.mark.parametrize("step", [0, 1, 40, 10**18 - 1])
def test_trainer_folder_names_round_trip(step: int) -> None:
    folder = layout.checkpoint_folder(step)
    assert layout.parse_checkpoint_folder(folder) == step
    assert layout.parse_set_aside(layout.set_aside_name(folder, 3)) == (step, 3)
    assert layout.parse_set_aside(layout.set_aside_name(folder, 3, repeat=2)) == (step, 3)
    assert layout.set_aside_name(folder, 3, repeat=2).endswith("-a3.2")
    assert layout.is_trainer_seal(f"trainer/{folder}/{layout.SEAL}")


@pytest.mark.parametrize("run_id", ["lr=0.1-3fa2c1b9", "a b; echo x", "x@y"])
def test_sweep_names_round_trip(run_id: str) -> None:
    token = layout.reset_token(1_733_000_000_123, "0a1b2c3d")
    assert layout.reset_token_ms(token) == 1_733_000_000_123
    assert layout.parse_reset_marker(layout.reset_marker(run_id, token)) == (run_id, token)
    assert layout.trash_name(run_id, 0.0) == f"{run_id}-19700101-000000"
    ident = "0123456789abcdef" * 2
    assert layout.parse_sweep_id(layout.sweep_id_text(ident)) == ident
    assert layout.is_done_index_entry(run_id) and not layout.is_done_index_entry(layout.DONE_INDEX_COMPLETE)


def test_run_and_sweep_paths_build_through_the_layout(tmp_path) -> None:
    from sweeprun import open_store

    sweep = open_store(str(tmp_path)).sweep("s")
    run = sweep.run("r-1")
    rel = {name: getattr(run, name)[len(run.dir) + 1:] for name in (
        "params", "checkpoints", "metrics", "metrics_parts", "logs", "done", "attempts", "lease", "trainer")}
    assert rel == {"params": "params.json", "checkpoints": "checkpoints", "metrics": "metrics.jsonl",
                   "metrics_parts": "metrics", "logs": "logs", "done": "DONE", "attempts": "attempts",
                   "lease": "lease", "trainer": "trainer"}
    assert run.log(3).endswith("/logs/attempt-3.log") and run.metrics_part(3).endswith("/metrics/attempt-3.jsonl")
    assert run.attempt_record(3).endswith("/attempts/3.json") and run.api_finished(3).endswith("/3.finished")
    assert run.run_id == "r-1" and run.done_entry == f"{sweep.dir}/done/r-1"
    assert {getattr(sweep, n)[len(sweep.dir) + 1:] for n in ("spec", "runs", "identity", "coordination",
                                                              "stop", "resets", "trash", "done_index")} == \
        {"sweep.yaml", "runs", "ID", "COORDINATION", "STOP", "resets", "trash", "done"}


# -- look-alikes are nobody's ------------------------------------------------------------------

@pytest.mark.parametrize("bad", HOSTILE_NUMBERS + ["0", "07", "00"])
def test_attempt_numbers_refuse_look_alikes(bad: str) -> None:
    """Attempts are written unpadded, so ``attempt-07.log`` is not attempt 7 (it used to be,
    to some readers and not others) and attempt 0 does not exist."""
    assert layout.parse_log(f"attempt-{bad}.log") is None
    assert layout.parse_metrics_part(f"attempt-{bad}.jsonl") is None
    assert layout.parse_attempt_record(f"{bad}.json") is None
    assert CheckpointName.parse(f"ckpt-a{bad}-00000001-step0000000001.pt") is None
    assert layout.parse_set_aside(f"checkpoint-5-a{bad}") is None


@pytest.mark.parametrize("bad", HOSTILE_NUMBERS)
def test_padded_counters_refuse_look_alikes(bad: str) -> None:
    assert CheckpointName.parse(f"ckpt-a1-{bad}-step0000000001.pt") is None
    assert CheckpointName.parse(f"ckpt-a1-00000001-step{bad}.pt") is None
    assert CheckpointName.in_temp(f".tmp-ckpt-a1-00000001-step{bad}-x.pt") is None


@pytest.mark.parametrize("bad", HOSTILE_NUMBERS + ["007", "00"])
def test_trainer_steps_refuse_look_alikes(bad: str) -> None:
    """The Trainer writes ``checkpoint-<step>`` unpadded; a folder read as step 7 must be the
    one ``checkpoint_folder(7)`` names, or a download would look for another folder."""
    assert layout.parse_checkpoint_folder(f"checkpoint-{bad}") is None
    assert not layout.is_trainer_seal(f"trainer/checkpoint-{bad}/{layout.SEAL}")


@pytest.mark.parametrize("name", [
    "attempt-1.log.bak", "xattempt-1.log", "attempt-1.LOG", "logs/attempt-1.log", "attempt-1.log\n",
    "1.jsonx", "1.json.tmp", ".tmp-1.json", "1.Started",
])
def test_names_are_matched_whole(name: str) -> None:
    assert layout.parse_log(name) is None and layout.parse_attempt_record(name) is None


@pytest.mark.parametrize("name", [
    "1234567.json", "0000000١.json", "00000001.JSON", "00000001.json\n", "00000001.beat.bak",
    "00000001.00AF.claim", "00000001..claim", "00000001.xyz.claim", "1234567890123.json",
])
def test_lease_names_refuse_look_alikes(name: str) -> None:
    assert LeaseName.parse(name) is None


def test_a_lease_generation_past_12_digits_is_told_apart() -> None:
    assert layout.lease_generation_too_long("1234567890123.json")
    assert not layout.lease_generation_too_long("00000001.json")


@pytest.mark.parametrize("name", ["r-1@123-0a1b2c3d", "r-1@1733000000123-0A1B2C3D", "@1733000000123-0a1b2c3d",
                                  ".tmp-x@1733000000123-0a1b2c3d", "r-1@1733000000123-0a1b2c3d\n",
                                  "r-1@１733000000123-0a1b2c3d", "r-1"])
def test_reset_markers_refuse_look_alikes(name: str) -> None:
    assert layout.parse_reset_marker(name) is None


@pytest.mark.parametrize("raw", [b"", b"0123", b"0123456789ABCDEF" * 2, b"0123456789abcdef" * 2 + b"0",
                                 "0123456789abcdef١".encode() * 2])
def test_sweep_ids_refuse_look_alikes(raw: bytes) -> None:
    assert layout.parse_sweep_id(raw) is None


def test_builders_refuse_what_the_parsers_would() -> None:
    for bad in (0, -1, 10**18, True, 1.0):
        with pytest.raises(ValueError):
            layout.log_name(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CheckpointName(1, -1, 0)
    with pytest.raises(ValueError):
        layout.lease_name(10**12)
    with pytest.raises(ValueError):
        layout.set_aside_name("checkpoint-07", 1)
    with pytest.raises(ValueError):
        layout.reset_marker("a/b", layout.reset_token(1, "0a1b2c3d"))


# -- one highest_attempt rule -------------------------------------------------------------------

def test_highest_attempt_reads_every_file_that_names_an_attempt() -> None:
    names = ["attempts/2.json", "attempts/3.started", "logs/attempt-4.log", "metrics/attempt-5.jsonl",
             "checkpoints/ckpt-a6-00000001-step0000000010.json", "params.json", "DONE"]
    assert layout.highest_attempt(names) == 6
    for n in range(len(names) - 2):
        assert layout.highest_attempt(names[:n + 1]) == n + 2
    assert layout.highest_attempt([]) == 0


@pytest.mark.parametrize("name", [
    "logs/attempt-09.log", "logs/attempt-٩.log", "attempts/9.json.tmp", "attempts/.tmp-9.json",
    "checkpoints/.tmp-ckpt-a9-00000001-step0000000001-x.pt", "checkpoints/ckpt-a9-garbage",
    "attempts/9/x.json", "logs/sub/attempt-9.log", "attempt-9.log", "lease/00000009.json",
    "trainer/.sweeprun-rejected/checkpoint-5-a9", "other/attempt-9.log", "attempts/" + "9" * 19 + ".json",
])
def test_highest_attempt_passes_over_what_names_no_attempt(name: str) -> None:
    assert layout.highest_attempt(["attempts/1.json", name]) == 1


# -- no other module spells a name ----------------------------------------------------------------

#: What a run file's name looks like, in a string literal of the package (docstrings aside).
_SPELLED = re.compile(r"ckpt-a|attempt-|\bcheckpoint-|\.(?:claim|beat|released|started|finished)\b(?!\()")
#: Literals that match and name nothing of a store: test data of the shipped store contract,
#: a thread's name.
_NOT_NAMES = {("sweeprun/store/contract.py", "a/logs/attempt-1.log"),
              ("sweeprun/training/digest.py", "sweeprun-checkpoint-hash")}


def test_only_the_layout_spells_the_names_a_sweep_writes() -> None:
    """One regex family parses attempt, checkpoint and lease names: no module but the layout
    holds a pattern or a format of one (each used to have its own, and they disagreed on
    ``attempt-07.log``, Unicode digits and 10-digit attempts)."""
    package = Path(layout.__file__).parents[1]
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        if rel == "sweeprun/store/layout.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and node.body and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant)}
        found += [f"{rel}:{node.lineno}: {node.value[:60]!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in docs and _SPELLED.search(node.value)
                  and (rel, node.value) not in _NOT_NAMES]
    assert found == []


def test_an_attempt_past_what_a_lease_name_carries_is_a_clear_error(tmp_path: Path) -> None:
    """``attempts/<14 digits>.json`` made by hand: the next generation would need a 13-digit
    lease name, which no reader parses, so the take says which folder to clean instead."""
    from sweeprun import open_store
    from sweeprun.errors import StoreError
    from sweeprun.leases import StoreLeases
    from sweeprun.tenure import highest_attempt

    run = open_store(str(tmp_path)).sweep("s").run("r-1")
    Path(run.attempts).mkdir(parents=True)
    Path(run.attempt_record(10**13)).write_text("{}")
    assert highest_attempt(run) == 10**13
    leases = StoreLeases(run.fs, lease_s=60.0, host="h", worker="h:1")
    with pytest.raises(StoreError, match="more than 12 digits.*move it away"):
        leases.take(run.dir, floor=lambda: highest_attempt(run))
    assert not Path(run.lease).exists() or not any(Path(run.lease).iterdir())
