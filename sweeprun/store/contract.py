"""The store contract as tests, shipped with the package so every kind of store inherits them.

A test module subclasses :class:`StoreContract` and says where a store is, the way users
give it (a path or an fsspec URL, opened by :func:`sweeprun.store.open_store`)::

    class TestLocal(StoreContract):
        @pytest.fixture
        def url(self, tmp_path):
            return str(tmp_path / "store")

What only local disk can get wrong (links, named pipes, other processes) is in
:class:`NativeStoreContract`, for stores with OS paths
(:meth:`~sweeprun.store.base.StoreBackend.native_path`). Needs pytest (the ``test`` extra).
"""

from __future__ import annotations

import os
import posixpath
import subprocess
import sys
import threading
import time

import pytest

from ..errors import StoreError
from .base import StoreBackend
from .errors import StoreLinkError
from .url import Store, open_store

#: A file big enough that a torn write would show (several write calls, several parts).
BIG = 3 * 2**20


class StoreContract:
    """What every store backend promises; see :class:`sweeprun.store.base.StoreBackend`."""

    @pytest.fixture
    def url(self) -> str:  # pragma: no cover - each store overrides it
        raise NotImplementedError

    @pytest.fixture
    def store(self, url: str) -> Store:
        return open_store(url)

    @pytest.fixture
    def backend(self, store: Store) -> StoreBackend:
        return store.backend

    @pytest.fixture
    def root(self, store: Store) -> str:
        return store.root

    @staticmethod
    def native(backend: StoreBackend, root: str) -> str:
        """The store's folder on this machine's disk (only :class:`NativeStoreContract` asks)."""
        path = backend.native_path(root)
        assert path is not None, "a NativeStoreContract store must have OS paths"
        os.makedirs(path, exist_ok=True)
        return path

    # -- atomic writes --------------------------------------------------------------------

    def test_atomic_write_replaces_the_whole_file(self, backend: StoreBackend, root: str) -> None:
        path = posixpath.join(root, "a/b/state.json")
        backend.atomic_write(path, b"one")
        backend.atomic_write(path, b"two, longer")
        assert backend.read_regular(path, 100) == b"two, longer"
        assert backend.entries(posixpath.join(root, "a/b")) == {"state.json": True}  # no temp left

    def test_a_reader_never_sees_a_partial_write(self, backend: StoreBackend, root: str) -> None:
        path = posixpath.join(root, "big.bin")
        backend.atomic_write(path, b"a" * BIG)
        seen: list[bytes] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def read() -> None:
            try:
                while not stop.is_set():
                    blob = backend.read_regular(path, 2 * BIG)
                    seen.append(bytes(set(blob)) + len(blob).to_bytes(8, "big"))
            except BaseException as exc:  # a read racing a write must never fail
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for i in range(6):
                backend.atomic_write(path, (b"b" if i % 2 == 0 else b"a") * BIG)
        finally:
            stop.set()
            reader.join()
        assert errors == []
        assert seen
        assert {s[:1] for s in seen} <= {b"a", b"b"} and all(len(s) == 9 for s in seen)  # one byte value
        assert {int.from_bytes(s[1:], "big") for s in seen} == {BIG}

    def test_json_round_trip_and_refusal_of_oversized_files(self, backend: StoreBackend, root: str) -> None:
        path = posixpath.join(root, "params.json")
        backend.write_json(path, {"lr": 0.1, "name": "x y"})
        assert backend.read_json(path) == {"lr": 0.1, "name": "x y"}
        with pytest.raises(StoreError, match="larger than 8 bytes"):
            backend.read_json(path, max_bytes=8)
        backend.atomic_write(path, b"{not json")
        with pytest.raises(ValueError):
            backend.read_json(path)

    # -- create-only ----------------------------------------------------------------------

    def test_create_only_keeps_the_first_file(self, backend: StoreBackend, root: str) -> None:
        path = posixpath.join(root, "runs/r/DONE")
        assert backend.create_only(path, b"first") is True
        assert backend.create_only(path, b"second") is False
        assert backend.read_regular(path, 100) == b"first"
        assert backend.entries(posixpath.join(root, "runs/r")) == {"DONE": True}

    def test_create_only_has_exactly_one_winner_across_threads(self, backend: StoreBackend, root: str) -> None:
        path = posixpath.join(root, "lease/00000001.json")
        start = threading.Barrier(8)
        won: list[int] = []

        def claim(i: int) -> None:
            start.wait()
            if backend.create_only(path, f"claimer {i}".encode()):
                won.append(i)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        assert backend.read_regular(path, 100) == f"claimer {won[0]}".encode()

    # -- streaming writes -----------------------------------------------------------------

    def test_a_streamed_file_appears_whole_after_its_commit(self, backend: StoreBackend, root: str) -> None:
        path = posixpath.join(root, "checkpoints/ckpt.pt")
        committed: list[bool] = []
        with backend.stream_write(path, create_only=True, temp_suffix=".pt",
                                  before_commit=lambda: committed.append(backend.exists(path))) as sink:
            for _ in range(3):
                sink.file.write(b"x" * 2**20)
            sink.sync()
        assert committed == [False]  # not there until the commit
        assert backend.size(path) == 3 * 2**20
        assert backend.entries(posixpath.join(root, "checkpoints")) == {"ckpt.pt": True}

    def test_a_streamed_create_only_write_loses_to_a_file_already_there(
            self, backend: StoreBackend, root: str) -> None:
        path = posixpath.join(root, "checkpoints/ckpt.pt")
        backend.atomic_write(path, b"theirs")
        with pytest.raises(FileExistsError):
            with backend.stream_write(path, create_only=True) as sink:
                sink.file.write(b"ours")
        assert backend.read_regular(path, 100) == b"theirs"
        assert backend.entries(posixpath.join(root, "checkpoints")) == {"ckpt.pt": True}

    def test_a_failed_streamed_write_leaves_nothing(self, backend: StoreBackend, root: str) -> None:
        path = posixpath.join(root, "checkpoints/ckpt.pt")
        with pytest.raises(RuntimeError, match="serialising failed"):
            with backend.stream_write(path, create_only=True) as sink:
                sink.file.write(b"half a checkpoint")
                raise RuntimeError("serialising failed")
        assert not backend.exists(path)
        assert backend.entries(posixpath.join(root, "checkpoints")) == {}

    def test_a_stream_without_create_only_replaces(self, backend: StoreBackend, root: str) -> None:
        path = posixpath.join(root, "log.txt")
        backend.atomic_write(path, b"old")
        with backend.stream_write(path) as sink:
            sink.file.write(b"new")
        assert backend.read_regular(path, 100) == b"new"

    # -- bounded reads --------------------------------------------------------------------

    def test_bounded_reads_return_at_most_what_was_asked(self, backend: StoreBackend, root: str) -> None:
        path = posixpath.join(root, "metrics.jsonl")
        backend.atomic_write(path, b"0123456789")
        assert backend.read_regular(path, 4) == b"0123"
        assert backend.read_regular(path, 4, tail=True) == b"6789"
        assert backend.read_regular(path, 100) == b"0123456789"
        assert backend.read_range(path, 2, 5) == b"234"
        assert backend.size(path) == 10
        assert backend.read_if_present(path, 3) == b"012"

    def test_a_folder_is_not_a_file(self, backend: StoreBackend, root: str) -> None:
        backend.atomic_write(posixpath.join(root, "run/DONE/inside"), b"x")
        with pytest.raises(StoreError, match="not a regular file"):
            backend.read_regular(posixpath.join(root, "run/DONE"), 100)
        assert backend.entries(posixpath.join(root, "run")) == {"DONE": False}

    def test_missing_files(self, backend: StoreBackend, root: str) -> None:
        missing = posixpath.join(root, "nothing/here")
        with pytest.raises(StoreError) as caught:
            backend.read_regular(missing, 10)
        assert isinstance(caught.value.__cause__, FileNotFoundError)
        assert backend.read_if_present(missing, 10) is None
        assert not backend.exists(missing)
        assert backend.entries(posixpath.join(root, "nothing")) == {}
        assert backend.files(posixpath.join(root, "nothing")) == {}
        backend.delete_file(missing)  # gone already: nothing to do
        with pytest.raises((FileNotFoundError, StoreError)) as moved:
            backend.move(missing, posixpath.join(root, "elsewhere"))
        assert isinstance(moved.value, FileNotFoundError) or isinstance(
            moved.value.__cause__, FileNotFoundError)

    # -- listings, moves, deletes ---------------------------------------------------------

    def test_listings_give_every_file_with_its_mtime(self, backend: StoreBackend, root: str) -> None:
        top = posixpath.join(root, "runs")
        for rel in ("a/DONE", "a/logs/attempt-1.log", "b/params.json"):
            backend.atomic_write(posixpath.join(top, rel), b"x")
        files = backend.files(top)
        prefix = top.rstrip("/") + "/"
        assert {p[len(prefix):] for p in files} == {"a/DONE", "a/logs/attempt-1.log", "b/params.json"}
        assert all(abs(mtime - time.time()) < 24 * 3600 for mtime in files.values())
        assert backend.entries(posixpath.join(top, "a")) == {"DONE": True, "logs": False}

    def test_move_and_delete(self, backend: StoreBackend, root: str) -> None:
        src, dst = posixpath.join(root, "a/one"), posixpath.join(root, "b/two")
        backend.atomic_write(src, b"payload")
        backend.move(src, dst)
        assert not backend.exists(src) and backend.read_regular(dst, 100) == b"payload"
        backend.delete_file(dst)
        assert not backend.exists(dst)

    def test_a_big_file_deleted_by_way_of_a_set_aside_name_is_gone(
            self, backend: StoreBackend, root: str) -> None:
        path, aside = posixpath.join(root, "ckpt.pt"), posixpath.join(root, ".tmp-ckpt-pruned.pt")
        backend.atomic_write(path, b"x" * 1000)
        backend.delete_file(path, set_aside=aside)
        assert not backend.exists(path)  # the set-aside copy goes on a helper thread

    def test_names_are_literal_never_patterns(self, backend: StoreBackend, root: str) -> None:
        backend.atomic_write(posixpath.join(root, "out[1]/x"), b"mine")
        backend.atomic_write(posixpath.join(root, "out1/x"), b"another run's")
        backend.delete([posixpath.join(root, "out[1]")], recursive=True)
        assert not backend.exists(posixpath.join(root, "out[1]/x"))
        assert backend.read_regular(posixpath.join(root, "out1/x"), 100) == b"another run's"


