"""The database of the failover scenario (tests/cluster/test_database_failover.py): PostgreSQL as a
primary with a synchronous standby under Patroni, on hosts db1 and db2, its etcd on db1, db2 and
etc3 (worker/local/pg_cluster.py), started once for the session beside the RabbitMQ cluster.

A fixture module of its own (imported by the test module), so that it does not touch the shared
conftest: the other cluster scenarios keep their single PostgreSQL on db1.
"""

from __future__ import annotations

import time
import uuid
from typing import Iterator

import pytest

from worker.local import hosts
from worker.local.pg_cluster import PgCluster


class FailoverDatabase:
    """The Patroni cluster, with a fresh migrated database per scenario."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster

    def fresh(self) -> str:
        """A new, migrated database; its DATABASE_URL (every member, target_session_attrs=read-write)."""
        from worker.storage.migrate import upgrade

        url = self.cluster.create_database(f"failover_{uuid.uuid4().hex[:10]}")
        upgrade(url)
        return url


@pytest.fixture(scope="session")
def failover_database(cluster_environment) -> Iterator[FailoverDatabase]:  # noqa: ANN001 - tests/cluster/conftest.py
    started = time.monotonic()
    cluster = PgCluster(cluster_environment.root / "patroni", [hosts.host("db1"), hosts.host("db2")],
                        [hosts.host("etc3")], subnet=f"{hosts.SUBNET}.0/24")
    try:
        cluster.start()
        print(f"\nPatroni cluster started in {time.monotonic() - started:.1f} s: primary {cluster.leader()}, "
              f"synchronous standby {cluster.synchronous()}", flush=True)
        yield FailoverDatabase(cluster)
    finally:
        cluster.stop()
