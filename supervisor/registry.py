"""The supervisor's state in a SQLite file: services, their instances and the event timeline.

The supervisor owns one connection, and only one dedicated worker thread uses it, so no
call blocks the event loop. The file is in WAL mode, so the CLI can read it through
`read_snapshot` while the supervisor writes. `Registry` needs an asyncio event loop
(uvloop included) because it awaits the worker thread through `asyncio.wrap_future`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar, get_args

import anyio
import orjson

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_S",
    "DEFAULT_MAX_EVENTS",
    "REGISTRY_FILE_NAME",
    "SCHEMA_VERSION",
    "EventRecord",
    "InstanceRecord",
    "InvalidRecordError",
    "NewEvent",
    "Registry",
    "RegistryCorruptError",
    "RegistryError",
    "RegistryNotFoundError",
    "RouteInfo",
    "RouteKind",
    "ServiceNotFoundError",
    "ServiceRecord",
    "Snapshot",
    "read_snapshot",
    "registry_path",
]

REGISTRY_FILE_NAME: Final = "registry.sqlite3"
SCHEMA_VERSION: Final = 1
DEFAULT_MAX_EVENTS: Final = 10_000
DEFAULT_BUSY_TIMEOUT_S: Final = 5.0
DEFAULT_SNAPSHOT_EVENTS: Final = 100

_SCHEMA_VERSION_KEY: Final = "schema_version"
_CORRUPT_ERROR_NAMES: Final = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})

RouteKind = Literal["route", "event"]
_ROUTE_KINDS: Final = frozenset(get_args(RouteKind))

_T = TypeVar("_T")


class RegistryError(Exception):
    """Base class of the errors that the registry raises."""


class RegistryNotFoundError(RegistryError):
    """The registry file does not exist."""


class RegistryCorruptError(RegistryError):
    """The file is not a readable mrq registry."""


class InvalidRecordError(RegistryError, ValueError):
    """A record passed to the registry has an invalid value."""


class ServiceNotFoundError(RegistryError, LookupError):
    """The registry has no service of the requested name."""


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """A route or event subscription that a worker announced for a service."""

    service: str
    route: str
    queue: str
    kind: RouteKind

    def __post_init__(self) -> None:
        if self.kind not in _ROUTE_KINDS:
            raise InvalidRecordError(
                f"invalid kind {self.kind!r} for route {self.route!r} of service "
                f"{self.service!r}: expected 'route' or 'event'"
            )


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """A configured service, its replica count and the routes its workers announced.

    `fingerprint` identifies the service's configuration, so the supervisor can detect a
    configuration change. `updated_at` is UNIX time in seconds.
    """

    name: str
    kind: str
    target: str
    fingerprint: str
    replicas: int
    routes: list[RouteInfo]
    updated_at: float


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One running or stopped instance of a service.

    `index` is the instance number, 0 to replicas - 1. `pid` together with `start_time`
    (the process creation time as psutil reports it) identifies the process, so a reused
    pid is not mistaken for it. All times are UNIX time in seconds, or None when unknown.
    """

    service: str
    index: int
    pid: int | None
    start_time: float | None
    state: str
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_signal: int | None = None
    last_exit_reason: str | None = None
    last_exit_at: float | None = None
    started_at: float | None = None
    ready_at: float | None = None
    log_path: Path | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to add to the timeline, without the id that the registry assigns."""

    time: float
    node: str
    kind: str
    service: str | None = None
    instance: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An event of the timeline. Ids grow with every event and are never reused."""

    id: int
    time: float
    node: str
    kind: str
    service: str | None
    instance: int | None
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The registry's contents at one moment, as `read_snapshot` returns them."""

    services: list[ServiceRecord]
    instances: list[InstanceRecord]
    events: list[EventRecord]


def registry_path(state_dir: Path) -> Path:
    """Return the path of the registry file in a state folder."""
    return state_dir / REGISTRY_FILE_NAME


