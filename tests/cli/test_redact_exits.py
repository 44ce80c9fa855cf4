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

from sweeprun.errors import LedgerError
from sweeprun.ledger import open_ledger
from sweeprun.redact import record_bytes, redact, redact_url, redacted_console

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


# -- the exits must not change what they pass: JSON stays JSON, values stay whole ----------------

URL, MAIL = "http://mirror:nine", "me@example.org"


@pytest.mark.parametrize("text", [
    f"url={URL} mail={MAIL}",                                  # a status table row, params on one line
    f"│ 1d428ece │ url={URL} mail={MAIL} │ done │",
    f'{{"url": "{URL}", "mail": "{MAIL}"}}',                     # JSON a script prints into its log
    f"{{'url': '{URL}', 'mail': '{MAIL}'}}",
    f"url={URL},mail={MAIL}",
    "connecting host=db password=*** done",                    # already starred: left as it is
    "see http://mirror/a?to=me@example.org",                   # an '@' in the query is no userinfo
])
def test_the_text_patterns_stop_where_a_value_ends(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize(("text", "expected"), [
    (f'{{"dsn": "postgresql://me:{PASSWORD}@db/x", "mail": "{MAIL}"}}',
     f'{{"dsn": "postgresql://***@db/x", "mail": "{MAIL}"}}'),
    (f"url={URL} dsn=postgresql://me:{PASSWORD}@db/x", f"url={URL} dsn=postgresql://***@db/x"),
    (f"postgresql://me:a,{PASSWORD}@db/x", "postgresql://***@db/x"),   # RFC 3986 userinfo holds ','
    (f"s3://AKIDEXAMPLE:{KEY}/x+y@bucket/k, then", "s3://***@bucket/k, then"),   # AWS keys hold '/'
])
def test_realistic_secrets_are_still_caught_in_prose_and_json(text: str, expected: str) -> None:
    assert redact(text) == expected


# What a password may hold unencoded, and text may not: quotes, <, >, a space, '/', '@', '#', '?'.
HOSTILE = 'QuoteXY"LessXY<SpaceXY SpaceZZ>SlashXY/AtXY@HashXY#QmarkXY?EndXY'
PIECES = ("QuoteXY", "LessXY", "SpaceXY", "SpaceZZ", "SlashXY", "AtXY", "HashXY", "QmarkXY", "EndXY")


def test_a_url_known_to_be_one_is_starred_whatever_its_password_holds() -> None:
    """In text the patterns stop at a quote or a space; where the text is the URL the user gave
    (the ledger's shown name, a store's URL) its whole userinfo goes, as before."""
    assert redact_url(f"postgresql://me:{HOSTILE}@db:5432/x") == "postgresql://***@db:5432/x"
    with pytest.raises(LedgerError) as caught:
        open_ledger(f"mysql://me:{HOSTILE}@db/x", "s")
    assert "mysql://***@db/x" in str(caught.value)
    assert not [piece for piece in PIECES if piece in str(caught.value)]


def test_json_output_is_redacted_as_a_tree_and_stays_json(sandbox: Sandbox) -> None:
    """`status --json` and `show --json` are redacted value by value: the console's text patterns,
    run over encoded JSON, ate the closing quote after ``password=...`` (invalid JSON) and ran
    from one value's URL to the next value's ``@`` (a parameter lost)."""
    script = sandbox.root / "chatty.py"
    script.write_text(f"print('connecting host=db password={WORD}')\nprint('{CHATTY}')\n")
    dsn = f"postgresql://me:{PASSWORD}@db/x"
    sweep = sandbox.write_sweep({"url": [URL], "mail": [MAIL]}, {"dsn": dsn},
                                command=f"python {script}")
    assert sandbox.run("launch", str(sweep)).returncode == 0
    status = sandbox.run("status", str(sweep), "--json")
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert row["state"] == "done"
    assert row["params"] == {"url": URL, "mail": MAIL}
    shown = sandbox.run("show", str(sweep), row["run_id"], "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["params"] == {"url": URL, "mail": MAIL, "dsn": "postgresql://***@db/x"}
    assert "connecting host=db password=***" in "\n".join(detail["log_tail"])
    table = sandbox.run("status", str(sweep), env={"COLUMNS": "300"})
    assert f"url={URL}" in table.stdout and f"mail={MAIL}" in table.stdout, table.stdout
    assert not [s for s in SECRETS if s in status.stdout + shown.stdout + table.stdout]


# -- a closed stdout or stderr is no crash ---------------------------------------------------------


@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-"])
def test_a_closed_console_stream_does_not_stop_a_launch(sandbox: Sandbox, closed: str) -> None:
    """Python sets ``sys.stdout`` (``sys.stderr``) to None when the descriptor is closed; the
    launch runs every run as before instead of dying with a run left claimed."""
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 1, "sleep": 0})
    err = sandbox.root / "err.txt"
    shell = f'exec "$@" {closed}' + ("" if "2>" in closed else f" 2>{err}")
    result = subprocess.run(["sh", "-c", shell, "sh", sys.executable, "-m", "sweeprun", "launch",
                             str(sweep), "--ledger", str(sandbox.ledger)],
                            env=sandbox.env(), cwd=sandbox.root, timeout=300,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    errors = err.read_text() if err.exists() else ""
    assert result.returncode == 0, errors
    assert "Traceback" not in errors
    assert {row["state"] for row in sandbox.status(sweep).values()} == {"done"}


# -- an unexpected exception's traceback passes the redactor --------------------------------------


def test_a_traceback_is_printed_through_the_redactor_exit_1(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """A bug's exception may quote a URL; the interpreter printed it after main() had put the
    real streams back."""
    from sweeprun import cli

    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"cannot reach postgresql://me:{PASSWORD}@db/x")

    monkeypatch.setattr(cli, "_spec", bug)
    sweep = sandbox.write_sweep({"a": [1]})
    assert cli.main(["status", str(sweep)]) == 1
    out, err = capfd.readouterr()
    assert "Traceback" in err and "RuntimeError: cannot reach postgresql://***@db/x" in err
    assert PASSWORD not in out + err


# -- a library user gets the same guarantee: sweeprun's exceptions carry redacted messages -------


def test_every_sweeprun_exception_is_redacted_when_it_is_made() -> None:
    """``sweeprun.Sweep`` is public: a StoreError that quotes an fsspec URL (fsspec keeps the
    credentials in it) reaches the library user's own logs with no exit in between."""
    import pickle

    from sweeprun.errors import LeaseLost, LedgerError, StoreError, SweeprunError
    from sweeprun.settings import SettingError
    from sweeprun.verify import ScriptFailed

    message = f"ftp://me:{PASSWORD}@h/x/sweep-id is not a sweep id; host=db password={WORD}"
    for kind in (SweeprunError, StoreError, LedgerError, LeaseLost, SettingError, ScriptFailed):
        error = kind(message)
        assert str(error) == "ftp://***@h/x/sweep-id is not a sweep id; host=db password=***"
        assert PASSWORD not in repr(error) and WORD not in repr(error) and error.args == (str(error),)
        assert str(pickle.loads(pickle.dumps(error))) == str(error)  # it crosses processes the same


def test_a_verify_report_is_redacted_for_library_users() -> None:
    from sweeprun.verify import Report

    report = Report(1, [f"NOT EXACT: step 3 logged s3://AKIDEXAMPLE:{KEY}@bucket/x"])
    assert report.lines == ["NOT EXACT: step 3 logged s3://***@bucket/x"]
