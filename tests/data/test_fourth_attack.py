"""Findings of the fourth (outside) attack on the data cache: each failed before
its fix."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr
from redis.asyncio import Redis

from asgi_redis_kit import Cache

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]


async def test_clear_invalidates_after_its_generation_key_was_lost(
    cache: Cache, real_redis: Redis
) -> None:
    # A generation key gone (a raw DEL, an eviction, a failover that lost it)
    # counted 0 -> 1 again on the next clear(): entries stored under the old 1
    # were valid again after clear() returned.
    await cache.clear()
    await cache.set("k", "old")
    assert await real_redis.delete(cache.keys.generation(cache.namespace)) == 1
    assert await cache.get("k") is None  # generation 0 now: not the one it was stored under
    await cache.clear()
    assert await cache.get("k") is None


class Creds(BaseModel):
    tokens: list[SecretStr]


def test_a_secret_nested_in_a_pydantic_argument_is_refused() -> None:
    # Only a top-level SecretStr field was refused: in a list, pydantic's JSON
    # of each ("**********") gave every caller's secrets one key.
    async def whoami(creds: Creds) -> str:
        return creds.tokens[0].get_secret_value()

    memo = Cache("memory://").memoize(ttl=60)(whoami)
    with pytest.raises(TypeError, match="key="):
        memo.key(Creds.model_validate({"tokens": ["alice-token"]}))


class Paths(BaseModel):
    paths: set[Path]


async def path_load(p: Paths) -> int:
    return len(p.paths)


def test_a_set_of_pydantic_leaves_has_one_key_in_every_process() -> None:
    # A set field of values only pydantic can make JSON went to it whole, and
    # came out in iteration order: another key in every process.
    script = (
        "from pathlib import Path\n"
        "from asgi_redis_kit import Cache\n"
        "from tests.data.test_fourth_attack import Paths, path_load\n"
        "memo = Cache('memory://').memoize(ttl=60)(path_load)\n"
        "print(memo.key(Paths(paths={Path(c) for c in 'abcdefgh'})))\n"
    )
    keys = set()
    for seed in range(6):
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": os.getcwd()}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        keys.add(done.stdout.strip())
    assert len(keys) == 1, keys


@pytest.mark.parametrize(
    "argument",
    [
        {math.nan: 1, float("nan"): "a"},  # two keys that encode alike
        "\ud800",  # a lone surrogate: no UTF-8 form
    ],
    ids=["nan-keys", "surrogate"],
)
def test_an_argument_with_no_canonical_form_asks_for_key(argument: object) -> None:
    async def f(x: object) -> int:
        return 1

    memo = Cache("memory://").memoize(ttl=60)(f)
    with pytest.raises(TypeError, match="key="):
        memo.key(argument)


def test_a_self_referencing_argument_asks_for_key() -> None:
    async def f(x: object) -> int:
        return 1

    looped: list[object] = []
    looped.append(looped)
    memo = Cache("memory://").memoize(ttl=60)(f)
    with pytest.raises(TypeError, match="key="):
        memo.key(looped)


async def test_invalidate_tags_refuses_a_list_with_a_clear_error(cache: Cache) -> None:
    with pytest.raises(TypeError, match="tag"):
        await cache.invalidate_tags(["t:1"])  # type: ignore[arg-type]