class NativeStoreContract(StoreContract):
    """What a store on this machine's disk promises besides: it has OS paths, so other
    processes, links and named pipes can reach it, and none of them may fool it."""

    def test_create_only_has_exactly_one_winner_across_processes(
            self, backend: StoreBackend, root: str) -> None:
        folder = self.native(backend, root)
        path = os.path.join(folder, "claim.json")
        script = ("import sys\nfrom sweeprun.store import open_store\n"
                  "s = open_store(sys.argv[1])\n"
                  "print(s.backend.create_only(sys.argv[2], sys.argv[3].encode()))\n")
        procs = [subprocess.Popen([sys.executable, "-c", script, folder, path, f"process {i}"],
                                  stdout=subprocess.PIPE, text=True) for i in range(6)]
        answers = [p.communicate(timeout=120)[0].strip() for p in procs]
        assert sorted(answers) == ["False"] * 5 + ["True"]
        winner = answers.index("True")
        assert backend.read_regular(path, 100) == f"process {winner}".encode()

    def test_links_are_not_files_and_are_not_followed(self, backend: StoreBackend, root: str,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
        folder = self.native(backend, root)
        outside = tmp_path_factory.mktemp("outside")
        (outside / "DONE").write_text("{}")
        (outside / "precious").write_text("keep me")
        run = os.path.join(folder, "run")
        os.makedirs(run)
        os.symlink(outside / "DONE", os.path.join(run, "DONE"))
        os.symlink(outside, os.path.join(run, "linked"))
        assert backend.entries(run) == {"DONE": False, "linked": False}
        assert backend.files(run) == {}  # a linked DONE is no finished run; a linked folder is not entered
        with pytest.raises(StoreLinkError):
            backend.read_regular(os.path.join(run, "DONE"), 100)
        with pytest.raises(StoreLinkError):
            backend.atomic_write(os.path.join(run, "linked", "precious"), b"overwritten")
        with pytest.raises(StoreLinkError):
            backend.create_only(os.path.join(run, "linked", "new"), b"x")
        backend.delete_file(os.path.join(run, "DONE"))  # a link is left alone, its target too
        with pytest.raises(StoreLinkError):
            backend.delete([os.path.join(run, "linked", "precious")])
        backend.delete([run], recursive=True)
        assert (outside / "precious").read_text() == "keep me" and (outside / "DONE").exists()

    def test_a_named_pipe_is_refused_without_blocking(self, backend: StoreBackend, root: str) -> None:
        folder = self.native(backend, root)
        pipe = os.path.join(folder, "metrics.jsonl")
        os.mkfifo(pipe)
        with pytest.raises(StoreError, match="named pipe"):
            backend.read_regular(pipe, 100)
        assert backend.entries(folder) == {"metrics.jsonl": False}
        assert backend.files(folder) == {}
