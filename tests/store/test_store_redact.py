"""Credentials never appear in output: the redactor, and every store error that passes through it."""

from __future__ import annotations

import errno
import ftplib
import json

import pytest

from sweeprun.errors import StoreError
from sweeprun.redact import redact
from sweeprun.store import open_store, store_errors

SECRETS = ["s3cr3t", "AKIAEXAMPLE", "wJalr/XUtnFEMI", "deadbeef", "tok123", "p@ss"]


@pytest.mark.parametrize("text, expected", [
    ("s3://AKIAEXAMPLE:s3cr3t@bucket/x", "s3://***@bucket/x"),
    ("s3://AKIAEXAMPLE:wJalr/XUtnFEMI@bucket/x", "s3://***@bucket/x"),   # a '/' in the secret key
    ("postgresql://me:p@ss@db:5432/sweeps", "postgresql://***@db:5432/sweeps"),  # an unencoded '@'
    ("ftp://user@host/x", "ftp://***@host/x"),
    ("https://h/o?token=tok123", "https://h/o?token=***"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIAEXAMPLE%2F2026"
     "&X-Amz-Signature=deadbeef&x=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***&x=1"),
    ("https://a.blob.core.windows.net/c?sv=2024&sig=deadbeef%3D&se=1",
     "https://a.blob.core.windows.net/c?sv=2024&sig=***&se=1"),
    ("host=db user=me password=s3cr3t dbname=x", "host=db user=me password=*** dbname=x"),
    ("cannot use s3://AKIAEXAMPLE:s3cr3t@b/x or gs://b/y?access_token=tok123, "
     "'postgresql://me:s3cr3t@db/z'",
     "cannot use s3://***@b/x or gs://b/y?access_token=***, 'postgresql://***@db/z'"),
])
def test_secrets_are_starred(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert not any(secret in redact(text) for secret in SECRETS)


@pytest.mark.parametrize("text", [
    "/data/me@work/sweeps/lr=0.1,key=3-abcdef12/DONE",
    "/content/drive/MyDrive/runs/token=4,sig=2-0a1b2c3d",
    "gs://bucket/people/a@b.com/x=1",
    "ftp://host:21/dir@x/y",
    "run lr=0.1-3fa2c1b9 is held by host-a:4242",
    "memory://sweeprun-test/a=b@c",
])
def test_ordinary_paths_are_left_alone(text: str) -> None:
    assert redact(text) == text


def test_store_errors_redact_the_path_and_the_reason() -> None:
    url = "s3://AKIAEXAMPLE:s3cr3t@bucket/x"
    with pytest.raises(StoreError) as info, store_errors("write", url):
        raise PermissionError(errno.EACCES, f"denied for {url}")
    message = str(info.value)
    assert "s3cr3t" not in message and "AKIAEXAMPLE" not in message
    assert message.startswith("cannot write s3://***@bucket/x: Permission denied;")


@pytest.mark.parametrize("url", [
    "s3://AKIAEXAMPLE:s3cr3t@bucket/x",                      # backend not installed
    "ftp://me:s3cr3t@nonexistent.invalid/x",                 # unreachable
    "nosuchproto://me:s3cr3t@host/x?token=tok123",           # unknown protocol
])
def test_open_store_errors_carry_no_credentials(url: str) -> None:
    with pytest.raises(StoreError) as info:
        open_store(url).check_writable()
    message = str(info.value)
    assert "\n" not in message
    assert not any(secret in message for secret in SECRETS), message


def test_a_backend_error_becomes_a_redacted_store_error_and_a_parse_error_stays() -> None:
    with pytest.raises(StoreError, match=r"^cannot read ftp://\*\*\*@h/x: 550 ftp://\*\*\*@h/x: denied;"), \
            store_errors("read", "ftp://me:s3cr3t@h/x"):
        raise ftplib.error_perm("550 ftp://me:s3cr3t@h/x: denied")
    with pytest.raises(json.JSONDecodeError), store_errors("read", "x"):  # callers catch ValueError
        json.loads("{")
