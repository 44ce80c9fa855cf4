"""Spot VMs' termination notices (``--notice``): on one, the worker's runs save at once and it
drains; the next worker resumes them.

No cloud metadata server can be reached from these machines: each provider's endpoint is
played by a loopback HTTP server answering as the provider documents it (AWS's IMDSv2 token
and ``spot/instance-action``, GCP's ``instance/preempted``, Azure's Scheduled Events). The
real endpoints are untested here (docs/schedulers.md says so)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from sweeprun.errors import SpecError
from sweeprun.notices import Notice, parse_notice

from _metadata import Metadata
from conftest import Sandbox, wait_for


@pytest.fixture
def metadata() -> Iterator[Metadata]:
    server = Metadata()
    yield server
    server.close()


AWS = "/latest/meta-data/spot/instance-action"


@pytest.mark.parametrize(("provider", "path", "quiet", "notice", "said"), [
    ("aws", AWS, (404, b""), {"action": "terminate", "time": "2026-12-06T23:40:00Z"},
     "AWS spot instance-action: terminate at 2026-12-06T23:40:00Z"),
    ("gcp", "/computeMetadata/v1/instance/preempted", (200, b"FALSE"), b"TRUE",
     "GCP: the instance is being preempted"),
    ("azure", "/metadata/scheduledevents?api-version=2020-07-01",
     (200, json.dumps({"Events": [{"EventType": "Freeze"}]}).encode()),
     {"Events": [{"EventType": "Preempt", "NotBefore": "Sun, 06 Dec 2026 23:40:00 GMT"}]},
     "Azure scheduled event: Preempt at Sun, 06 Dec 2026 23:40:00 GMT"),
])
def test_each_providers_notice_is_read_as_it_documents_it(metadata: Metadata, provider: str, path: str,
                                                          quiet: tuple[int, bytes], notice: Any, said: str) -> None:
    watch = parse_notice(f"{provider}={metadata.url(path)}")
    metadata.notice = quiet
    assert watch.check() is None, "no notice yet (and an Azure Freeze is no reason to stop)"
    metadata.post(notice)
    assert watch.check() == said
    asked = {k.lower(): v for k, v in metadata.headers[-1].items()}
    assert {"aws": ("x-aws-ec2-metadata-token", "token-123"), "gcp": ("metadata-flavor", "Google"),
            "azure": ("metadata", "true")}[provider] in asked.items()


def test_a_metadata_server_that_does_not_answer_is_no_notice() -> None:
    assert Notice("aws", "http://127.0.0.1:9/latest/meta-data/spot/instance-action").check() is None


@pytest.mark.parametrize("value", ["oracle", "aws=ftp://x", ""])
def test_a_bad_notice_option_is_refused(value: str) -> None:
    with pytest.raises(SpecError, match="--notice"):
        parse_notice(value)


@pytest.mark.slow  # two workers' runs; the fast subset keeps each provider's answer
def test_a_notice_has_the_runs_save_and_the_worker_drain_and_the_next_worker_resumes(
        sandbox: Sandbox, metadata: Metadata) -> None:
    sweep = sandbox.write_sweep({"a": [1, 2]}, {"steps": 400, "sleep": 0.05})
    worker = sandbox.sweeprun("worker", str(sweep), "--workers", "2", "--notice", f"aws={metadata.url(AWS)}")
    wait_for(lambda: len([e for e in sandbox.events() if e["event"] == "start"]) == 2, what="two runs")
    metadata.post({"action": "terminate", "time": "2026-12-06T23:40:00Z"})
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 75, out + err
    assert "stopping: termination notice (AWS spot instance-action: terminate at 2026-12-06T23:40:00Z)" in out
    saved = [e for e in sandbox.events() if e["event"] == "preempted"]
    assert len(saved) == 2, "each run saved and exited 75"
    assert metadata.tokens >= 1, "IMDSv2: asked with a session token"

    later = sandbox.run("worker", str(sweep), "--workers", "2", timeout=180)
    assert later.returncode == 0, later.stdout + later.stderr
    resumed = [e for e in sandbox.events() if e["event"] == "start"][2:]
    assert sorted(e["from_step"] for e in resumed) == sorted(e["step"] for e in saved)
