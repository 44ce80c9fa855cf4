"""Redaction sits at the exits: the console, the attempt logs and the records sweeprun stores.

A secret (a PostgreSQL password in the ledger's DSN, an S3 key and a signature a run prints)
must never reach stdout/stderr, a log or a stored file, whichever command or code path
carries it there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweeprun.redact import record_bytes, redacted_console

from conftest import Sandbox
from servers import PostgresServer

PASSWORD = "Pg-s3cret-PW"
KEY, SIGNATURE, WORD = "wJalrXUtnFEMIsecret", "deadbeefcafe0042", "kw-s3cret-pw"
SECRETS = (PASSWORD, KEY, SIGNATURE, WORD)
CHATTY = (f"s3://AKIDEXAMPLE:{KEY}@bucket/x?X-Amz-Signature={SIGNATURE} "
          f"host=db password={WORD}")


def test_everything_the_cli_process_prints_passes_the_redactor(capsys: pytest.CaptureFixture[str]) -> None:
    """A new print in any module, rich or plain, stdout or stderr: redacted with no call of its own."""
    from rich.console import Console

    with redacted_console():
        print(f"opening postgresql://me:{PASSWORD}@db/x")
        sys.stderr.write(f"warning: {CHATTY}\n")
        Console(highlight=False, soft_wrap=True).print(f"[bold]ledger[/] postgresql://me:{PASSWORD}@db/x")
    out, err = capsys.readouterr()
    assert "postgresql://***@db/x" in out and "s3://***@bucket" in err
    assert not any(secret in out + err for secret in SECRETS)
    print(PASSWORD)  # outside the CLI's run the streams are the process's own again
    assert capsys.readouterr().out == PASSWORD + "\n"


def test_a_stored_record_is_redacted_and_still_json() -> None:
    record = {"error": f"cannot reach postgresql://me:{PASSWORD}@db/x", "note": f"password={WORD}",
              "nested": [{"url": f"https://h/o?token={SIGNATURE}"}], "attempt": 3}
    blob = record_bytes(record)
    assert not any(secret.encode() in blob for secret in SECRETS)
    assert json.loads(blob) == {"error": "cannot reach postgresql://***@db/x", "note": "password=***",
                                "nested": [{"url": "https://h/o?token=***"}], "attempt": 3}


def _files(*roots: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for root in roots if root.exists()
            for path in root.rglob("*") if path.is_file() and not path.is_symlink()}


def test_no_command_prints_logs_or_stores_a_secret(sandbox: Sandbox, postgres_server: PostgresServer) -> None:
    ledger = postgres_server.database().replace("postgresql://postgres@",
                                                f"postgresql://postgres:{PASSWORD}@")
    script = sandbox.root / "chatty.py"
    script.write_text(
        "import sys\n"
        f"print('syncing to {CHATTY}', flush=True)\n"
        f"print('also {CHATTY}', file=sys.stderr, flush=True)\n"
        "if 'fail' in sys.argv:\n"
        f"    raise SystemExit('cannot reach {CHATTY}')\n")
    sweep = sandbox.write_sweep({"mode": ["ok", "fail"]}, command=f"python {script} {{mode}}",
                                max_attempts=1)
    env = sandbox.env(SWEEPRUN_LEDGER=ledger)

    def sweeprun(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "sweeprun", *args], capture_output=True,
                                text=True, env=env, cwd=sandbox.root, timeout=300)
        assert result.returncode in (0, 1, 2), result.stderr
        return result.stdout + result.stderr

    seen = [sweeprun("launch", str(sweep)), sweeprun("status", str(sweep)),
            sweeprun("status", str(sweep), "--json")]
    runs = sorted(p.name for p in (sandbox.store / "t" / "runs").iterdir()) \
        if (sandbox.store / "t" / "runs").exists() else []
    if not runs:  # the layout's own name for the runs folder
        runs = sorted({p.parent.parent.name for p in sandbox.store.rglob("logs/attempt-1.log")})
    assert len(runs) == 2, runs
    for run in runs:
        seen += [sweeprun("show", str(sweep), run), sweeprun("show", str(sweep), run, "--json")]
    seen.append(sweeprun("launch", str(sweep), "--ledger", ledger.replace(PASSWORD, "wrong-" + PASSWORD)
                         .replace("/t_", "/no_such_db_")))
    text = "\n".join(seen)
    assert "s3://***@bucket" in text, text      # what the run printed is shown, starred
    assert not [secret for secret in SECRETS if secret in text], text
    files = _files(sandbox.store, sandbox.root / "state")
    logs = [blob for path, blob in files.items() if path.suffix == ".log"]
    assert logs and all(b"s3://***@bucket" in blob for blob in logs)
    leaked = [f"{path}: {secret}" for path, blob in files.items() for secret in SECRETS
              if secret.encode() in blob]
    assert leaked == []
    assert os.environ.get("SWEEPRUN_LEDGER") is None or PASSWORD not in os.environ["SWEEPRUN_LEDGER"]
