"""Spot and preemptible VMs' termination notices: the worker asks the provider's metadata
server, and on a notice its runs save at once and it drains, before the provider's SIGTERM
(or none at all: a reclaimed VM may simply stop).

What each provider answers (their documented endpoints; a worker on another provider, or
behind a proxy, gives its own URL as ``--notice PROVIDER=URL``):

- ``aws``: ``/latest/meta-data/spot/instance-action`` is 404 until the two-minute warning,
  then a JSON ``{"action": "terminate"|"stop"|"hibernate", "time": ...}``. IMDSv2 first (a
  session token from ``PUT /latest/api/token``), IMDSv1 where the token is refused.
- ``gcp``: ``/computeMetadata/v1/instance/preempted`` (header ``Metadata-Flavor: Google``)
  says ``TRUE`` once the VM is being preempted (about 30 s before it stops).
- ``azure``: Scheduled Events, ``/metadata/scheduledevents?api-version=2020-07-01`` (header
  ``Metadata: true``), lists a ``Preempt`` event (30 s ahead) among others.

Only the loopback fake of each answer is tested here: no cloud metadata server can be
reached from these machines (tests/fleet/test_notices.py says so).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from .errors import SpecError

__all__ = ["Notice", "PROVIDERS", "parse_notice"]

#: The documented metadata endpoints, by provider.
PROVIDERS: dict[str, str] = {
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
    "gcp": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
    "azure": "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01",
}
#: How often the worker asks (seconds): the shortest notice is 30 s, and the runs must save in it.
POLL_S = 0.5
_TIMEOUT_S = 2.0
_TOKEN_TTL_S = 21_600


class Notice:
    """One provider's notice endpoint, asked by :meth:`check`."""

    def __init__(self, provider: str, url: str) -> None:
        self.provider, self.url = provider, url
        #: Whether the last ask got an answer (a 404 is one): a worker says once when not.
        self.answered = False
        self._token: tuple[str, float] | None = None   # AWS IMDSv2: (token, monotonic expiry)

    def __repr__(self) -> str:
        return f"Notice({self.provider!r}, {self.url!r})"

    def check(self) -> str | None:
        """The notice, in words, when one is posted; ``None`` when none is, or the server does
        not answer (a metadata server that fails for a moment must not drain a worker, and a
        watcher that dies of an odd answer would never see the real one)."""
        try:
            found = getattr(self, f"_{self.provider}")()
        except Exception:  # noqa: BLE001 - any failure to ask is "no notice now"
            self.answered = False
            return None
        self.answered = True
        return found

    def _get(self, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url, headers=headers)
        try:
            with _OPENER.open(request, timeout=_TIMEOUT_S) as response:
                return response.status, response.read(64 * 1024)
        except urllib.error.HTTPError as exc:
            return exc.code, b""

    def _aws_token(self) -> str | None:
        """An IMDSv2 session token, kept for most of its life (six hours asked); ``None`` where
        the token is refused or does not come (IMDSv1, or a container past the hop limit)."""
        now = time.monotonic()
        if self._token is not None and now < self._token[1]:
            return self._token[0]
        token_url = self.url.split("/latest/", 1)[0] + "/latest/api/token"
        put = urllib.request.Request(token_url, method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": str(_TOKEN_TTL_S)})
        try:
            with _OPENER.open(put, timeout=_TIMEOUT_S) as response:
                token = response.read(4096).decode()
        except Exception:  # noqa: BLE001 - IMDSv1: ask without a token
            return None
        self._token = (token, now + _TOKEN_TTL_S / 2)
        return token

    def _aws(self) -> str | None:
        token = self._aws_token()
        status, body = self._get({"X-aws-ec2-metadata-token": token} if token else {})
        if status == 401 and token:
            self._token = None  # expired early: a new one next time
        if status != 200:
            return None
        found: Any = json.loads(body or b"{}")
        action = found.get("action") if isinstance(found, dict) else None
        return f"AWS spot instance-action: {action} at {found.get('time')}" if action else None

    def _gcp(self) -> str | None:
        status, body = self._get({"Metadata-Flavor": "Google"})
        if status == 200 and body.strip().upper() == b"TRUE":
            return "GCP: the instance is being preempted"
        return None

    def _azure(self) -> str | None:
        status, body = self._get({"Metadata": "true"})
        if status != 200:
            return None
        found: Any = json.loads(body or b"{}")
        events = found.get("Events") if isinstance(found, dict) else None
        for event in events if isinstance(events, list) else []:
            if isinstance(event, dict) and event.get("EventType") in ("Preempt", "Terminate"):
                return f"Azure scheduled event: {event.get('EventType')} at {event.get('NotBefore')}"
        return None


#: No proxy for metadata servers: a proxy from the environment would answer for them.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def parse_notice(value: str) -> Notice:
    """``--notice aws``, ``--notice gcp=http://127.0.0.1:8080/preempted``: a provider, and
    optionally the URL to ask instead of its documented endpoint."""
    provider, _, url = value.partition("=")
    provider = provider.strip().lower()
    if provider not in PROVIDERS:
        raise SpecError(f"--notice {value!r}: the provider is one of {', '.join(PROVIDERS)}, "
                        "optionally with =URL (its metadata endpoint)")
    url = url.strip() or PROVIDERS[provider]
    if not url.startswith(("http://", "https://")):
        raise SpecError(f"--notice {value!r}: the URL must start with http:// or https://")
    return Notice(provider, url)
