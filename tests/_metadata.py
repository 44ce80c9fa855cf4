"""A fake cloud metadata server on loopback, for ``--notice`` (tests/fleet/test_notices.py,
benchmarks/notice_latency.py): no provider's real one can be reached from these machines."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Metadata:
    """A fake metadata server: no notice until :meth:`post`, then the provider's answer."""

    def __init__(self) -> None:
        self.notice: tuple[int, bytes] | None = None
        self.tokens = 0
        self.headers: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # AWS IMDSv2: a session token
                outer.tokens += 1
                self._answer(200, b"token-123")

            def do_GET(self) -> None:
                outer.headers.append(dict(self.headers))
                self._answer(*(outer.notice or (404, b"")))

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def post(self, body: Any, status: int = 200) -> None:
        self.notice = (status, body if isinstance(body, bytes) else json.dumps(body).encode())

    def close(self) -> None:
        self.server.shutdown()
