"""PostgreSQL ledger for workers on many machines: row locks with SKIP LOCKED, the server's clock.

Each call locks the rows it needs (``FOR UPDATE``), asks :mod:`~sweeprun.ledger.transitions`
what they become and writes that back, in one transaction that is retried through an outage;
the connections and the schema are :mod:`~sweeprun.ledger.postgres_conn`'s.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..faults import crash_point
from ..identity import RunSpec
from ..procs import HOST, ProcessRef
from ..resumes import Resume
from ..rollbacks import RollbackSummary
from . import transitions as tr
from .base import (
    _ATTEMPT_COLUMNS,
    _UPTIME_SQL,
    MUTABLE_COLUMNS,
    RUN_COLUMNS,
    AttemptRow,
    Claim,
    Ledger,
    Outcome,
    Policy,
    RunRow,
    RunState,
    Uptime,
    Verdict,
    check_lease,
    decode_row,
    grid_key,
    grouped_attempts,
    judge,
    mutable_values,
    with_attempt,
)
from .postgres_conn import HAS_RESET, HEARTBEAT_TIMEOUT_S, SYNC_TIMEOUT_S, PostgresDatabase

if TYPE_CHECKING:
    import psycopg

_R_COLUMNS = ", ".join(f"r.{c}" for c in RUN_COLUMNS)
_SET_MUTABLE = ", ".join(f"{c} = %s" for c in MUTABLE_COLUMNS)

#: The ledger's time in SQL: the injected clock's when there is one, else the server's.
_NOW = "COALESCE(%(now)s::float8, extract(epoch from clock_timestamp())::float8)"


def _like_prefix(text: str) -> str:
    """``text`` as a literal LIKE prefix (a host name may hold ``_``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ":%"


class PostgresLedger(PostgresDatabase, Ledger):
    """A ledger many machines share; many sweeps share one database (tables ``sweeprun_*``).

    The authority every machine shares: no store leases are needed beside it."""

    store_leases = False

    def __init__(self, url: str, sweep: str, *, readonly: bool = False,
                 wait_s: float | None = None, clock: Callable[[], float] | None = None) -> None:
        self.sweep = sweep
        if clock is not None:
            self.clock = clock
        self._local_worker = _like_prefix(HOST)
        super().__init__(url, readonly=readonly, wait_s=wait_s)

    def shared(self) -> tuple[str, str, str]:
        """The id is created once, in ``sweeprun_meta`` (an older sweeprun reads only its schema
        version there); ``where`` is the connection's own host, port and database."""
        self._writable()

        def tx(conn: psycopg.Connection[Any], _retry: bool) -> tuple[str, str, str]:
            conn.execute("INSERT INTO sweeprun_meta (key, value) VALUES ('ledger_id', %s) "
                         "ON CONFLICT (key) DO NOTHING", [uuid.uuid4().hex])
            ident = conn.execute("SELECT value FROM sweeprun_meta WHERE key = 'ledger_id'").fetchone()[0]
            info = conn.info
            return "postgresql", str(ident), f"{info.host}:{info.port}/{info.dbname}"

        return self._run("reading its id", tx)

    # -- time -------------------------------------------------------------------------------

    def _fake_now(self) -> float | None:
        """The injected clock's time, else ``None``: the server's."""
        return self.clock() if self.clock is not None else None

    def _tx_now(self, conn: psycopg.Connection[Any]) -> float:
        fake = self._fake_now()
        if fake is not None:
            return fake
        return conn.execute("SELECT extract(epoch from clock_timestamp())::float8").fetchone()[0]

    def own_now(self) -> float:
        """The server's clock: every machine's leases are judged by the same one."""
        return self._run("reading the database's clock", lambda conn, _: self._tx_now(conn))

    def _key(self, **extra: Any) -> dict[str, Any]:
        return {"sweep": self.sweep, "now": self._fake_now(), **extra}

    # -- reading and writing rows -------------------------------------------------------------

    def _row(self, r: tuple[Any, ...]) -> RunRow:
        return decode_row(r, self.shown, "give --ledger another database: it is rebuilt from "
                          "the store")

    def _locked(self, conn: psycopg.Connection[Any], run_id: str) -> tuple[float, RunRow | None]:
        """The ledger's time and ``run_id``'s row, locked until the transaction ends (one round
        trip: in pipeline mode both queries travel before either answer is read)."""
        fake = self._fake_now()
        clock = None if fake is not None else conn.execute(
            "SELECT extract(epoch from clock_timestamp())::float8")
        found = conn.execute(f"SELECT {_R_COLUMNS} FROM sweeprun_runs r WHERE r.sweep = %s AND "
                             "r.run_id = %s FOR UPDATE", [self.sweep, run_id])
        now = fake if clock is None else clock.fetchone()[0]
        raw = found.fetchone()
        return now, None if raw is None else self._row(raw)

    def _persist(self, conn: psycopg.Connection[Any], change: tr.Change, now: float,
                 token: str | None = None) -> None:
        """Write ``change`` (one transition's result) in the caller's transaction; ``token``:
        the claim's, for a retry to find (see :meth:`claim`)."""
        row = change.row
        conn.execute(f"UPDATE sweeprun_runs SET {_SET_MUTABLE}, claim_token = COALESCE(%s, claim_token) "
                     "WHERE sweep = %s AND run_id = %s",
                     [*mutable_values(row), token, self.sweep, row.run_id])
        if change.closed is not None:
            end = change.closed
            conn.execute("UPDATE sweeprun_attempts SET ended_at = %s, outcome = %s, exit_code = %s, "
                         "result = %s WHERE sweep = %s AND run_id = %s AND attempt = %s "
                         "AND ended_at IS NULL",
                         [now, end.outcome, end.exit_code, end.result.value if end.result else None,
                          self.sweep, row.run_id, end.attempt])
        if change.opened is not None:
            conn.execute(
                "INSERT INTO sweeprun_attempts (sweep, run_id, attempt, worker, started_at) "
                "VALUES (%(sweep)s, %(run)s, %(attempt)s, %(worker)s, %(at)s) "
                "ON CONFLICT (sweep, run_id, attempt) DO UPDATE SET worker = EXCLUDED.worker, "
                "started_at = EXCLUDED.started_at, ran_at = NULL, ended_at = NULL, outcome = NULL, "
                "exit_code = NULL, result = NULL",
                {"sweep": self.sweep, "run": row.run_id, "attempt": change.opened,
                 "worker": row.worker, "at": now})
        if change.dropped is not None:
            conn.execute("DELETE FROM sweeprun_attempts WHERE sweep = %s AND run_id = %s AND "
                         "attempt = %s", [self.sweep, row.run_id, change.dropped])
        if change.moved is not None:
            conn.execute("UPDATE sweeprun_attempts SET attempt = %s WHERE sweep = %s AND "
                         "run_id = %s AND attempt = %s",
                         [change.moved[1], self.sweep, row.run_id, change.moved[0]])

    # -- the contract -------------------------------------------------------------------

    def sync(self, runs: Iterable[RunSpec], done: set[str], started: set[str],
             still_done: Callable[[str], bool] | None = None) -> None:
        self._writable()
        runs = list(runs)
        key = grid_key(runs)
        gone: set[str] | None = None  # None: trust the listing
        if still_done is not None:
            # Ask the store outside the transaction (it may be slow: a bucket, a Drive),
            # only about runs the ledger has as done and the listing lacks. A run that
            # becomes done after this read is not in `gone`, so it is left alone below.
            ledger_done = set(self._run("reading done runs", lambda conn, _: [r[0] for r in conn.execute(
                "SELECT run_id FROM sweeprun_runs WHERE sweep = %s AND state = 'done'",
                [self.sweep])]))
            gone = {run.run_id for run in runs if run.run_id in ledger_done
                    and run.run_id not in done and not still_done(run.run_id)}
        ids = [run.run_id for run in runs]
        # tr.synced decides each run's target from whether its row is done or not (or missing);
        # a whole grid is written set-wise, each statement conditional on that, so a retry (or
        # another launcher syncing at once) converges on the same rows.
        initial = [tr.first_state(r, done, started).value for r in ids]
        targets: dict[tuple[str, RunState], list[str]] = {}
        for run_id in ids:
            for now_state in (RunState.DONE, RunState.PENDING):  # as if done, as if not
                target = tr.synced(now_state, run_id, done, started, gone)
                if target is not None:
                    targets.setdefault((now_state.value, target), []).append(run_id)

        def tx(conn: psycopg.Connection[Any], _retry: bool) -> None:
            with conn.transaction():
                now = self._tx_now(conn)
                conn.execute(
                    "INSERT INTO sweeprun_runs (sweep, run_id, idx, params, state, attempts, failures, "
                    "lost, updated_at) SELECT %(sweep)s, u.run_id, u.idx, u.params, u.state, 0, 0, 0, "
                    "%(now)s FROM unnest(%(ids)s::text[], %(idx)s::int[], %(params)s::text[], "
                    "%(states)s::text[]) AS u(run_id, idx, params, state) "
                    "ORDER BY u.run_id ON CONFLICT (sweep, run_id) DO NOTHING",
                    {"sweep": self.sweep, "now": now, "ids": ids, "idx": [r.index for r in runs],
                     "params": [json.dumps(r.params) for r in runs], "states": initial})
                for (was, target), chosen in sorted(targets.items()):
                    values = tr.synced_columns(target)
                    conn.execute(
                        f"UPDATE sweeprun_runs SET {', '.join(f'{k} = %({k})s' for k in values)}, "
                        "updated_at = %(now)s WHERE sweep = %(sweep)s AND run_id = ANY(%(ids)s::text[]) "
                        f"AND state {'=' if was == 'done' else '<>'} 'done'",
                        {**values, "sweep": self.sweep, "now": now, "ids": sorted(chosen)})
                known = conn.execute("SELECT 1 FROM sweeprun_members WHERE sweep = %s AND grid = %s "
                                     "LIMIT 1", [self.sweep, key]).fetchone()
                if known is None:
                    conn.execute(
                        "INSERT INTO sweeprun_members (sweep, grid, run_id, idx) SELECT %(sweep)s, "
                        "%(grid)s, u.run_id, u.idx FROM unnest(%(ids)s::text[], %(idx)s::int[]) "
                        "AS u(run_id, idx) ON CONFLICT DO NOTHING",
                        {"sweep": self.sweep, "grid": key, "ids": ids, "idx": [r.index for r in runs]})

        self._run("syncing with the store", tx, timeout_s=SYNC_TIMEOUT_S + len(runs) / 1000)

    def forget(self, resets: Mapping[str, str]) -> set[str]:
        self._writable()
        if not resets:
            return set()
        ids = sorted(resets)

        def tx(conn: psycopg.Connection[Any], _retry: bool) -> set[str]:
            with conn.transaction():
                now = self._tx_now(conn)
                # rows locked in one order: two launchers honouring the same resets never deadlock
                found = conn.execute(
                    f"SELECT r.reset, {_R_COLUMNS} FROM sweeprun_runs r WHERE r.sweep = %s "
                    "AND r.run_id = ANY(%s::text[]) ORDER BY r.run_id FOR UPDATE", [self.sweep, ids]
                ).fetchall()
                fresh = set()
                for raw in found:
                    row = self._row(raw[1:])
                    after = tr.forgotten(row, raw[0], resets[row.run_id], now)
                    if after is not None:
                        self._persist(conn, tr.Change(after), now)
                        conn.execute("UPDATE sweeprun_runs SET reset = %s WHERE sweep = %s AND "
                                     "run_id = %s", [resets[row.run_id], self.sweep, row.run_id])
                        fresh.add(row.run_id)
                crash_point("ledger.in_forget")
            return fresh

        return self._run("honouring resets", tx, timeout_s=SYNC_TIMEOUT_S + len(ids) / 1000)

    def honoured(self) -> dict[str, str]:
        if not self._tables:
            return {}

        def read(conn: psycopg.Connection[Any], _retry: bool) -> dict[str, str]:
            if conn.execute(HAS_RESET).fetchone() is None:
                return {}  # a database from before resets were honoured, read-only
            return {r[0]: r[1] for r in conn.execute(
                "SELECT run_id, reset FROM sweeprun_runs WHERE sweep = %s AND reset IS NOT NULL",
                [self.sweep]).fetchall()}

        return self._run("reading the resets honoured", read, timeout_s=SYNC_TIMEOUT_S)

    def claim(self, worker: ProcessRef, policy: Policy, lease_s: float,
              grid: str | None = None, skip: Collection[str] = ()) -> Claim | None:
        check_lease(lease_s)
        self._writable()
        # A claim whose COMMIT went through but whose reply was lost would, retried blindly,
        # leave that run "running" under our name with no one running it (it would look
        # held by a live process of this host until the lease ran out, then count as a lost
        # attempt) and take a second run. So each claim carries a token written with it,
        # and a retry first looks for a run already claimed with that token.
        token = uuid.uuid4().hex

        def tx(conn: psycopg.Connection[Any], retry: bool) -> Claim | None:
            with conn.transaction():
                if retry:
                    found = self._claimed_with(conn, token, worker)
                    if found is not None:
                        return found
                return self._claim(conn, worker, policy, lease_s, grid, token, skip)

        return self._run("claiming a run", tx)

    def _claim(self, conn: psycopg.Connection[Any], worker: ProcessRef, policy: Policy,
               lease_s: float, grid: str | None, token: str,
               skip: Collection[str] = ()) -> Claim | None:
        # Walks sweeprun_runs_claim (the sweep's runs that are not done, interrupted first,
        # then by index), so a claim costs the same at the first run and the ten-thousandth;
        # a join ordered by the grid's own member index had to sort every open run of the
        # grid on every claim. Grid membership is a filter, and within one grid the order is
        # the run's index as first synced (the same unless a grid was edited since).
        # The SQL drops what is surely not runnable (done, exhausted, leased by a worker of
        # another host): only what judge() could never take, which the contract's generated
        # states check. judge() decides the rest, since a holder on this host is checked by
        # its pid and start time. SKIP LOCKED: rows another claim is looking at are passed over.
        # (a scalar subquery, not EXISTS: the planner would turn EXISTS into a join driven
        # by the members table, which walks the done runs too)
        member = ("" if grid is None else
                  "AND (SELECT true FROM sweeprun_members m WHERE m.sweep = r.sweep "
                  "AND m.grid = %(grid)s AND m.run_id = r.run_id) ")
        query = (f"WITH t AS (SELECT {_NOW} AS now) SELECT t.now, {_R_COLUMNS} "
                 "FROM t, sweeprun_runs r WHERE r.sweep = %(sweep)s AND r.state <> 'done' "
                 "AND r.failures < %(max_attempts)s AND COALESCE(r.lost, 0) < %(max_lost)s "
                 "AND NOT (r.state = 'running' AND COALESCE(r.lease_until, 0) > t.now "
                 "AND (r.worker IS NULL OR r.worker NOT LIKE %(local)s)) "
                 f"AND NOT (r.run_id = ANY(%(seen)s::text[])) {member}"
                 "ORDER BY (r.state <> 'interrupted'), r.idx "
                 "LIMIT %(limit)s FOR UPDATE OF r SKIP LOCKED")
        seen: list[str] = list(skip)
        limit = 4  # usually the first row; rows held by live workers of this host come back too
        while True:
            found = conn.execute(query, self._key(
                grid=grid, max_attempts=policy.max_attempts, max_lost=policy.max_lost,
                local=self._local_worker, seen=seen, limit=limit)).fetchall()
            for raw in found:
                now = raw[0]
                row = self._row(raw[1:])
                if judge(row, now, policy) is Verdict.RUNNABLE:
                    change, claim = tr.take(row, worker, now, lease_s)
                    self._persist(conn, change, now, token)
                    crash_point("ledger.in_claim")
                    return claim
                seen.append(row.run_id)
            if len(found) < limit:
                return None
            limit *= 4

    def _claimed_with(self, conn: psycopg.Connection[Any], token: str,
                      worker: ProcessRef) -> Claim | None:
        """The claim an earlier try of this call committed, if it did. (Its orphan, if it
        found one, is not known any more: that needs both a lost reply and a dead holder.)"""
        found = conn.execute(
            f"SELECT {_R_COLUMNS} FROM sweeprun_runs r WHERE r.sweep = %s AND r.claim_token = %s "
            "AND r.state = 'running' AND r.worker = %s", [self.sweep, token, worker.label]).fetchone()
        if found is None:
            return None
        row = self._row(found)
        before = conn.execute("SELECT outcome FROM sweeprun_attempts WHERE sweep = %s AND run_id = %s "
                              "AND attempt = %s", [self.sweep, row.run_id, row.attempts - 1]).fetchone()
        return Claim(run_id=row.run_id, attempt=row.attempts, params=row.params, worker=worker,
                     took_over=before is not None and before[0] == "lost")

    def release(self, claim: Claim) -> bool:
        self._writable()

        def tx(conn: psycopg.Connection[Any], retry: bool) -> bool:
            with conn.transaction():
                now, row = self._locked(conn, claim.run_id)
                change = tr.released(row, claim, now)
                if change is not None:
                    self._persist(conn, change, now)
                return change is not None

        return self._run("giving a claim back", tx)

    def renumber(self, claim: Claim, at_least: int) -> Claim | None:
        if at_least <= claim.attempt:
            return claim
        self._writable()

        def tx(conn: psycopg.Connection[Any], retry: bool) -> bool:
            with conn.transaction():
                now, row = self._locked(conn, claim.run_id)
                change = tr.renumbered(row, claim, at_least, now)
                if change is None:
                    # retried after a commit we did not hear of: the row already says so
                    return retry and row is not None and row.state is RunState.RUNNING and (
                        row.attempts, row.worker, row.worker_start) == (
                        at_least, claim.worker.label, claim.worker.start)
                self._persist(conn, change, now)
                return True

        return with_attempt(claim, at_least) if self._run("renumbering an attempt", tx) else None

    def start(self, claim: Claim, lease_s: float, progress: str | None,
              policy: Policy) -> RunState | None:
        check_lease(lease_s)
        self._writable()

        def tx(conn: psycopg.Connection[Any], retry: bool) -> RunState | None:
            with conn.transaction():
                now, row = self._locked(conn, claim.run_id)
                if row is None or row.attempts != claim.attempt:
                    return None
                if retry:
                    # An earlier try may have committed: counting the loss again would be wrong.
                    mark = conn.execute(
                        "SELECT ran_at, outcome FROM sweeprun_attempts WHERE sweep = %s AND "
                        "run_id = %s AND attempt = %s",
                        [self.sweep, claim.run_id, claim.attempt]).fetchone()
                    if mark is not None and mark[1] == "lost-limit" and row.state is RunState.FAILED:
                        return RunState.FAILED
                    if mark is not None and mark[0] is not None and row.state is RunState.RUNNING:
                        renewal = tr.renewed(row, claim, now, lease_s)
                        assert renewal is not None
                        self._persist(conn, tr.Change(replace(renewal.row, updated_at=now)), now)
                        return RunState.RUNNING
                found = tr.started(row, claim, now, lease_s, progress, policy)
                if found is None:
                    return None
                change, state = found
                self._persist(conn, change, now)
                if state is RunState.RUNNING:
                    conn.execute("UPDATE sweeprun_attempts SET ran_at = %s WHERE sweep = %s AND "
                                 "run_id = %s AND attempt = %s",
                                 [now, self.sweep, claim.run_id, claim.attempt])
                return state

        return self._run("starting a run", tx)

    def heartbeat(self, claim: Claim, lease_s: float, child: ProcessRef | None = None) -> bool:
        self._writable()

        def tx(conn: psycopg.Connection[Any], _retry: bool) -> bool:
            with conn.transaction():
                now, row = self._locked(conn, claim.run_id)
                change = tr.renewed(row, claim, now, lease_s, child)
                if change is not None:
                    self._persist(conn, change, now)
                crash_point("ledger.in_heartbeat")
                return change is not None

        # One reconnect, no long wait: the runner counts the silence by its own clock and
        # stops its children before the lease can run out.
        return self._run("renewing a lease", tx, tries=1,
                         timeout_s=min(HEARTBEAT_TIMEOUT_S, self.call_timeout_s))

    def finish(self, claim: Claim, outcome: Outcome, policy: Policy,
               exit_code: int | None = None, resumed: Resume | None = None,
               rollbacks: RollbackSummary | None = None, ooms: int = 0) -> RunState | None:
        self._writable()

        def tx(conn: psycopg.Connection[Any], retry: bool) -> RunState | None:
            with conn.transaction():
                now, row = self._locked(conn, claim.run_id)
                if row is None:
                    return None
                if retry:
                    # The earlier try committed and only its reply was lost: answer what it
                    # recorded instead of recording a second outcome (or reporting a lost lease).
                    mark = conn.execute(
                        "SELECT outcome, result FROM sweeprun_attempts WHERE sweep = %s AND "
                        "run_id = %s AND attempt = %s",
                        [self.sweep, claim.run_id, claim.attempt]).fetchone()
                    if mark is not None and mark[0] == outcome.value and mark[1] is not None:
                        return RunState(mark[1])
                found = tr.finished(row, claim, outcome, policy, exit_code, now, resumed, rollbacks, ooms)
                if found is None:
                    return None
                self._persist(conn, found[0], now)
                return found[1]

        return self._run("recording how a run ended", tx)

    def uptime(self) -> Uptime:
        if not self._tables:
            return Uptime(0.0, 0)
        query = _UPTIME_SQL.replace("FROM attempts", "FROM sweeprun_attempts")
        found = self._run("reading the attempts", lambda conn, _: conn.execute(
            query, [self._fake_now() or self._tx_now(conn), self.sweep]).fetchone(), timeout_s=SYNC_TIMEOUT_S)
        return Uptime(float(found[0] or 0.0), int(found[1] or 0))

    def attempts(self, run_id: str) -> list[AttemptRow]:
        if not self._tables:
            return []
        query = (f"SELECT {_ATTEMPT_COLUMNS} FROM sweeprun_attempts WHERE sweep = %s AND run_id = %s "
                 "ORDER BY attempt")
        found = self._run("reading the attempts", lambda conn, _: conn.execute(
            query, [self.sweep, run_id]).fetchall())
        return [AttemptRow(*r) for r in found]

    def every_attempt(self) -> dict[str, list[AttemptRow]]:
        if not self._tables:
            return {}
        query = (f"SELECT run_id, {_ATTEMPT_COLUMNS} FROM sweeprun_attempts WHERE sweep = %s "
                 "ORDER BY run_id, attempt")
        return grouped_attempts(self._run("reading the attempts", lambda conn, _: conn.execute(
            query, [self.sweep]).fetchall()))

    def rows(self, grid: str | None = None, *, params: bool = True) -> list[RunRow]:
        if not self._tables:
            return []
        columns = _R_COLUMNS if params else _R_COLUMNS.replace("r.params", "'{}'::text")
        for added in ("resumed", "rollbacks"):
            if added not in self.has_columns:  # an older sweeprun's database, read-only (status)
                columns = columns.replace(f"r.{added}", "NULL::text")
        if grid is None:
            query = (f"SELECT {columns} FROM sweeprun_runs r WHERE r.sweep = %s "
                     "ORDER BY r.idx, r.run_id")
            args = [self.sweep]
        else:
            query = (f"SELECT {columns} FROM sweeprun_members m JOIN sweeprun_runs r "
                     "ON r.sweep = m.sweep AND r.run_id = m.run_id "
                     "WHERE m.sweep = %s AND m.grid = %s ORDER BY m.idx")
            args = [self.sweep, grid]
        found = self._run("reading the runs", lambda conn, _: conn.execute(query, args).fetchall(),
                          timeout_s=SYNC_TIMEOUT_S)
        return [self._row(r) for r in found]
