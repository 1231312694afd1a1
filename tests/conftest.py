"""Fixtures more than one test directory uses."""

from __future__ import annotations

import shutil

import pytest

from harness import REDIS_SERVER, redis_server


@pytest.fixture(scope="session")
def redis_instance():
    """One real redis-server (Debian's) for the session; tests that take it skip without one."""
    if not shutil.which(REDIS_SERVER):
        pytest.skip("redis-server is not installed (scripts/setup installs it as root)")
    with redis_server() as r:
        yield r


@pytest.fixture
def redis_url(redis_instance) -> str:
    """The URL of that Redis, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_instance.endpoint)
    client.flushdb()
    client.close()
    return redis_instance.endpoint
