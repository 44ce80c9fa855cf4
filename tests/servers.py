"""Real servers on loopback for the tests: one PostgreSQL and one S3-compatible endpoint per session.

Both are real: PostgreSQL from the machine's server binaries (Debian's
``/usr/lib/postgresql/<v>/bin``; ``.ci/run`` installs them where they are missing),
started in a throwaway data directory, as the ``postgres`` user when the tests run
as root (the server refuses root); moto's server mode for S3, which honours
conditional writes (``If-None-Match``). A missing server binary fails the tests
that need it, with the command that fixes it: those tests are never skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path:
        return path
    pytest.fail(f"PostgreSQL's {name} is not installed; run `apt-get install postgresql` (.ci/run "
                "does) so the PostgreSQL tests can start a real server")


class PostgresServer:
    """A PostgreSQL server in a throwaway folder; ``stop()``/``start()`` play an outage."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sweeprun-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("the tests run as root and there is no `postgres` user to run the "
                            "server; run `apt-get install postgresql` (it creates one)")
            os.chmod(self.root, 0o755)  # mkdtemp makes 0700: the server must reach its folder
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.prefix, _pg_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True)
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        subprocess.run([*self.prefix, _pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                        "-o", options, "-w", "-t", "60", "start"], check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*self.prefix, _pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                        "stop"], check=False, capture_output=True)

    def database(self) -> str:
        """A new, empty database on this server; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class S3Server:
    """moto's S3 server on loopback; :meth:`env` is what a worker needs to reach it."""

    endpoint: str
    server: object

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "sweeprun-test-key",
                "AWS_SECRET_ACCESS_KEY": "sweeprun-test-secret-value", "AWS_DEFAULT_REGION": "us-east-1"}

    def bucket(self) -> str:
        """A new, empty bucket; its ``s3://`` URL."""
        import boto3

        name = "b-" + uuid.uuid4().hex[:12]
        env = self.env()
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                     region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's server, as the URL a user gives ``--ledger``."""
    return postgres_server.database()


_PUT_LOCK = threading.Lock()


def _atomic_conditional_puts() -> None:
    """Make moto's PUT one step, as S3's is. moto checks ``If-None-Match: *`` and then stores
    the object, with other requests' threads free to run in between: under load two
    conditional PUTs of one key can both succeed, which S3 never allows and which the
    store-lease races below would (rightly) count as two winners."""
    from moto.s3.responses import S3Response

    put = S3Response.put_object
    if getattr(put, "_sweeprun_atomic", False):
        return

    def locked(self: S3Response) -> object:
        with _PUT_LOCK:
            return put(self)

    locked._sweeprun_atomic = True  # type: ignore[attr-defined]
    S3Response.put_object = locked  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        pytest.fail("moto is not installed; `pip install -e .[test]` installs it")
    _atomic_conditional_puts()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(endpoint=f"http://{host}:{port}", server=server)
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process (and its children) pointed at the session's S3 server; the variables set."""
    env = s3_server.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import fsspec

    fsspec.config.conf.pop("s3", None)
    try:  # s3fs caches instances by their arguments, not by the environment they read
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass
    return env


@pytest.fixture
def s3_bucket(s3_server: S3Server, s3_env: dict[str, str]) -> str:
    """A new, empty bucket on the session's S3 server, as an ``s3://`` URL."""
    return s3_server.bucket()


class MlflowServer:
    """A real MLflow tracking server (``mlflow server``, the ``mlflow`` package's own) on
    loopback, its runs in a throwaway SQLite file."""

    def __init__(self) -> None:
        import time
        import urllib.request

        self.root = Path(tempfile.mkdtemp(prefix="sweeprun-mlflow-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        binary = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
        if not os.path.exists(binary):
            pytest.fail("mlflow is not installed; `pip install -e .[test]` installs it")
        self.log = open(self.root / "server.log", "wb")  # noqa: SIM115 - open while it runs
        self.proc = subprocess.Popen(
            [binary, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--default-artifact-root", str(self.root / "artifacts")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    pytest.fail(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)

    def client(self) -> object:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def close(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[MlflowServer]:
    server = MlflowServer()
    try:
        yield server
    finally:
        server.close()


class TcpProxy:
    """A loopback TCP proxy the test can cut, to play a network that drops (a notebook's Wi-Fi)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up = True
        self._flowing = threading.Event()
        self._flowing.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Drop every connection and refuse new ones until :meth:`restore`."""
        self.up = False
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def freeze(self) -> None:
        """Keep connections open but carry nothing, as a network that silently drops packets:
        a client then blocks until its own timeouts notice."""
        self._flowing.clear()

    def restore(self) -> None:
        self.up = True
        self._flowing.set()

    def close(self) -> None:
        self.cut()
        self._listener.close()
