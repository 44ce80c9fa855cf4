"""The ledger contract on a real PostgreSQL server, plus what only a shared server can get wrong."""

from __future__ import annotations

import pytest

from sweeprun.ledger.contract import LedgerContract


class TestPostgresLedger(LedgerContract):
    @pytest.fixture
    def location(self, postgres_url: str) -> str:
        return postgres_url