# Each migration step takes the schema from version N - 1 to N inside one transaction.
# Version 0 is an empty file.
_SCHEMA_V1: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    """CREATE TABLE services (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        replicas INTEGER NOT NULL,
        routes TEXT NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE instances (
        service TEXT NOT NULL,
        instance INTEGER NOT NULL,
        pid INTEGER,
        start_time REAL,
        state TEXT NOT NULL,
        restarts INTEGER NOT NULL,
        last_exit_code INTEGER,
        last_exit_signal INTEGER,
        last_exit_reason TEXT,
        last_exit_at REAL,
        started_at REAL,
        ready_at REAL,
        log_path TEXT,
        PRIMARY KEY (service, instance)
    ) WITHOUT ROWID""",
    # AUTOINCREMENT never reuses an id, not even that of a deleted newest row, so a reader
    # that polls with since_id never receives an id twice.
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        node TEXT NOT NULL,
        kind TEXT NOT NULL,
        service TEXT,
        instance INTEGER,
        data TEXT NOT NULL
    )""",
    "CREATE INDEX events_by_service ON events (service, id)",
)


def _migrate_to_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


_MIGRATIONS: Final[dict[int, Callable[[sqlite3.Connection], None]]] = {1: _migrate_to_v1}

_SERVICE_COLUMNS: Final = "name, kind, target, fingerprint, replicas, routes, updated_at"
_INSTANCE_COLUMNS: Final = (
    "service, instance, pid, start_time, state, restarts, last_exit_code, last_exit_signal, "
    "last_exit_reason, last_exit_at, started_at, ready_at, log_path"
)
_EVENT_COLUMNS: Final = "id, time, node, kind, service, instance, data"


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # The connection runs in autocommit mode (isolation_level=None), so transactions are
    # explicit. IMMEDIATE takes the write lock at the start instead of at the first write.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        # SQLite rolls back by itself after some errors, such as a full disk.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _corrupt_message(path: Path, detail: str) -> str:
    return (
        f"registry file {path} is corrupt or not an mrq registry: {detail}. Delete it "
        f"together with its -wal and -shm files, and the supervisor creates a new one at "
        f"its next start (instances left running from before are then not adopted)"
    )


def _wrap_sqlite_error(path: Path, action: str, exc: sqlite3.Error) -> RegistryError:
    error_name = getattr(exc, "sqlite_errorname", None)
    if error_name in _CORRUPT_ERROR_NAMES:
        return RegistryCorruptError(_corrupt_message(path, str(exc)))
    if error_name == "SQLITE_READONLY_DIRECTORY":
        return RegistryError(
            f"registry {action} failed on {path}: {exc}. While the supervisor is stopped, "
            f"reading needs write access to {path.parent} so that SQLite can create its "
            f"-shm file: run as the supervisor's user, or read while the supervisor runs"
        )
    return RegistryError(
        f"registry {action} failed on {path}: {exc}. Check that the file and its folder "
        f"are writable and the disk is not full"
    )


def _read_schema_version(conn: sqlite3.Connection, path: Path) -> int:
    """Return the schema version of an open registry, 0 for an empty file."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "meta" not in tables:
        if tables:
            found = ", ".join(sorted(tables))
            raise RegistryCorruptError(_corrupt_message(path, f"found tables {found}"))
        return 0

    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_SCHEMA_VERSION_KEY,)).fetchone()
    try:
        version = int(row[0])
    except (TypeError, ValueError):
        found = "no value" if row is None else repr(row[0])
        detail = f"expected an integer {_SCHEMA_VERSION_KEY} in table meta, found {found}"
        raise RegistryCorruptError(_corrupt_message(path, detail)) from None

    if version > SCHEMA_VERSION:
        raise RegistryError(
            f"registry file {path} has schema version {version}, but this mrq supports up "
            f"to version {SCHEMA_VERSION}: upgrade mrq, or delete the file to start afresh"
        )
    return version


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    with _transaction(conn):
        version = _read_schema_version(conn, path)
        if version == SCHEMA_VERSION:
            return
        for target in range(version + 1, SCHEMA_VERSION + 1):
            _MIGRATIONS[target](conn)
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (_SCHEMA_VERSION_KEY, str(SCHEMA_VERSION)),
        )


