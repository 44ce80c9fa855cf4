"""Every ``SWEEPRUN_*`` variable is declared once in :mod:`sweeprun.settings`, parsed by its
type's one parser, and a bad value is one line naming the variable and the value: exit 2 from
the CLI, the same line (exit 2) from inside a training script."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from sweeprun import settings
from sweeprun.errors import SpecError
from sweeprun.settings import SettingError

from conftest import REPO

NAME = re.compile(r"\bSWEEPRUN_[A-Z][A-Z0-9_]*")


def _sources() -> dict[str, str]:
    return {str(path.relative_to(REPO)): path.read_text() for path in (REPO / "sweeprun").rglob("*.py")}


def _unread(attributes: Mapping[str, str], sources: Mapping[str, str]) -> set[str]:
    """The variables (``attributes``: name -> its attribute in the settings module) that no
    module but settings.py reads, by name or as ``settings.ATTRIBUTE``. settings.py itself names
    every variable it declares: counting it would make every declaration count as read."""
    elsewhere = "\n".join(text for path, text in sources.items() if Path(path).name != "settings.py")
    return {name for name, attribute in attributes.items()
            if not re.search(rf"\b{name}\b|\bsettings\.{attribute}\b", elsewhere)}


def test_every_sweeprun_variable_in_the_package_is_declared_and_documented() -> None:
    sources = _sources()
    used = {m.group(0) for text in sources.values() for m in NAME.finditer(text)}
    declared = settings.declared()
    assert used - set(declared) == set(), "declare these in sweeprun/settings.py"
    table = settings.table()
    for name, setting in declared.items():
        assert setting.doc and f"`{name}`" in table
    attributes = {value.name: key for key, value in vars(settings).items()
                  if isinstance(value, settings.Setting)}
    assert set(attributes) == set(declared)
    assert _unread(attributes, sources) == set(), "a declared variable nothing reads"


def test_a_declared_variable_nothing_reads_is_found() -> None:
    """The check once counted the names in settings.py too, so it could never fail."""
    sources = {"sweeprun/settings.py": 'HOME = _declare(text("SWEEPRUN_HOME", ...))\n'
                                       'NOBODY = _declare(flag("SWEEPRUN_NOBODY", ...))\n',
               "sweeprun/ledger/__init__.py": "raw = settings.HOME.get()\n",
               "sweeprun/faults.py": "# SWEEPRUN_CRASH_AT=name@N\n"}
    attributes = {"SWEEPRUN_HOME": "HOME", "SWEEPRUN_NOBODY": "NOBODY", "SWEEPRUN_CRASH_AT": "CRASH_AT"}
    assert _unread(attributes, sources) == {"SWEEPRUN_NOBODY"}


def test_no_module_but_settings_reads_a_sweeprun_variable_itself() -> None:
    """``os.environ.get("SWEEPRUN_...")`` or ``os.environ.get(X_ENV)`` outside the settings: a
    second parser and a second error policy."""
    raw = re.compile(r"environ(?:\.get\(|\[)\s*(?:\"SWEEPRUN_|[A-Z_]*ENV\b|RUN_DIR|ATTEMPT|PARAMS"
                     r"|TIME_LIMIT|MTBI|SWEEP\b|RUN_ID)")
    found = [f"{path.relative_to(REPO)}:{n}" for path in (REPO / "sweeprun").rglob("*.py")
             if path.name != "settings.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if raw.search(line)]
    assert found == []


@pytest.mark.parametrize(("name", "value", "message"), [
    ("SWEEPRUN_HOME", "", "SWEEPRUN_HOME='' is not a usable folder; set it to a folder on local "
                          "disk or unset it"),
    ("SWEEPRUN_HOME", " ", "SWEEPRUN_HOME=' ' is not a usable folder"),
    ("SWEEPRUN_HOME", "a\0b", r"SWEEPRUN_HOME='a\\x00b' is not a usable folder"),
    ("SWEEPRUN_TIME_LIMIT", "-1", "SWEEPRUN_TIME_LIMIT='-1' is not a positive number of seconds"),
    ("SWEEPRUN_TIME_LIMIT", "inf", "SWEEPRUN_TIME_LIMIT='inf' is not a positive number of seconds"),
    ("SWEEPRUN_BUSY_TIMEOUT_S", "nan", "SWEEPRUN_BUSY_TIMEOUT_S='nan' is not a number of seconds "
                                       "between 0 and 86400"),
    ("SWEEPRUN_STOP_POLL_S", "0.01", "between 0.05 and 3600"),
    ("SWEEPRUN_LOG_UPLOAD_S", "soon", "SWEEPRUN_LOG_UPLOAD_S='soon' is not a positive number"),
    ("SWEEPRUN_STORE_LEASES", "maybe", "SWEEPRUN_STORE_LEASES='maybe' is neither 1 nor 0"),
    ("SWEEPRUN_ATTEMPT", "²", "SWEEPRUN_ATTEMPT='²' is not a positive integer"),
    ("SWEEPRUN_ATTEMPT", "", "SWEEPRUN_ATTEMPT='' is not a positive integer"),
    ("SWEEPRUN_PARAMS", "[1]", r"SWEEPRUN_PARAMS='\[1\]' is a JSON list, not an object"),
    ("SWEEPRUN_PARAMS", "{" * 500, r"SWEEPRUN_PARAMS='\{{60}'\.\.\. is not valid JSON"),
])
def test_a_bad_value_is_one_line_naming_the_variable_and_the_value(
        name: str, value: str, message: str) -> None:
    with pytest.raises(SettingError, match=message) as caught:
        settings.declared()[name].get({name: value})
    assert isinstance(caught.value, SpecError) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("value", "expected"), [
    (None, 5.0), ("", 5.0), ("  ", 5.0), ("0.5", 0.5), ("3600", 3600.0)])
def test_unset_or_blank_is_the_default(value: str | None, expected: float) -> None:
    env = {} if value is None else {"SWEEPRUN_STOP_POLL_S": value}
    assert settings.STOP_POLL_S.get(env) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("yes", True), (" On ", True), ("0", False), ("false", False), ("off", False)])
def test_one_flag_parser(value: str, expected: bool) -> None:
    for setting in (settings.ASYNC_SAVE, settings.STORE_LEASES, settings.ALLOW_NETWORK_LEDGER):
        assert setting.get({setting.name: value}) is expected


def test_text_keeps_a_path_as_given() -> None:
    assert settings.RUN_DIR.get({"SWEEPRUN_RUN_DIR": " run dir "}) == " run dir "


def _cli(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    import os

    full = {**os.environ, "SWEEPRUN_HOME": str(tmp_path / "home"), **env}
    return subprocess.run([sys.executable, "-m", "sweeprun", *args], capture_output=True, text=True,
                          env=full, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize(("name", "value"), [
    ("SWEEPRUN_HOME", ""), ("SWEEPRUN_HOME", " "),   # a mistyped $UNSET: the ledger would move
    ("SWEEPRUN_STOP_POLL_S", "often"), ("SWEEPRUN_LOG_UPLOAD_S", "-3"),
    ("SWEEPRUN_LEDGER_WAIT_S", "forever"), ("SWEEPRUN_ASYNC_SAVE", "2")])
def test_the_cli_refuses_a_bad_value_before_any_work_with_exit_2(tmp_path: Path, name: str,
                                                                   value: str) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: s\nstore: {tmp_path / 'store'}\ncommand: python -c pass\n"
                     "grid:\n  lr: [0.1]\n")
    result = _cli(["launch", str(sweep)], {name: value}, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {name}={value!r} "), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "store").exists()


def test_inside_a_training_script_the_same_line_is_the_exception_and_exit_2(tmp_path: Path) -> None:
    from sweeprun.training import init

    with pytest.raises(SettingError, match="SWEEPRUN_ASYNC_SAVE='later' is neither 1 nor 0"):
        init(local_dir=tmp_path / "run", env={"SWEEPRUN_ASYNC_SAVE": "later"})
    script = "import sweeprun\nsweeprun.init(local_dir='run')\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                 "SWEEPRUN_TIME_LIMIT": "soon"})
    assert result.returncode == 2
    assert result.stderr == ("sweeprun: error: SWEEPRUN_TIME_LIMIT='soon' is not a positive number "
                             "of seconds; unset it or give one\n")
    assert not (tmp_path / "run").exists()
