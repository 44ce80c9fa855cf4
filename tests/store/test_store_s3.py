"""The store on a real S3 server (moto's, on loopback): create-only writes, the done index,
logs uploaded while a run goes, retries on throttling, streamed checkpoints, no credentials.

Requests are observed where they happen, at the HTTP level: :class:`FaultProxy` sits
between sweeprun and the server, counts what passes and answers some requests with
``503 SlowDown`` as a throttled S3 does.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from sweeprun import open_store
from sweeprun.attempt import _AttemptLog, _create_only
from sweeprun.spec import parse_spec
from sweeprun.store import ObjectBackend, SweepPaths, create_only
from sweeprun.sweep import Sweep
from sweeprun.training.checkpoints import CheckpointDir, Owner, Retention
from sweeprun.training.writer import CheckpointWriter, Snapshot

from conftest import Sandbox, wait_for
from servers import S3Server, free_port

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """A tiny HTTP proxy in front of the S3 server: it logs every request (method and
    path with query) and, when ``slow_down_every`` is set, answers every n-th request
    with 503 SlowDown without passing it on, as a throttled S3 does."""

    def __init__(self, upstream: str, slow_down_every: int = 0) -> None:
        self.upstream = urlsplit(upstream)
        self.slow_down_every = slow_down_every
        self.requests: list[str] = []
        self.slowed_down = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        chunk = self.rfile.read(size + 2)
                        raw += chunk
                        if size == 0:
                            while chunk not in (b"\r\n", b""):  # trailers
                                chunk = self.rfile.readline()
                                raw += chunk
                            return raw
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                with proxy._lock:
                    proxy.requests.append(f"{self.command} {self.path}")
                    n = len(proxy.requests)
                    fault = proxy.slow_down_every and n % proxy.slow_down_every == 0
                    proxy.slowed_down += bool(fault)
                if fault:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                  timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body, headers=headers,
                                 encode_chunked=False)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def lists(self) -> int:
        """LIST requests (ListObjectsV2) seen so far."""
        return sum(1 for r in self.requests if r.startswith("GET ") and "list-type=2" in r)

    def writes(self) -> list[str]:
        return [r for r in self.requests if r.split(" ", 1)[0] in ("PUT", "POST", "DELETE")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _fresh_s3fs() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def proxy(s3_server: S3Server, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[FaultProxy]:
    """sweeprun (this process and its children) reaching the S3 server through a FaultProxy."""
    fault_proxy = FaultProxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    _fresh_s3fs()
    yield fault_proxy
    fault_proxy.close()
    _fresh_s3fs()


def _sweep(bucket: str) -> SweepPaths:
    return open_store(f"{bucket}/sweeps").sweep("s")


# -- create-only writes -----------------------------------------------------------------------

@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/sweeps"


def test_done_is_written_once_and_a_second_done_is_not_an_error(any_store: str) -> None:
    """A stale worker finishing late cannot replace the DONE the run already has."""
    run = open_store(any_store).sweep("s").run("lr=0.1-abcdef12")
    assert run.write_done({"attempt": 2}) is True
    assert run.write_done({"attempt": 1}) is False
    assert run.read_done()["attempt"] == 2
    assert run.is_done()


def test_racing_writers_take_an_attempt_number_exactly_once(any_store: str) -> None:
    """Eight workers that read the same highest attempt all try to take the next one: one wins."""
    run = open_store(any_store).sweep("s").run("r-1")
    barrier = threading.Barrier(8)
    won: list[int] = []

    def take(worker: int) -> None:
        barrier.wait()
        if _create_only(run, run.attempt_record(3), {"attempt": 3, "worker": worker}):
            won.append(worker)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert json.loads(run.fs.cat_file(run.attempt_record(3)))["worker"] == won[0]


def test_local_create_only_leaves_no_temp_files(tmp_path: Path) -> None:
    """On local disk create-only is a hard link of a complete, fsynced temp file: a reader
    never sees a torn file, and nothing but the file is left."""
    store = open_store(str(tmp_path))
    path = str(tmp_path / "x" / "DONE")
    assert create_only(store.fs, path, b"one") and not create_only(store.fs, path, b"two")
    assert os.listdir(tmp_path / "x") == ["DONE"] and Path(path).read_bytes() == b"one"


# -- the done index ---------------------------------------------------------------------------

def _fill(s3_server: S3Server, bucket: str, runs: int, done_every: int) -> set[str]:
    """Make ``runs`` run folders on the server cheaply (straight into moto's backend, no HTTP):
    params, two checkpoints and a log each, DONE plus its index entry for every ``done_every``-th."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    name = bucket.removeprefix("s3://")
    done = set()
    for i in range(runs):
        run_id = f"i={i}-{i:08x}"
        base = f"sweeps/s/runs/{run_id}/"
        for key in ("params.json", "checkpoints/ckpt-a1-00000001-step0000000001.pt",
                    "checkpoints/ckpt-a1-00000001-step0000000001.json", "logs/attempt-1.log"):
            backend.put_object(name, base + key, b"{}")
        if i % done_every == 0:
            backend.put_object(name, base + "DONE", b"{}")
            backend.put_object(name, f"sweeps/s/done/{run_id}", b"{}")
            done.add(run_id)
    return done


def test_done_runs_cost_a_constant_number_of_list_calls(
        s3_server: S3Server, s3_bucket: str, proxy: FaultProxy) -> None:
    """1,500 runs with 5 objects each: finding the done ones is one LIST page per 1,000 runs
    of runs/ and of done/, not a listing of every checkpoint and log."""
    expected = _fill(s3_server, s3_bucket, runs=1500, done_every=3)
    sweep = _sweep(s3_bucket)
    before = proxy.lists()
    assert sweep.done_ids() == expected
    assert proxy.lists() - before == 2 + 1  # runs/: 2 pages of 1,000; done/: 500 entries


def test_deleting_a_run_folder_asks_for_a_rerun(s3_bucket: str, proxy: FaultProxy) -> None:
    """The store stays the truth: an index entry whose run folder is gone does not count.
    Readers leave it alone; a launcher removes it before the re-run recreates the folder."""
    sweep = _sweep(s3_bucket)
    kept, redo = sweep.run("a-1"), sweep.run("b-2")
    for run in (kept, redo):
        run.fs.pipe_file(run.params, b"{}")
        run.write_done({})
    assert sweep.done_ids() == {"a-1", "b-2"}
    redo.fs.rm(redo.dir, recursive=True)
    writes = len(proxy.writes())
    assert sweep.done_ids() == {"a-1"}
    assert len(proxy.writes()) == writes and redo.fs.exists(redo.done_entry)  # reading wrote nothing
    assert sweep.done_ids(prune_stale=True) == {"a-1"}
    assert not redo.fs.exists(redo.done_entry)
    redo.fs.pipe_file(redo.params, b"{}")  # the re-run starts: its folder is back, not done
    assert sweep.done_ids() == {"a-1"} and not redo.is_done()


def test_a_done_run_missing_from_the_index_is_indexed_by_the_next_launch(
        sandbox: Sandbox, s3_bucket: str) -> None:
    """A launcher killed between DONE and its index entry: the next launch finds DONE by the
    per-run check before the start, starts nothing, and adds the missing entry."""
    spec_path = _s3_sweep_file(sandbox.root, s3_bucket, f"{sys.executable} -c pass")
    assert sandbox.run("launch", str(spec_path)).returncode == 0
    spec = parse_spec(spec_path.read_text(), str(spec_path))
    sweep = Sweep(spec, str(sandbox.ledger))
    lost = sweep.paths.run(sweep.runs[0].run_id)
    lost.fs.rm_file(lost.done_entry)
    sandbox.ledger.unlink()  # a fresh machine: nothing but the store
    again = sandbox.run("launch", str(spec_path))
    assert again.returncode == 0 and "0 process(es) started" in again.stdout
    assert lost.fs.exists(lost.done_entry)


def _s3_sweep_file(root: Path, bucket: str, command: str, **extra: object) -> Path:
    path = root / "s3.yaml"
    path.write_text(yaml.safe_dump({"name": "s3", "command": command, "store": f"{bucket}/sweeps",
                                    "grid": {"a": [1, 2]}, **extra}, sort_keys=False))
    return path


def test_status_on_s3_writes_nothing(sandbox: Sandbox, s3_bucket: str, proxy: FaultProxy) -> None:
    spec_path = _s3_sweep_file(sandbox.root, s3_bucket, f"{sys.executable} -c pass")
    result = sandbox.run("launch", str(spec_path))
    assert result.returncode == 0, result.stderr
    proxy.requests.clear()
    spec = parse_spec(spec_path.read_text(), str(spec_path))
    rows = Sweep(spec, str(sandbox.ledger)).status()
    assert [r.state.value for r in rows] == ["done", "done"]
    assert proxy.requests and proxy.writes() == []


# -- logs while the run goes ------------------------------------------------------------------

WAITER = """
import os, sys, time
print("started", os.environ["SWEEPRUN_RUN_ID"], "postgresql://alice:pw-in-log@db/x", flush=True)
go = os.path.join(sys.argv[1], "go-" + os.environ["SWEEPRUN_RUN_ID"])
deadline = time.monotonic() + 120
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
print("finished", flush=True)
"""


def test_logs_reach_the_store_while_the_run_goes(sandbox: Sandbox, s3_bucket: str) -> None:
    """Another machine sees a running attempt's output within SWEEPRUN_LOG_UPLOAD_S, redacted."""
    script = sandbox.root / "waiter.py"
    script.write_text(WAITER)
    spec_path = _s3_sweep_file(sandbox.root, s3_bucket, f"{sys.executable} {script} {sandbox.root}",
                               grid={"a": [1]})
    launcher = sandbox.sweeprun("launch", str(spec_path), env={"SWEEPRUN_LOG_UPLOAD_S": "0.2"})
    try:
        sweep = Sweep(parse_spec(spec_path.read_text(), str(spec_path)), str(sandbox.ledger))
        run = sweep.paths.run(sweep.runs[0].run_id)

        def log() -> str:
            try:
                return run.fs.cat_file(run.log(1)).decode()
            except FileNotFoundError:
                return ""

        wait_for(lambda: "started" in log(), timeout=120, what="the log of the running attempt")
        assert launcher.poll() is None and "finished" not in log()
        assert "pw-in-log" not in log() and "postgresql://***@db/x" in log()
        (sandbox.root / f"go-{run.dir.rsplit('/', 1)[1]}").touch()
        out, err = launcher.communicate(timeout=120)
        assert launcher.returncode == 0, err
        assert log().endswith("finished\n")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()


def test_a_failing_log_upload_never_stops_the_run(s3_server: S3Server, s3_env: dict[str, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No bucket at all: every upload fails, the attempt's writes and close go on regardless."""
    monkeypatch.setenv("SWEEPRUN_LOG_UPLOAD_S", "0.05")
    run = open_store("s3://no-such-bucket-sweeprun/x").sweep("s").run("r-1")
    log = _AttemptLog(run, 1)
    for i in range(20):
        log.write(f"line {i}\n".encode())
        time.sleep(0.01)
    log.close()
    assert log.spool is not None and not os.path.exists(log.spool)


# -- retries and streamed checkpoints ---------------------------------------------------------

def test_slow_down_is_retried_with_backoff(s3_bucket: str, proxy: FaultProxy) -> None:
    """Every third request is refused with 503 SlowDown; every operation still succeeds."""
    proxy.slow_down_every = 3
    sweep = _sweep(s3_bucket)
    for i in range(3):
        run = sweep.run(f"r-{i}")
        assert _create_only(run, run.attempt_record(1), {"attempt": 1})
        assert not _create_only(run, run.attempt_record(1), {"attempt": 1, "late": True})
        assert run.write_done({"i": i})
    assert sweep.done_ids() == {f"r-{i}" for i in range(3)}
    assert proxy.slowed_down >= 5


def test_a_large_checkpoint_streams_in_parts_through_throttling(
        s3_bucket: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 24 MiB state goes up as a multipart upload of 5 MiB parts (S3's smallest), hashed
    on the way: the upload buffer never holds more than about two parts, not the whole
    state, and 503s on parts are retried."""
    import torch

    monkeypatch.setattr(ObjectBackend, "part_bytes", 5 * 2**20)
    proxy.slow_down_every = 4
    store = open_store(f"{s3_bucket}/big")
    buffered: list[int] = []
    open_file = store.fs.open

    def watched_open(path: str, mode: str = "rb", **kwargs: object) -> object:
        f = open_file(path, mode, **kwargs)
        if "x" in mode:
            write = f.write
            f.write = lambda data: (write(data), buffered.append(f.buffer.tell()))[0]
        return f

    monkeypatch.setattr(store.fs, "open", watched_open)
    directory = CheckpointDir(store.fs, store.root + "/checkpoints")
    writer = CheckpointWriter(directory, Owner(None, None), 1, Retention())
    weights = torch.arange(6 * 2**20, dtype=torch.float32)  # 24 MiB
    manifest = writer.write(Snapshot(step=1, state={"format": 2, "w": weights}, metrics={}))
    parts = {r.split("partNumber=")[1].split("&")[0] for r in proxy.requests
             if r.startswith("PUT ") and "partNumber=" in r}
    assert len(parts) >= 4
    assert buffered and max(buffered) <= 2 * 5 * 2**20
    assert proxy.slowed_down > 0
    assert torch.equal(directory.load(manifest)["w"], weights)


# -- credentials ------------------------------------------------------------------------------

FAILING = """
import os, sys
print("params", os.environ["SWEEPRUN_PARAMS"], flush=True)
sys.exit(int(os.environ["SWEEPRUN_PARAMS"][6]) - 1)   # {"a": 1} succeeds, {"a": 2} fails
"""


@pytest.mark.slow  # every command run against a bucket: the full suite's
def test_credentials_appear_nowhere(sandbox: Sandbox, s3_server: S3Server, s3_bucket: str) -> None:
    """A sweep on S3 whose file names a ledger URL with a password: neither that password nor
    the AWS secret reaches any output, log, status or object in the store."""
    aws_secret = s3_server.env()["AWS_SECRET_ACCESS_KEY"]
    script = sandbox.root / "failing.py"
    script.write_text(FAILING)
    spec_path = _s3_sweep_file(sandbox.root, s3_bucket, f"{sys.executable} {script}",
                               ledger="postgresql://alice:ledger-pw-secret@127.0.0.1:1/db",
                               max_attempts=1)
    outputs = []
    for args in (("launch", str(spec_path)), ("status", str(spec_path)),
                 ("status", str(spec_path), "--json")):
        result = sandbox.run(*args)  # --ledger (a local SQLite file) wins over `ledger:`
        assert result.returncode in (0, 1), result.stderr
        outputs += [result.stdout, result.stderr]
    store = open_store(s3_bucket)
    objects = {path: store.fs.cat_file(path) for path in store.fs.find(s3_bucket)}
    assert any(p.endswith("/sweep.yaml") for p in objects)
    assert any(p.endswith("/logs/attempt-1.log") for p in objects)
    for secret in (aws_secret, "ledger-pw-secret"):
        assert all(secret not in text for text in outputs)
        assert [p for p, blob in objects.items() if secret.encode() in blob] == []
    local = [p for p in sandbox.root.rglob("*") if p.is_file() and p.suffix != ".py"
             and p.name != "s3.yaml" and aws_secret.encode() in p.read_bytes()]
    assert local == []


@pytest.fixture(scope="module")
def strict_s3() -> Iterator[str]:
    """A second moto server that checks credentials (moto's IAM mode): any key is unknown to it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return server.poll() is not None

    wait_for(up, timeout=60, what="moto's server")
    assert server.poll() is None
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait()


@pytest.mark.parametrize("command", ["launch", "status"])
def test_wrong_credentials_are_one_line_and_exit_2(sandbox: Sandbox, strict_s3: str,
                                                   s3_env: dict[str, str], command: str) -> None:
    spec_path = _s3_sweep_file(sandbox.root, "s3://any-bucket", f"{sys.executable} -c pass")
    result = sandbox.run(command, str(spec_path),
                         env={"AWS_ENDPOINT_URL": strict_s3, "AWS_SECRET_ACCESS_KEY": "wrong-secret-xyz"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "any-bucket/sweeps" in lines[0] and "credentials" in lines[0]
    assert "wrong-secret-xyz" not in result.stderr + result.stdout
