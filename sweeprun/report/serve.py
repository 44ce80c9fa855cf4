"""``sweeprun ui``: the report's page, live, on loopback.

The standard library's threading HTTP server is enough for what this serves (one page and
its data, read-only, to one person's browser), so no web framework is installed for it.
Two paths answer: ``/`` (the page, which asks for ``/data.json`` a few seconds after each
answer and redraws) and ``/data.json`` (read again from the store and the ledger when the
last read is old enough, so many tabs do not multiply the reads). Anything else is 404,
anything but GET and HEAD 405, a request naming another host 403 (on loopback); nothing is
ever written; the store's URL is shown redacted.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..redact import redact
from .page import REFRESH_MS, plotly_js, render


class _Data:
    """The newest data, read at most once per ``min_age_s`` whoever asks, and never more often
    than every other moment: a read that takes 5 s (10,000 runs) waits 10 s before the next,
    so the server is not reading the store without pause."""

    def __init__(self, read: Callable[[], dict[str, Any]], min_age_s: float) -> None:
        self._read, self._min_age_s = read, min_age_s
        self._lock = threading.Lock()
        self._at, self._took, self._blob = -float("inf"), 0.0, b""

    def get(self) -> bytes:
        with self._lock:
            if time.monotonic() - self._at >= max(self._min_age_s, 2 * self._took):
                started = time.monotonic()
                self._blob = json.dumps(self._read(), allow_nan=False, separators=(",", ":")).encode()
                self._at = time.monotonic()
                self._took = self._at - started
            return self._blob


LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def make_server(read: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0,
                refresh_ms: int = REFRESH_MS) -> ThreadingHTTPServer:
    """A server (not yet serving) for the sweep that ``read`` collects
    (:func:`sweeprun.report.data.collect`); port 0 picks a free one (``server.server_port``)."""
    data = _Data(read, min_age_s=refresh_ms / 2000)
    plotly = plotly_js()
    pages: dict[str, bytes] = {}
    pages_lock = threading.Lock()

    def page() -> bytes:
        with pages_lock:  # the page is drawn once, with the data of the first visit
            if "page" not in pages:
                pages["page"] = render(json.loads(data.get()), live=True, refresh_ms=refresh_ms,
                                       plotly=plotly).encode()
            return pages["page"]

    class Handler(BaseHTTPRequestHandler):
        server_version = "sweeprun"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            self._answer(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(head=True)

        def _answer(self, head: bool) -> None:
            # On loopback, only a page of this address may ask: another site's page in the same
            # browser, through a DNS name bound to 127.0.0.1, names its own host (DNS rebinding).
            if host in LOOPBACK and self.headers.get("Host") not in allowed:
                self.send_error(HTTPStatus.FORBIDDEN, explain="unexpected Host header")
                return
            path = self.path.split("?", 1)[0]
            try:
                if path in ("/", "/index.html"):
                    body, kind = page(), "text/html; charset=utf-8"
                elif path == "/data.json":
                    body, kind = data.get(), "application/json"
                else:
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
            except Exception as exc:  # the store or ledger cannot be read now: say so, keep serving
                self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, explain=redact(str(exc))[:300])
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _refuse(self) -> None:
            self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815 - read-only

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = type("Server", (ThreadingHTTPServer,), {"address_family": family})((host, port), Handler)
    server.daemon_threads = True
    bound = server.server_port
    allowed = {f"{name}:{bound}" for name in ("127.0.0.1", "localhost", "[::1]")}
    return server