def _encode_json(value: object, subject: str) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:
        raise InvalidRecordError(f"{subject} is not JSON-serializable: {exc}") from exc


def _decode_json(raw: str, path: Path, subject: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RegistryCorruptError(_corrupt_message(path, f"invalid JSON in {subject}")) from exc


def _encode_routes(routes: list[RouteInfo]) -> str:
    items = [{"service": r.service, "route": r.route, "queue": r.queue, "kind": r.kind} for r in routes]
    return _encode_json(items, "routes")


def _decode_routes(raw: str, path: Path, service: str) -> list[RouteInfo]:
    items = _decode_json(raw, path, f"routes of service {service!r}")
    try:
        return [RouteInfo(**item) for item in items]
    except (TypeError, InvalidRecordError) as exc:
        detail = f"invalid routes of service {service!r}: {exc}"
        raise RegistryCorruptError(_corrupt_message(path, detail)) from exc


def _select_services(conn: sqlite3.Connection, path: Path) -> list[ServiceRecord]:
    rows = conn.execute(f"SELECT {_SERVICE_COLUMNS} FROM services ORDER BY name")
    return [
        ServiceRecord(
            name=name,
            kind=kind,
            target=target,
            fingerprint=fingerprint,
            replicas=replicas,
            routes=_decode_routes(routes, path, name),
            updated_at=updated_at,
        )
        for name, kind, target, fingerprint, replicas, routes, updated_at in rows
    ]


def _select_instances(conn: sqlite3.Connection, service: str | None) -> list[InstanceRecord]:
    if service is None:
        sql = f"SELECT {_INSTANCE_COLUMNS} FROM instances ORDER BY service, instance"
        rows = conn.execute(sql)
    else:
        sql = f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE service = ? ORDER BY instance"
        rows = conn.execute(sql, (service,))
    return [_instance_from_row(row) for row in rows]


def _instance_from_row(row: tuple[Any, ...]) -> InstanceRecord:
    (
        service,
        index,
        pid,
        start_time,
        state,
        restarts,
        last_exit_code,
        last_exit_signal,
        last_exit_reason,
        last_exit_at,
        started_at,
        ready_at,
        log_path,
    ) = row
    return InstanceRecord(
        service=service,
        index=index,
        pid=pid,
        start_time=start_time,
        state=state,
        restarts=restarts,
        last_exit_code=last_exit_code,
        last_exit_signal=last_exit_signal,
        last_exit_reason=last_exit_reason,
        last_exit_at=last_exit_at,
        started_at=started_at,
        ready_at=ready_at,
        log_path=None if log_path is None else Path(log_path),
    )


def _select_events(
    conn: sqlite3.Connection,
    path: Path,
    *,
    limit: int,
    service: str | None,
    since_id: int | None,
) -> list[EventRecord]:
    conditions: list[str] = []
    params: list[object] = []
    if service is not None:
        conditions.append("service = ?")
        params.append(service)
    if since_id is not None:
        conditions.append("id > ?")
        params.append(since_id)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""

    # With since_id the oldest newer events come first, so paging forward skips none.
    order = "ASC" if since_id is not None else "DESC"
    sql = f"SELECT {_EVENT_COLUMNS} FROM events {where} ORDER BY id {order} LIMIT ?"
    rows = conn.execute(sql, (*params, limit)).fetchall()
    if since_id is None:
        rows.reverse()
    return [
        EventRecord(event_id, time_s, node, kind, svc, inst, _decode_json(data, path, f"event {event_id}"))
        for event_id, time_s, node, kind, svc, inst, data in rows
    ]


class _Store:
    """The registry's synchronous operations on one connection, run on the worker thread."""

    def __init__(self, conn: sqlite3.Connection, path: Path, max_events: int) -> None:
        self._conn = conn
        self._path = path
        self._max_events = max_events

    @classmethod
    def connect(cls, path: Path, max_events: int, busy_timeout_s: float) -> _Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The timeout bounds how long a statement waits for a lock held by another process.
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
        try:
            _enable_wal(conn, path)
            conn.execute("PRAGMA synchronous=NORMAL")
            _migrate(conn, path)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path, max_events)

    def close(self) -> None:
        try:
            self._conn.execute("PRAGMA optimize")
        finally:
            self._conn.close()

    def upsert_service(self, rec: ServiceRecord) -> None:
        _check_service(rec)
        self._conn.execute(
            f"INSERT INTO services ({_SERVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, target = excluded.target, "
            "fingerprint = excluded.fingerprint, replicas = excluded.replicas, "
            "routes = excluded.routes, updated_at = excluded.updated_at",
            (
                rec.name,
                rec.kind,
                rec.target,
                rec.fingerprint,
                rec.replicas,
                _encode_routes(rec.routes),
                rec.updated_at,
            ),
        )

    def set_routes(self, service: str, routes: list[RouteInfo]) -> None:
        _check_routes(service, routes)
        cursor = self._conn.execute(
            "UPDATE services SET routes = ?, updated_at = ? WHERE name = ?",
            (_encode_routes(routes), time.time(), service),
        )
        if cursor.rowcount == 0:
            raise ServiceNotFoundError(
                f"cannot set routes: service {service!r} not found in registry {self._path}. "
                f"Call upsert_service first"
            )

    def services(self) -> list[ServiceRecord]:
        return _select_services(self._conn, self._path)

    def remove_service(self, name: str) -> bool:
        with _transaction(self._conn):
            self._conn.execute("DELETE FROM instances WHERE service = ?", (name,))
            cursor = self._conn.execute("DELETE FROM services WHERE name = ?", (name,))
        return cursor.rowcount > 0

    def put_instance(self, rec: InstanceRecord) -> None:
        if rec.index < 0:
            raise InvalidRecordError(
                f"invalid index {rec.index} for an instance of service {rec.service!r}: expected 0 or more"
            )
        log_path = None if rec.log_path is None else str(rec.log_path)
        self._conn.execute(
            f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.service,
                rec.index,
                rec.pid,
                rec.start_time,
                rec.state,
                rec.restarts,
                rec.last_exit_code,
                rec.last_exit_signal,
                rec.last_exit_reason,
                rec.last_exit_at,
                rec.started_at,
                rec.ready_at,
                log_path,
            ),
        )

    def instances(self, service: str | None) -> list[InstanceRecord]:
        return _select_instances(self._conn, service)

    def remove_instance(self, service: str, index: int) -> bool:
        cursor = self._conn.execute(
            "DELETE FROM instances WHERE service = ? AND instance = ?", (service, index)
        )
        return cursor.rowcount > 0

    def add_event(self, event: NewEvent) -> int:
        data = _encode_json(event.data, f"data of event {event.kind!r}")
        with _transaction(self._conn):
            (event_id,) = self._conn.execute(
                "INSERT INTO events (time, node, kind, service, instance, data) "
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (event.time, event.node, event.kind, event.service, event.instance, data),
            ).fetchone()
            # Ids only grow, so a range delete on the primary key keeps at most
            # max_events rows. It usually removes one row or none.
            self._conn.execute("DELETE FROM events WHERE id <= ?", (event_id - self._max_events,))
        return int(event_id)

    def events(self, limit: int, service: str | None, since_id: int | None) -> list[EventRecord]:
        return _select_events(self._conn, self._path, limit=limit, service=service, since_id=since_id)

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        if key == _SCHEMA_VERSION_KEY:
            raise InvalidRecordError(
                f"meta key {key!r} is reserved for the registry's own schema version. Choose another key"
            )
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _enable_wal(conn: sqlite3.Connection, path: Path) -> None:
    (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if str(mode).lower() != "wal":
        raise RegistryError(
            f"registry {path} could not switch to WAL journal mode, found mode {mode!r}: "
            f"put the state folder on a local filesystem"
        )


def _check_routes(service: str, routes: list[RouteInfo]) -> None:
    # The module of one supervised service may define several SDK services, so a
    # route's own service name may differ from `service`; only the kind is checked.
    for route in routes:
        if route.kind not in ("route", "event"):
            raise InvalidRecordError(f"route {route.route!r} of {service!r} has unknown kind {route.kind!r}")


def _check_service(rec: ServiceRecord) -> None:
    if rec.replicas < 0:
        raise InvalidRecordError(
            f"invalid replicas {rec.replicas} for service {rec.name!r}: expected 0 or more"
        )
    _check_routes(rec.name, rec.routes)


def _close_if_connected(connecting: Future[_Store]) -> None:
    # Runs on the worker thread after the connect job, so `connecting` is already done.
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().close()


class Registry:
    """The supervisor's read-write access to its registry file.

    Every call runs on one dedicated worker thread, in the order of the calls. A call whose
    caller is cancelled still completes if the thread has already started it. Lock waits
    are bounded by busy_timeout_s. SQLite errors are raised as RegistryError.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        if max_events < 1:
            raise ValueError(f"invalid max_events {max_events}: expected 1 or more")
        if busy_timeout_s <= 0:
            raise ValueError(f"invalid busy_timeout_s {busy_timeout_s}: expected more than 0")
        self._path = path
        self._max_events = max_events
        self._busy_timeout_s = busy_timeout_s
        self._executor: ThreadPoolExecutor | None = None
        self._store: _Store | None = None

    @property
    def path(self) -> Path:
        return self._path

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the file, creating it and its folder if missing, and migrate its schema."""
        if self._executor is not None:
            raise RegistryError(f"registry {self._path} is already open")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrq-registry")
        connecting = executor.submit(_Store.connect, self._path, self._max_events, self._busy_timeout_s)
        try:
            store = await asyncio.wrap_future(connecting)
        except BaseException as exc:
            executor.submit(_close_if_connected, connecting)
            executor.shutdown(wait=False)
            if isinstance(exc, sqlite3.Error):
                raise _wrap_sqlite_error(self._path, "open", exc) from exc
            raise
        self._executor = executor
        self._store = store

    async def close(self) -> None:
        """Close the file after the calls already queued. Does nothing if not open."""
        executor, store = self._executor, self._store
        if executor is None or store is None:
            return
        self._executor = None
        self._store = None
        closing = executor.submit(store.close)
        executor.shutdown(wait=False)
        with anyio.CancelScope(shield=True):
            await self._wait(closing, "close")

    async def upsert_service(self, rec: ServiceRecord) -> None:
        """Insert the service, or replace the stored one of the same name."""
        await self._call("upsert_service", lambda store: store.upsert_service(rec))

    async def set_routes(self, service: str, routes: list[RouteInfo]) -> None:
        """Replace the routes of a stored service, or raise ServiceNotFoundError if missing."""
        await self._call("set_routes", lambda store: store.set_routes(service, routes))

    async def services(self) -> list[ServiceRecord]:
        """Return all services, sorted by name."""
        return await self._call("services", lambda store: store.services())

    async def remove_service(self, name: str) -> bool:
        """Delete a service and its instances, and return whether the service existed."""
        return await self._call("remove_service", lambda store: store.remove_service(name))

    async def put_instance(self, rec: InstanceRecord) -> None:
        """Insert the instance, or replace the stored one of the same service and index."""
        await self._call("put_instance", lambda store: store.put_instance(rec))

    async def instances(self, service: str | None = None) -> list[InstanceRecord]:
        """Return the instances of one service or of all, sorted by service and index."""
        return await self._call("instances", lambda store: store.instances(service))

    async def remove_instance(self, service: str, index: int) -> bool:
        """Delete one instance, and return whether it existed."""
        return await self._call("remove_instance", lambda store: store.remove_instance(service, index))

    async def add_event(self, event: NewEvent) -> int:
        """Append an event, drop the oldest beyond max_events, and return the new id."""
        return await self._call("add_event", lambda store: store.add_event(event))

    async def events(
        self, *, limit: int = 100, service: str | None = None, since_id: int | None = None
    ) -> list[EventRecord]:
        """Return up to `limit` events, oldest first.

        Without since_id these are the newest events. With since_id they are the oldest
        events whose id is greater, so repeated calls with the last id seen page forward.
        """
        if limit < 0:
            raise ValueError(f"invalid limit {limit}: expected 0 or more")
        return await self._call("events", lambda store: store.events(limit, service, since_id))

    async def get_meta(self, key: str) -> str | None:
        """Return the value stored under a meta key, or None."""
        return await self._call("get_meta", lambda store: store.get_meta(key))

    async def set_meta(self, key: str, value: str) -> None:
        """Store a value under a meta key other than the reserved `schema_version`."""
        await self._call("set_meta", lambda store: store.set_meta(key, value))

    async def _call(self, action: str, operation: Callable[[_Store], _T]) -> _T:
        executor, store = self._executor, self._store
        if executor is None or store is None:
            raise RegistryError(
                f"registry {self._path} is not open: call `await registry.open()` "
                f"or use `async with Registry(path)` before {action}"
            )
        return await self._wait(executor.submit(operation, store), action)

    async def _wait(self, job: Future[_T], action: str) -> _T:
        try:
            return await asyncio.wrap_future(job)
        except sqlite3.Error as exc:
            raise _wrap_sqlite_error(self._path, action, exc) from exc


def read_snapshot(path: Path, *, event_limit: int = DEFAULT_SNAPSHOT_EVENTS) -> Snapshot:
    """Read services, instances and the newest events in one read transaction.

    Opens the file read-only, so it works while the supervisor writes. It blocks until the
    read is done, so call it from the CLI or a worker thread, not from the event loop.
    """
    if not path.is_file():
        raise RegistryNotFoundError(
            f"registry file not found: {path}. Check the state folder path, or start "
            f"mrq-supervisor once so that it creates the file"
        )
    # NOTE: a read-only connection still creates the -wal and -shm files next to the
    # registry when they are missing, which they are while the supervisor is stopped. Then
    # the reader needs write access to the state folder.
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=DEFAULT_BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise _wrap_sqlite_error(path, "open", exc) from exc
    try:
        return _read_consistent_snapshot(conn, path, event_limit)
    except sqlite3.Error as exc:
        raise _wrap_sqlite_error(path, "read", exc) from exc
    finally:
        conn.close()


def _read_consistent_snapshot(conn: sqlite3.Connection, path: Path, event_limit: int) -> Snapshot:
    conn.execute("BEGIN")
    try:
        version = _read_schema_version(conn, path)
        if version == 0:
            raise RegistryCorruptError(_corrupt_message(path, "the file contains no tables"))
        if version < SCHEMA_VERSION:
            raise RegistryError(
                f"registry file {path} has schema version {version}, older than version "
                f"{SCHEMA_VERSION} of this mrq: start mrq-supervisor once to migrate it"
            )
        return Snapshot(
            services=_select_services(conn, path),
            instances=_select_instances(conn, None),
            events=_select_events(conn, path, limit=event_limit, service=None, since_id=None),
        )
    finally:
        conn.execute("ROLLBACK")
