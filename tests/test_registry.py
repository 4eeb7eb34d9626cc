"""Tests of the supervisor's SQLite registry on real files."""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

import anyio
import pytest

from supervisor.registry import (
    SCHEMA_VERSION,
    InstanceRecord,
    InvalidRecordError,
    NewEvent,
    Registry,
    RegistryCorruptError,
    RegistryError,
    RegistryNotFoundError,
    RouteInfo,
    ServiceNotFoundError,
    ServiceRecord,
    read_snapshot,
    registry_path,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return registry_path(tmp_path / "state")


def make_service(name: str = "orders", replicas: int = 2) -> ServiceRecord:
    routes = [
        RouteInfo(service=name, route="create", queue=f"mrq.{name}.create", kind="route"),
        RouteInfo(service=name, route="paid", queue=f"mrq.{name}.paid", kind="event"),
    ]
    return ServiceRecord(
        name=name,
        kind="worker",
        target="app.orders:service",
        fingerprint="sha256:abc",
        replicas=replicas,
        routes=routes,
        updated_at=1_700_000_000.5,
    )


def make_instance(service: str = "orders", index: int = 0, pid: int = 4242) -> InstanceRecord:
    return InstanceRecord(
        service=service,
        index=index,
        pid=pid,
        start_time=1_700_000_001.25,
        state="running",
        restarts=3,
        last_exit_code=None,
        last_exit_signal=9,
        last_exit_reason="killed",
        last_exit_at=1_700_000_000.75,
        started_at=1_700_000_001.0,
        ready_at=None,
        log_path=Path(f"/state/logs/{service}.{index}.log"),
    )


def make_event(kind: str = "instance_started", service: str | None = "orders") -> NewEvent:
    return NewEvent(
        time=1_700_000_002.0,
        node="node-a",
        kind=kind,
        service=service,
        instance=0,
        data={"pid": 4242, "nested": {"ok": True}},
    )


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_records_round_trip(db_path: Path) -> None:
    service = make_service()
    instance = make_instance()
    async with Registry(db_path) as registry:
        await registry.upsert_service(service)
        await registry.put_instance(instance)
        event_id = await registry.add_event(make_event())
        await registry.set_meta("node_id", "node-a")

        assert await registry.services() == [service]
        assert await registry.instances() == [instance]
        assert await registry.instances("orders") == [instance]
        assert await registry.instances("other") == []
        events = await registry.events()
        assert [e.id for e in events] == [event_id]
        assert events[0].data == {"pid": 4242, "nested": {"ok": True}}
        assert events[0].service == "orders"
        assert await registry.get_meta("node_id") == "node-a"
        assert await registry.get_meta("missing") is None
        assert await registry.get_meta("schema_version") == str(SCHEMA_VERSION)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_reopen_keeps_data(db_path: Path) -> None:
    async with Registry(db_path) as registry:
        await registry.upsert_service(make_service())
        await registry.put_instance(make_instance())
        first_id = await registry.add_event(make_event())

    async with Registry(db_path) as registry:
        assert await registry.services() == [make_service()]
        assert await registry.instances() == [make_instance()]
        second_id = await registry.add_event(make_event("instance_exited"))
        assert [e.id for e in await registry.events()] == [first_id, second_id]
        assert second_id > first_id


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_file_uses_wal_mode(db_path: Path) -> None:
    async with Registry(db_path):
        with sqlite3.connect(db_path) as conn:
            (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        conn.close()
    assert mode == "wal"


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_upsert_service_replaces_fields(db_path: Path) -> None:
    async with Registry(db_path) as registry:
        await registry.upsert_service(make_service(replicas=2))
        changed = make_service(replicas=5)
        await registry.upsert_service(changed)
        assert await registry.services() == [changed]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_set_routes_replaces_routes(db_path: Path) -> None:
    new_routes = [RouteInfo(service="orders", route="ship", queue="q.ship", kind="route")]
    async with Registry(db_path) as registry:
        await registry.upsert_service(make_service())
        await registry.set_routes("orders", new_routes)
        (service,) = await registry.services()
        assert service.routes == new_routes
        assert service.updated_at > make_service().updated_at


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_set_routes_unknown_service_raises(db_path: Path) -> None:
    async with Registry(db_path) as registry:
        with pytest.raises(ServiceNotFoundError, match=r"'billing' not found.*upsert_service"):
            await registry.set_routes("billing", [])


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_routes_of_several_sdk_services_kept(db_path: Path) -> None:
    # One supervised service may run a module that defines several SDK services.
    routes = [
        RouteInfo(service="orders", route="create", queue="orders.create", kind="route"),
        RouteInfo(service="audit", route="", queue="audit", kind="route"),
    ]
    async with Registry(db_path) as registry:
        await registry.upsert_service(make_service())
        await registry.set_routes("orders", routes)
        (stored,) = await registry.services()
    assert stored.routes == routes


def test_route_kind_validated() -> None:
    with pytest.raises(InvalidRecordError, match=r"invalid kind 'queue'.*'route' or 'event'"):
        RouteInfo(service="orders", route="x", queue="q", kind="queue")  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_put_instance_replaces_by_service_and_index(db_path: Path) -> None:
    async with Registry(db_path) as registry:
        await registry.put_instance(make_instance(index=0, pid=100))
        await registry.put_instance(make_instance(index=1, pid=101))
        await registry.put_instance(make_instance(index=0, pid=200))
        pids = [(i.index, i.pid) for i in await registry.instances("orders")]
        assert pids == [(0, 200), (1, 101)]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_instance_defaults_round_trip(db_path: Path) -> None:
    bare = InstanceRecord(service="orders", index=0, pid=None, start_time=None, state="stopped")
    async with Registry(db_path) as registry:
        await registry.put_instance(bare)
        assert await registry.instances() == [bare]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_remove_service_removes_instances(db_path: Path) -> None:
    async with Registry(db_path) as registry:
        await registry.upsert_service(make_service("orders"))
        await registry.upsert_service(make_service("billing"))
        await registry.put_instance(make_instance("orders", 0))
        await registry.put_instance(make_instance("billing", 0))

        assert await registry.remove_service("orders") is True
        assert await registry.remove_service("orders") is False
        assert [s.name for s in await registry.services()] == ["billing"]
        assert [i.service for i in await registry.instances()] == ["billing"]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_remove_instance(db_path: Path) -> None:
    async with Registry(db_path) as registry:
        await registry.put_instance(make_instance(index=0))
        await registry.put_instance(make_instance(index=1))
        assert await registry.remove_instance("orders", 0) is True
        assert await registry.remove_instance("orders", 0) is False
        assert [i.index for i in await registry.instances()] == [1]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_events_filter_and_paging(db_path: Path) -> None:
    async with Registry(db_path) as registry:
        ids = []
        for n in range(10):
            service = "orders" if n % 2 == 0 else "billing"
            ids.append(await registry.add_event(make_event(f"e{n}", service)))

        newest = await registry.events(limit=3)
        assert [e.kind for e in newest] == ["e7", "e8", "e9"]
        orders = await registry.events(service="orders")
        assert [e.kind for e in orders] == ["e0", "e2", "e4", "e6", "e8"]
        page = await registry.events(limit=2, since_id=ids[3])
        assert [e.kind for e in page] == ["e4", "e5"]
        assert await registry.events(since_id=ids[-1]) == []


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_events_trimmed_to_max(db_path: Path) -> None:
    async with Registry(db_path, max_events=50) as registry:
        ids = [await registry.add_event(make_event(f"e{n}")) for n in range(120)]
        remaining = await registry.events(limit=1000)

    assert len(remaining) == 50
    assert [e.id for e in remaining] == ids[-50:]
    with sqlite3.connect(db_path) as conn:
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
    assert count == 50


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_event_data_must_be_json(db_path: Path) -> None:
    bad = NewEvent(time=1.0, node="n", kind="k", data={"value": object()})
    async with Registry(db_path) as registry:
        with pytest.raises(InvalidRecordError, match="data of event 'k' is not JSON-serializable"):
            await registry.add_event(bad)
        assert await registry.events() == []


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_schema_version_key_reserved(db_path: Path) -> None:
    async with Registry(db_path) as registry:
        with pytest.raises(InvalidRecordError, match="'schema_version' is reserved"):
            await registry.set_meta("schema_version", "99")


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_call_before_open_raises(db_path: Path) -> None:
    registry = Registry(db_path)
    with pytest.raises(RegistryError, match=r"is not open: call `await registry.open\(\)`"):
        await registry.services()


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_concurrent_writes_keep_all_rows(db_path: Path) -> None:
    tasks = 40
    per_task = 25
    async with Registry(db_path) as registry:

        async def write(task: int) -> None:
            for n in range(per_task):
                await registry.put_instance(make_instance(f"svc{task}", n, pid=n))
                await registry.add_event(make_event(f"t{task}n{n}", f"svc{task}"))

        async with anyio.create_task_group() as group:
            for task in range(tasks):
                group.start_soon(write, task)

        instances = await registry.instances()
        events = await registry.events(limit=tasks * per_task + 10)

    assert len(instances) == tasks * per_task
    assert len({(i.service, i.index) for i in instances}) == tasks * per_task
    assert len({e.kind for e in events}) == tasks * per_task
    assert len({e.id for e in events}) == tasks * per_task


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_put_instance_thousand_times_is_fast(db_path: Path) -> None:
    async with Registry(db_path) as registry:
        started = time.perf_counter()
        for n in range(1000):
            await registry.put_instance(make_instance(index=n % 50, pid=n))
        elapsed_s = time.perf_counter() - started

    per_call_us = elapsed_s * 1e6 / 1000
    print(f"1000 put_instance calls took {elapsed_s:.3f} s ({per_call_us:.0f} us per call)")
    # The bound is generous for a loaded 2-core machine, so it catches only gross slowness.
    # The printed time is the measurement.
    assert elapsed_s < 20.0


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_snapshot_while_writer_open(db_path: Path) -> None:
    async with Registry(db_path) as registry:
        await registry.upsert_service(make_service())
        await registry.put_instance(make_instance())
        await registry.add_event(make_event())

        snapshot = await anyio.to_thread.run_sync(read_snapshot, db_path)
        assert snapshot.services == [make_service()]
        assert snapshot.instances == [make_instance()]
        assert [e.kind for e in snapshot.events] == ["instance_started"]

        # Keep writing while snapshots are read, as the supervisor does while the CLI reads.
        async with anyio.create_task_group() as group:

            async def write_events() -> None:
                for n in range(300):
                    await registry.add_event(make_event(f"w{n}"))

            group.start_soon(write_events)
            for _ in range(30):
                snapshot = await anyio.to_thread.run_sync(read_snapshot, db_path)
                assert snapshot.services == [make_service()]

        final = await anyio.to_thread.run_sync(read_snapshot, db_path)
        assert final.events[-1].kind == "w299"
        assert len(final.events) == 100


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_snapshot_from_other_process(db_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; "
        "from supervisor.registry import read_snapshot; "
        "s = read_snapshot(Path(sys.argv[1])); "
        "print(len(s.services), s.services[0].routes[1].kind, len(s.events))"
    )
    async with Registry(db_path) as registry:
        await registry.upsert_service(make_service())
        await registry.add_event(make_event())

        command = [sys.executable, "-c", code, str(db_path)]
        result = await anyio.run_process(command, cwd=REPO_ROOT, check=False)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode().split() == ["1", "event", "1"]


@pytest.mark.timeout(30)
def test_snapshot_missing_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "registry.sqlite3"
    with pytest.raises(RegistryNotFoundError, match=r"registry file not found: .*nowhere.*start"):
        read_snapshot(missing)


@pytest.mark.timeout(30)
def test_snapshot_corrupt_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    path.write_bytes(os.urandom(16384))
    with pytest.raises(RegistryCorruptError, match=r"registry\.sqlite3 is corrupt.*Delete it"):
        read_snapshot(path)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_open_corrupt_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    path.write_bytes(os.urandom(16384))
    with pytest.raises(RegistryCorruptError, match=r"registry\.sqlite3 is corrupt.*Delete it"):
        await Registry(path).open()


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_foreign_database_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.close()

    with pytest.raises(RegistryCorruptError, match="not an mrq registry: found tables customers"):
        read_snapshot(path)
    with pytest.raises(RegistryCorruptError, match="not an mrq registry: found tables customers"):
        await Registry(path).open()


@pytest.mark.timeout(30)
def test_snapshot_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    path.touch()
    with pytest.raises(RegistryCorruptError, match="contains no tables"):
        read_snapshot(path)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_newer_schema_rejected(db_path: Path) -> None:
    async with Registry(db_path):
        pass
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()

    with pytest.raises(RegistryError, match=r"schema version 99.*upgrade mrq"):
        await Registry(db_path).open()
    with pytest.raises(RegistryError, match=r"schema version 99.*upgrade mrq"):
        read_snapshot(db_path)
