"""Leases in the store (sweeprun.leases): the protocol on local disk, on a real S3 server
(moto, conditional writes on) and on a simulated eventually consistent folder.

Clocks are FakeClocks wherever the protocol measures time, so nothing here passes or fails
on how fast the machine is; only the eventually consistent folder uses real (short) delays,
and there a slow machine only makes the protocol's waits longer, never unsafe.
"""

from __future__ import annotations

import os
import posixpath
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest

from sweeprun.errors import LeaseLost, SpecError, StoreError
from sweeprun.holders import LeaseView, lease_view
from sweeprun.leases import (
    SETTLE_DEFAULT_S,
    Lease,
    LeasePaths,
    LeaseRecord,
    StoreLeases,
    backoff_s,
    settle_default,
)
from sweeprun.ledger.contract import FakeClock
from sweeprun.procs import ProcessRef
from sweeprun.store import atomic_write, open_store

LEASE_S = 60.0


@dataclass
class Place:
    """Where a test's runs live: a filesystem and a root on it."""

    fs: fsspec.AbstractFileSystem
    root: str

    def run(self, name: str) -> str:
        return posixpath.join(self.root, "sweep", "runs", name)


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    url = str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/store"
    store = open_store(url)
    return Place(store.fs, store.root)


def worker(place: Place, name: str, clock: FakeClock | None = None, **kwargs: Any) -> StoreLeases:
    return StoreLeases(place.fs, lease_s=LEASE_S, host=name, worker=f"{name}:1",
                       clock=clock or FakeClock(), **kwargs)


# -- 1. a free run: exactly one of two racing takers wins --------------------------------------

