#!/usr/bin/env python3
"""CQL smoke test against a server booted by cassandra.sh.

Needs the PyPI package cassandra-driver (pip install cassandra-driver).
Usage: smoke_cql.py <cql-port>
Checks: keyspace (SimpleStrategy RF 1), table, INSERT ... IF NOT EXISTS (LWT,
applied then refused), SELECT, conditional UPDATE, counter table, and that
commitlog_sync is batch. Exits non-zero on any failure.
"""
import sys
import time

from cassandra.cluster import Cluster

port = int(sys.argv[1]) if len(sys.argv) > 1 else 9042
t0 = time.monotonic()
cluster = Cluster(["127.0.0.1"], port=port, protocol_version=5)
s = cluster.connect()

row = s.execute("SELECT release_version, cluster_name, data_center FROM system.local").one()
print(f"connected: release_version={row.release_version} cluster={row.cluster_name} dc={row.data_center}")

s.execute("CREATE KEYSPACE IF NOT EXISTS smoke WITH replication = "
          "{'class': 'SimpleStrategy', 'replication_factor': 1}")
s.execute("CREATE TABLE IF NOT EXISTS smoke.users (id text PRIMARY KEY, name text)")
s.execute("CREATE TABLE IF NOT EXISTS smoke.hits (id text PRIMARY KEY, n counter)")

r = s.execute("INSERT INTO smoke.users (id, name) VALUES ('u1', 'alice') IF NOT EXISTS").one()
assert r.applied, f"first LWT insert not applied: {r}"
r = s.execute("INSERT INTO smoke.users (id, name) VALUES ('u1', 'mallory') IF NOT EXISTS").one()
assert not r.applied and r.name == "alice", f"second LWT insert should be refused: {r}"
print("LWT INSERT IF NOT EXISTS: applied once, refused the second time")

r = s.execute("UPDATE smoke.users SET name = 'alicia' WHERE id = 'u1' IF name = 'alice'").one()
assert r.applied, f"conditional update not applied: {r}"

row = s.execute("SELECT id, name FROM smoke.users WHERE id = 'u1'").one()
assert row.name == "alicia", row
print(f"SELECT: {row.id} -> {row.name}")

for _ in range(3):
    s.execute("UPDATE smoke.hits SET n = n + 1 WHERE id = 'page'")
row = s.execute("SELECT n FROM smoke.hits WHERE id = 'page'").one()
assert row.n == 3, row
print(f"counter: {row.n}")

row = s.execute("SELECT value FROM system_views.settings WHERE name = 'commitlog_sync'").one()
assert row.value == "batch", row
print(f"commitlog_sync: {row.value}")

cluster.shutdown()
print(f"CQL smoke test passed in {time.monotonic() - t0:.2f}s")
