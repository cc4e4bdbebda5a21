"""Sessions on a real 3-master Redis Cluster (checklist 37, sessions issue item 8).

Every test drives a Starlette app whose SessionMiddleware gets a
``redis.asyncio.RedisCluster``. A CROSSSLOT, a multi-slot transaction or any
other error reply shows up as a non-200 answer or in ``redis_log``; the key
layout is read back from the servers themselves (``CLUSTER KEYSLOT``).
"""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.scaleout.apps import Calls, browser, build_app, ok_json, session_id
from tests.scaleout.servers import ClusterDeployment, CommandLog, hash_tag

pytestmark = pytest.mark.real_redis


def assert_clean(log: CommandLog) -> None:
    assert log.bad_errors() == [], f"error replies from the cluster: {log.bad_errors()}"
    sent = log.names()
    assert not sent & {"KEYS", "SCAN"}, f"the library scanned the keyspace: {sent}"


async def test_counter_fields_regenerate_clear(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    app = build_app(cluster_client, Calls(), cache=False)
    async with browser(app) as alice:
        for expected in range(1, 4):
            response = await alice.get("/visits")
            assert (response.status_code, response.text) == (200, str(expected))
        assert (await alice.post("/put?a=1&b=two&c=%7Bbraces%7D")).status_code == 200
        assert ok_json(await alice.get("/show")) == {
            "visits": 3,
            "a": "1",
            "b": "two",
            "c": "{braces}",
        }

        before = session_id(alice)
        old_cookie = alice.cookies.get("session")
        assert (await alice.post("/login/alice")).status_code == 200
        after = session_id(alice)
        assert after != before, "regenerate() must issue a new id"
        assert ok_json(await alice.get("/show"))["visits"] == 3, "regenerate() keeps the data"

        async with browser(app) as replay:
            replay.cookies.set("session", old_cookie or "")
            assert ok_json(await replay.get("/show")) == {}, "the pre-login id must be dead"

        assert (await alice.post("/logout")).status_code == 200
        assert ok_json(await alice.get("/show")) == {}
        assert (await alice.get("/visits")).text == "1"
    assert_clean(redis_log)


async def test_key_layout_is_cluster_safe_and_spread(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    """No command ever names keys in two slots; each session is one key named by
    its own id, so sessions spread over every master instead of piling onto one
    hash tag; a user's index is one key whose hash tag is the user id."""
    app = build_app(cluster_client, Calls(), cache=False)
    ids: list[str] = []
    # 40 random ids all miss one of 3 masters with odds of about 3 * (2/3)**40, 2e-7.
    for _ in range(40):
        async with browser(app) as agent:
            assert (await agent.post("/login/carol")).status_code == 200
            assert (await agent.post("/put?x=1")).status_code == 200
            assert (await agent.get("/visits")).text == "1"
            ids.append(session_id(agent))
    async with browser(app) as admin:
        assert ok_json(await admin.get("/users/carol/sessions")) == {"count": 40}

    spanning = [
        (args[:3], slots)
        for args, slots in cluster.multi_key_commands(redis_log)
        if len(set(slots)) > 1
    ]
    assert spanning == [], f"commands whose keys span slots: {spanning[:5]}"

    keys = cluster.all_keys()
    by_session = {sid: [k for k in keys if sid in k] for sid in ids}
    assert all(len(own) == 1 for own in by_session.values()), by_session
    owners = {cluster.owner_of(cluster.keyslot(own[0])) for own in by_session.values()}
    assert owners == set(cluster.ports), "40 sessions should be spread over all 3 masters"

    index = [k for k in keys if not any(sid in k for sid in ids)]
    assert len(index) == 1, f"expected one per-user index key, found {index}"
    assert hash_tag(index[0]) == "carol", f"the index should be tagged by user: {index[0]}"
    assert_clean(redis_log)


async def test_user_index_and_revoke_across_slots(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    app = build_app(cluster_client, Calls(), cache=False)
    dave = [browser(app) for _ in range(12)]
    erin = [browser(app) for _ in range(3)]
    try:
        for number, agent in enumerate(dave + erin):
            user = "dave" if agent in dave else "erin"
            assert (await agent.post(f"/login/{user}")).status_code == 200
            assert (await agent.post(f"/put?n={number}")).status_code == 200
        dave_ids = [session_id(agent) for agent in dave]
        keys = cluster.all_keys()
        slots = {cluster.keyslot(k) for k in keys for sid in dave_ids if sid in k}
        assert len({cluster.owner_of(s) for s in slots}) >= 2, "dave's sessions should span masters"

        async with browser(app) as admin:
            assert ok_json(await admin.get("/users/dave/sessions")) == {"count": 12}
            assert ok_json(await admin.get("/users/erin/sessions")) == {"count": 3}
            assert (await admin.post("/users/dave/revoke")).status_code == 200
            assert ok_json(await admin.get("/users/dave/sessions")) == {"count": 0}
            assert ok_json(await admin.get("/users/erin/sessions")) == {"count": 3}

        for agent in dave:
            assert ok_json(await agent.get("/show")) == {}, "a revoked session must be gone"
        for number, agent in enumerate(erin, start=len(dave)):
            assert ok_json(await agent.get("/show")) == {"n": str(number)}
        remaining = " ".join(cluster.all_keys())
        assert not any(sid in remaining for sid in dave_ids), "revoked records left behind"
    finally:
        for agent in dave + erin:
            await agent.aclose()
    assert_clean(redis_log)


async def test_round_trips_per_request_on_cluster(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    """The sessions promise (issue 2, item 3) holds on Cluster too: a session is
    one key, so its commands all go to one node and fit one round trip each way:
    read-only = 1, read + write = 2 at most."""
    app = build_app(cluster_client, Calls(), cache=False)
    async with browser(app) as alice:
        assert (await alice.post("/put?a=1")).status_code == 200
        assert (await alice.get("/visits")).text == "1"  # connections and scripts warm
        redis_log.clear()
        assert ok_json(await alice.get("/show")) == {"a": "1", "visits": 1}
        read_only = redis_log.round_trips
        redis_log.clear()
        assert (await alice.post("/put?b=2")).status_code == 200
        read_write = redis_log.round_trips
    assert (read_only, read_write) == (1, 2), (
        f"round trips on Cluster: read-only {read_only} (promised 1), "
        f"read+write {read_write} (promised at most 2)"
    )


async def test_multi_key_saves_are_one_round_trip_per_ordered_step_on_cluster(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    """A save that touches several keys spans slots, so it cannot be one command,
    and Cluster nodes run what they get in no particular order: a login (create the
    new record, index it, delete the old one if it is still live, un-index it) is
    one round trip per ordered step, so a revoke racing it always wins (see the
    sessions _store module docstring); a logout is the delete, then the un-index."""
    app = build_app(cluster_client, Calls(), cache=False)
    async with browser(app) as alice:
        assert (await alice.post("/login/alice")).status_code == 200
        assert (await alice.get("/visits")).text == "1"  # scripts warm
        # A connection to every node, so no handshake is counted below.
        await cluster_client.ping(target_nodes=RedisCluster.PRIMARIES)
        for user in ("bob", "carol"):
            redis_log.clear()
            assert (await alice.post(f"/login/{user}")).status_code == 200
            sent = [words[0].upper() for _, words in redis_log.commands]
            # the load, the create, the index add, the delete-if-live; the SREM
            assert sorted(sent) == ["EVALSHA"] * 4 + ["SREM"], sent
            assert redis_log.round_trips == 5, sent
        redis_log.clear()
        assert (await alice.post("/logout")).status_code == 200
        sent = [words[0].upper() for _, words in redis_log.commands]
        # the load, the delete (a script naming the users whose index may list it),
        # then the SREM
        assert sorted(sent) == ["EVALSHA", "EVALSHA", "SREM"], sent
        assert redis_log.round_trips == 3
    assert_clean(redis_log)