def race(takers: list[StoreLeases], runs: list[str],
         before: Callable[[int], None] = lambda i: None) -> list[list[Lease | None]]:
    """Every taker calls ``take(run)`` at once (a barrier per run), on its own thread."""
    results: list[list[Lease | None]] = [[None] * len(takers) for _ in runs]
    barrier = threading.Barrier(len(takers))
    errors: list[BaseException] = []

    def loop(k: int) -> None:
        try:
            for i, run in enumerate(runs):
                before(k)
                barrier.wait(timeout=120)
                results[i][k] = takers[k].take(run)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(takers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return results


def two_takers_race(place: Place, races: int) -> None:
    runs = [place.run(f"r{i}") for i in range(races)]
    a, b = worker(place, "a"), worker(place, "b")
    results = race([a, b], runs)
    for i, (run, pair) in enumerate(zip(runs, results, strict=True)):
        winners = [lease for lease in pair if lease is not None]
        assert len(winners) == 1, run
        assert winners[0].generation == 1
        if i % 25 == 0:  # and every machine reads the winner as the holder
            state = b.current(run)
            assert state is not None and state.holder == winners[0].record
    # Both machines won some races: the test really raced.
    assert {w.record.host for pair in results for w in pair if w} == {"a", "b"}


def test_two_takers_racing_for_a_free_run_exactly_one_wins(place: Place) -> None:
    """1,000 races on local disk; 150 on S3, where moto takes ~20 ms a race on 2 cores (a
    1,000-race S3 run took 110 s of the suite's wall time and never found what fewer did not)."""
    two_takers_race(place, 1000 if place.fs.protocol[0] in ("file", "local") else 150)


# -- 2. takeover fences the old holder ---------------------------------------------------------

def test_renewal_after_takeover_fails_and_a_late_beat_does_not_revive_it(place: Place) -> None:
    run = place.run("lr=0.1-3fa2c1b9")
    old = worker(place, "old").take(run)
    assert old is not None
    old_worker = worker(place, "old")
    assert old_worker.renew(old) == 1

    clock = FakeClock()
    taker = worker(place, "new", clock)
    assert taker.take(run) is None  # held: the watch starts now, on the taker's clock
    clock.advance(LEASE_S - 1)
    assert taker.take(run) is None  # not yet lease_s without a beat change
    clock.advance(1)
    new = taker.take(run)  # the old holder froze: its beat stood still for lease_s
    assert new is not None and new.generation == 2

    with pytest.raises(LeaseLost, match="lease generation 1 was taken over"):
        old_worker.renew(old)  # its late beat is written, then it learns it lost
    with pytest.raises(LeaseLost):
        old_worker.renew(old)
    # The late beats went to generation 1's beat; a third machine sees generation 2 held by
    # "new", watches generation 2's beat, and never takes over while "new" keeps beating.
    state = taker.current(run)
    assert state is not None and state.generation == 2 and state.holder == new.record
    third_clock = FakeClock()
    third = worker(place, "third", third_clock)
    for _ in range(5):
        assert third.take(run) is None
        taker.renew(new)
        third_clock.advance(2 * LEASE_S)
    assert third.take(run) is None


# -- 3. only the taker's own elapsed time counts -----------------------------------------------

@pytest.mark.parametrize("skew_s", [-3600.0, 0.0, 3600.0])
def test_clock_skew_of_an_hour_changes_nothing(place: Place, skew_s: float) -> None:
    run = place.run("r")
    holder_leases = worker(place, "holder", FakeClock())
    lease = holder_leases.take(run)
    assert lease is not None
    clock = FakeClock(offset_s=skew_s)
    taker = worker(place, "taker", clock)

    # A holder that keeps beating is never taken over, however long the taker watches.
    for _ in range(10):
        assert taker.take(run) is None
        clock.advance(3 * LEASE_S)
        holder_leases.renew(lease)
    # It stops beating: exactly lease_s of the taker's own time later, the run is taken over.
    assert taker.take(run) is None
    clock.advance(LEASE_S / 2)
    assert taker.take(run) is None
    clock.advance(LEASE_S / 2)
    took = taker.take(run)
    assert took is not None and took.generation == 2


def test_a_taker_that_arrives_late_still_watches_lease_s_itself(place: Place) -> None:
    """A holder dead for hours is not taken over at first sight: a taker cannot know how
    long a beat has stood still from another machine's clock, only from its own."""
    run = place.run("r")
    assert worker(place, "dead").take(run) is not None
    clock = FakeClock(offset_s=10 * 3600)
    taker = worker(place, "late", clock)
    assert taker.take(run) is None
    clock.advance(LEASE_S)
    assert taker.take(run) is not None


# -- 5. release ---------------------------------------------------------------------------------

def test_release_lets_the_next_taker_in_at_once(place: Place) -> None:
    run = place.run("r")
    first = worker(place, "a")
    lease = first.take(run)
    assert lease is not None
    first.renew(lease)
    first.release(lease)
    state = first.current(run)
    assert state is not None and state.released
    nxt = worker(place, "b").take(run)  # a fresh taker, its clock never advanced
    assert nxt is not None and nxt.generation == 2
    assert nxt.record.host == "b"


def test_two_takers_of_a_stale_run_one_wins_the_next_generation(place: Place) -> None:
    run = place.run("r")
    assert worker(place, "dead").take(run) is not None
    clocks = [FakeClock(), FakeClock(offset_s=-3600)]
    takers = [worker(place, f"t{k}", clocks[k]) for k in range(2)]
    for t in takers:
        assert t.take(run) is None
    for c in clocks:
        c.advance(LEASE_S)
    (pair,) = race(takers, [run])
    assert sorted(lease.generation for lease in pair if lease) == [2]


# -- errors ---------------------------------------------------------------------------------

def test_a_foreign_lease_file_is_one_store_error(place: Place) -> None:
    run = place.run("r")
    atomic_write(place.fs, LeasePaths(run).record(1), b"not json")
    with pytest.raises(StoreError, match=r"is not a sweeprun lease .*move the run's lease/ folder"):
        worker(place, "a").current(run)


@pytest.mark.parametrize("kwargs", [{"lease_s": 0}, {"lease_s": float("nan")}, {"settle_s": -1}])
def test_bad_settings_are_named(tmp_path: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(SpecError, match=next(iter(kwargs))):
        StoreLeases(fsspec.filesystem("file"), **kwargs)


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    rng = random.Random(1)
    waits = [backoff_s(n, base_s=1, cap_s=8, rng=rng) for n in range(50)]
    assert all(0 <= w <= 8 for w in waits)
    assert max(waits[5:]) > 4 and len(set(waits)) == 50


# -- request counts on S3 ---------------------------------------------------------------------

def count_requests(fs: Any) -> list[str]:
    """Every HTTP request s3fs sends from now on, as ``"OperationName"``."""
    sent: list[str] = []
    fs.connect()
    fs.s3.meta.events.register("before-call.s3", lambda model, **_: sent.append(model.name))
    return sent


def test_requests_per_claim_and_per_heartbeat_on_s3(s3_bucket: str) -> None:
    store = open_store(s3_bucket + "/store")
    place = Place(store.fs, store.root)
    sent = count_requests(store.fs)
    a, clock = worker(place, "a"), FakeClock()
    b = worker(place, "b", clock)

    lease = a.take(place.run("free"))
    assert lease is not None and sent == ["PutObject"]  # a free run: one create, no LIST
    sent.clear()
    a.renew(lease)
    assert sent == ["PutObject", "GetObject"]  # a heartbeat: one write, one read of gen+1
    sent.clear()
    assert b.take(place.run("free")) is None  # first look at a held run (and who holds it)
    assert sent == ["PutObject", "ListObjectsV2", "GetObject", "GetObject"]
    sent.clear()
    assert b.take(place.run("free")) is None  # later looks: no create
    assert sent == ["ListObjectsV2", "GetObject"]


# -- 4. an eventually consistent folder (Google Drive in two Colab VMs) ------------------------

@dataclass
class EventuallyConsistentFolder:
    """Files in a real local folder, each shown to writers other than its own only ``delay_s``
    after it was written (a deletion likewise reaches them ``delay_s`` late). An exclusive
    create fails only on what the creator can see, so two can both succeed."""

    root: Path
    delay_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    written: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> writer -> when
    deleted: dict[str, float] = field(default_factory=dict)

    def view(self, writer: str) -> EventualView:
        return EventualView(self, writer)


class EventualView:
    """One machine's view of an :class:`EventuallyConsistentFolder`: the few fsspec methods
    the lease protocol calls (it is not a LocalFileSystem, so the store treats it as remote)."""

    protocol = "eventual"

    def __init__(self, folder: EventuallyConsistentFolder, me: str) -> None:
        self.folder, self.me = folder, me

    def _visible(self, path: str) -> bool:
        now = time.monotonic()
        with self.folder.lock:
            writers = self.folder.written.get(path, {})
            gone = self.folder.deleted.get(path)
            if self.me in writers:
                return gone is None
            if not any(now >= t + self.folder.delay_s for t in writers.values()):
                return False
            return gone is None or now < gone + self.folder.delay_s

    def _local(self, path: str) -> Path:
        return self.folder.root / path.lstrip("/")

    def pipe_file(self, path: str, data: bytes, mode: str = "overwrite", **_: Any) -> None:
        if mode == "create" and self._visible(path):
            raise FileExistsError(path)
        local = self._local(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        with self.folder.lock:  # recorded after the write: it is there when it shows
            self.folder.written.setdefault(path, {})[self.me] = time.monotonic()
            self.folder.deleted.pop(path, None)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        if not self._visible(path):
            raise FileNotFoundError(path)
        try:
            return self._local(path).read_bytes()[start:end]
        except FileNotFoundError:
            return b""  # deleted, not yet gone for this machine

    def ls(self, path: str, detail: bool = False) -> list[str]:
        prefix = path.rstrip("/") + "/"
        with self.folder.lock:
            names = [p for p in self.folder.written if p.startswith(prefix) and "/" not in p[len(prefix):]]
        found = [p for p in names if self._visible(p)]
        if not found:
            raise FileNotFoundError(path)
        return found

    def rm_file(self, path: str) -> None:
        os.unlink(self._local(path))
        with self.folder.lock:
            self.folder.deleted[path] = time.monotonic()
            self.folder.written.get(path, {}).pop(self.me, None)
            if not self.folder.written.get(path):
                self.folder.written.pop(path, None)

    def _strip_protocol(self, path: str) -> str:
        return path


def eventual_race(tmp_path: Path, *, delay_s: float, settle_s: float, races: int,
                  stagger_s: float, takers: int = 3) -> list[int]:
    """``races`` runs, each raced by ``takers`` machines that start up to ``stagger_s`` apart;
    how many of them took generation 1 of each run."""
    folder = EventuallyConsistentFolder(tmp_path / "drive", delay_s)
    folder.root.mkdir()
    machines = [StoreLeases(folder.view(f"vm{k}"), lease_s=LEASE_S, settle_s=settle_s,  # type: ignore[arg-type]
                            host=f"vm{k}", worker=f"vm{k}:1", clock=FakeClock())
                for k in range(takers)]
    rng = random.Random(7)
    stagger = [[rng.uniform(0, stagger_s) for _ in range(takers)] for _ in range(races)]
    runs = [f"/sweep/runs/r{i}" for i in range(races)]
    results: list[list[Lease | None]] = [[None] * takers for _ in runs]
    barrier = threading.Barrier(takers)

    def loop(k: int) -> None:
        for i, run in enumerate(runs):
            barrier.wait(timeout=120)
            time.sleep(stagger[i][k])
            results[i][k] = machines[k].take(run)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return [sum(1 for lease in pair if lease is not None) for pair in results]


def test_eventually_consistent_folder_no_run_is_held_twice_when_settle_exceeds_the_delay(
        tmp_path: Path) -> None:
    winners = eventual_race(tmp_path, delay_s=0.02, settle_s=0.03, races=40,
                            stagger_s=0.05)
    assert max(winners) == 1, winners
    assert sum(winners) >= 10, winners  # and runs do get taken (losers all backing off is rare)


def test_eventually_consistent_folder_with_a_settle_shorter_than_the_delay_runs_twice(
        tmp_path: Path) -> None:
    """The same race with settle_s < D: the test above can fail, and this is how."""
    winners = eventual_race(tmp_path, delay_s=0.5, settle_s=0.01, races=5,
                            stagger_s=0.0)
    assert max(winners) >= 2, winners


# -- 5. a dead holder of this host, a done run, late folders -------------------------------------

def test_a_holder_of_this_host_is_gone_only_when_its_pid_and_start_time_say_so(tmp_path: Path) -> None:
    """A killed launcher's runs are free at once on its own host; a new process that reuses
    its pid (another start time) does not keep them held."""
    fs = fsspec.filesystem("file")
    me = ProcessRef.me()
    run = str(tmp_path / "runs" / "r")
    alive = StoreLeases(fs, lease_s=LEASE_S, host=me.host, worker=me, clock=FakeClock()).take(run)
    assert alive is not None and alive.record.started == me.start
    taker = StoreLeases(fs, lease_s=LEASE_S, host=me.host, worker="other:1", clock=FakeClock())
    assert taker.take(run) is None  # its holder (this very process) is alive: wait for the lease
    run2 = str(tmp_path / "runs" / "r2")
    reused = StoreLeases(fs, lease_s=LEASE_S, host=me.host, worker=ProcessRef(me.host, me.pid, (me.start or 0) + 1),
                         clock=FakeClock()).take(run2)
    assert reused is not None
    took = taker.take(run2)  # the pid lives, but as another process: the holder is gone
    assert took is not None and took.generation == 2


def test_retiring_a_done_run_keeps_only_its_newest_generation(place: Place) -> None:
    run = place.run("r")
    first, second = worker(place, "a"), worker(place, "b")
    old = first.take(run)
    assert old is not None
    first.renew(old)
    first.release(old)
    new = second.take(run)
    assert new is not None and new.generation == 2
    second.renew(new)
    second.retire(new)
    left = sorted(posixpath.basename(p) for p in place.fs.ls(LeasePaths(run).folder, detail=False))
    assert left == ["00000002.beat", "00000002.json", "00000002.released"]  # gc need not wait it out
    state = worker(place, "c").current(run)  # the attempt count goes on from there
    assert state is not None and state.generation == 2


def test_late_folders_are_recognised_and_others_are_not(tmp_path: Path, s3_bucket: str) -> None:
    fs = fsspec.filesystem("file")
    drive = tmp_path / "content" / "MyDrive" / "sweeps"
    drive.mkdir(parents=True)
    settle, why = settle_default(fs, str(drive))
    assert settle == SETTLE_DEFAULT_S and why and "Google Drive" in why
    assert settle_default(fs, str(tmp_path / "plain")) == (0.0, None)
    s3 = open_store(s3_bucket + "/x")
    assert settle_default(s3.fs, s3.root) == (0.0, None)  # S3 is strongly consistent


def test_status_sees_a_contested_lease_in_a_listing() -> None:
    held = {"lease/00000001.json": 10.0, "lease/00000001.beat": 50.0}
    view = lease_view({**held, "checkpoints/x": 1.0})
    assert view == LeaseView(generation=1, released=False, contested=False, beat_mtime=50.0)
    one_claim = lease_view({**held, "lease/00000002.aa.claim": 60.0})
    assert one_claim is not None and not one_claim.contested  # one machine taking over: normal
    two = lease_view({**held, "lease/00000002.aa.claim": 60.0, "lease/00000002.bb.claim": 61.0})
    assert two is not None and two.contested
    assert lease_view({"metrics.jsonl": 1.0}) is None


def test_a_taker_waits_out_the_holders_longer_lease(place: Place) -> None:
    """Machines launched with different `--lease-s`: the record says how long the holder's
    lease lasts, and a taker with a shorter one waits for the holder's."""
    run = place.run("r")
    holder = StoreLeases(place.fs, lease_s=600, host="a", worker="a:1", clock=FakeClock())
    assert holder.take(run) is not None
    clock = FakeClock()
    taker = worker(place, "b", clock)  # lease_s 60
    assert taker.take(run) is None
    clock.advance(LEASE_S * 2)
    assert taker.take(run) is None
    clock.advance(600)
    took = taker.take(run)
    assert took is not None and took.generation == 2


# -- 6. what a dead claimer, a stop, a torn record and a slow holder leave behind -----------------

def settling(place: Place, name: str, clock: FakeClock, settle_s: float = 5.0, **kwargs: Any) -> StoreLeases:
    """A worker in claim-then-confirm mode whose settle waits cost no real time."""
    return StoreLeases(place.fs, lease_s=LEASE_S, settle_s=settle_s, host=name, worker=f"{name}:1",
                       clock=clock, sleep=lambda s: clock.advance(s), **kwargs)


def test_a_claim_left_by_a_claimer_that_died_mid_settle_blocks_the_run_only_for_a_while(tmp_path: Path) -> None:
    place = Place(fsspec.filesystem("file"), str(tmp_path / "store"))
    run = place.run("r")
    # A VM lost during its settle wait: its claim stays, no record follows.
    atomic_write(place.fs, LeasePaths(run).claim(1, "00aa"), b"")
    clock = FakeClock()
    taker = settling(place, "b", clock)
    assert taker.take(run) is None  # someone is claiming it: back off
    clock.advance(LEASE_S)
    assert taker.take(run) is None
    clock.advance(2 * 5.0 + 1)  # past two settle rounds and a lease: the claimer is dead
    lease = taker.take(run)
    assert lease is not None and lease.generation == 1


def test_a_claim_by_a_dead_process_of_this_host_is_ignored_at_once(tmp_path: Path) -> None:
    place = Place(fsspec.filesystem("file"), str(tmp_path / "store"))
    run = place.run("r")
    me = ProcessRef.me()
    dead = LeaseRecord(me.host, f"{me.host}:{me.pid}", 1, "00aa", (me.start or 0) + 1)  # pid reused
    atomic_write(place.fs, LeasePaths(run).claim(1, "00aa"), dead.to_bytes())
    clock = FakeClock()
    lease = settling(place, me.host, clock).take(run)
    assert lease is not None and lease.generation == 1


def test_a_stop_during_the_settle_wait_withdraws_the_claim(tmp_path: Path) -> None:
    place = Place(fsspec.filesystem("file"), str(tmp_path / "store"))
    run = place.run("r")
    stopping = StoreLeases(place.fs, lease_s=LEASE_S, settle_s=60, host="a", worker="a:1",
                           clock=FakeClock(), sleep=lambda s: False)  # as the launcher's stop event answers
    assert stopping.take(run) is None
    assert not [p for p in place.fs.ls(LeasePaths(run).folder, detail=False) if p.endswith(".claim")]


def test_a_holder_whose_beat_moves_during_the_settle_wait_keeps_its_run(tmp_path: Path) -> None:
    place = Place(fsspec.filesystem("file"), str(tmp_path / "store"))
    run = place.run("r")
    clock = FakeClock()
    holder = settling(place, "a", FakeClock())
    held = holder.take(run)
    assert held is not None
    # The taker watches the beat stand still for a lease; the holder beats during the settle wait.
    taker = StoreLeases(place.fs, lease_s=LEASE_S, settle_s=5.0, host="b", worker="b:1", clock=clock,
                        sleep=lambda s: (clock.advance(s), holder.renew(held)))
    assert taker.take(run) is None
    clock.advance(LEASE_S + 5.0)
    assert taker.take(run) is None and holder.renew(held)  # the holder is still the holder


def test_a_torn_record_is_a_holder_of_unknown_identity_taken_over_when_its_beat_stands_still(
        place: Place) -> None:
    run = place.run("r")
    atomic_write(place.fs, LeasePaths(run).record(1), b"")  # a create that never got its bytes
    clock = FakeClock()
    taker = worker(place, "b", clock)
    assert taker.take(run) is None
    clock.advance(LEASE_S)
    lease = taker.take(run)
    assert lease is not None and lease.generation == 2


def test_a_lease_folder_without_a_record_is_taken_fresh(place: Place) -> None:
    run = place.run("r")
    atomic_write(place.fs, LeasePaths(run).claim(1, "00aa"), b"")  # left by a claim-then-confirm machine
    lease = worker(place, "a").take(run)
    assert lease is not None and lease.generation == 1


def test_one_holder_rule_a_watch_never_reads_a_clock_from_the_store(place: Place) -> None:
    """``status``, ``reset`` and ``gc`` judge a lease by the protocol's own rule: held until
    its beat stood still for lease_s on the observer's clock, whatever the store's times."""
    run = place.run("r")
    holder = StoreLeases(place.fs, lease_s=10, host="a", worker="a:1")
    lease = holder.take(run)
    assert lease is not None
    now = [0.0]
    observer = StoreLeases(place.fs, lease_s=10, host="b", worker="b:1", clock=lambda: now[0])
    first = observer.holder(run)
    assert first.holder == "a:1" and not first.moved and first.left_s == 10
    now[0] = 9.0
    assert observer.holder(run).holder == "a:1"  # not yet a lease: held
    holder.renew(lease)
    moved = observer.holder(run)
    assert moved.holder == "a:1" and moved.moved  # a beat that moves is a live holder
    now[0] = 19.5
    assert observer.holder(run).holder is None  # stood still for lease_s since it moved
    memory = observer.remembered()
    later = StoreLeases(place.fs, lease_s=10, host="b", worker="b:1", clock=lambda: now[0])
    later.remember(memory)  # another command of this machine goes on from that watch
    assert later.holder(run).holder is None
    holder.release(lease)
    assert StoreLeases(place.fs, lease_s=10, host="c", worker="c:1").holder(run).holder is None


def test_a_run_never_leased_starts_after_the_highest_attempt_its_files_name(place: Place) -> None:
    """A sweep that ran on a shared database (attempts 1 to 3, no leases) and moves to store
    leases: the first generation is 4, so the generation is the attempt number; racing
    takers that counted the same files create one name, and a leased run ignores the floor."""
    run = place.run("r")
    asked: list[str] = []

    def floor(who: str) -> Any:
        return lambda: asked.append(who) or 3

    first, second = worker(place, "a"), worker(place, "b")
    won = first.take(run, floor=floor("a"))
    assert won is not None and won.generation == 4 and asked == ["a"]
    assert second.take(run, floor=floor("b")) is None  # held: generation 4 is a's
    assert asked == ["a"]  # the floor is asked only of a folder with no generation
    first.release(won)
    again = second.take(run, floor=floor("b"))
    assert again is not None and again.generation == 5 and asked == ["a"]


def test_a_taker_knows_when_its_next_look_can_take_a_still_beat_over(place: Place) -> None:
    """``due_s``: how long until the watched beat, if it stays still, has stood still for a
    lease on the taker's clock; the launcher's next look at the run comes then."""
    run = place.run("r")
    holder, clock = worker(place, "a"), FakeClock()
    taker = worker(place, "b", clock)
    assert taker.due_s(run) is None  # nothing watched yet
    lease = holder.take(run)
    assert lease is not None and taker.take(run) is None
    assert taker.due_s(run) == LEASE_S
    clock.advance(LEASE_S - 5)
    assert taker.take(run) is None and taker.due_s(run) == 5
    clock.advance(5)
    taken = taker.take(run)
    assert taken is not None and taken.generation == 2
