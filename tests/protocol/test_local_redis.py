import pytest
import redis
from alchemist_protocol.local_redis import LocalRedis, is_reachable, reachable_or_started


def test_fixture_is_a_real_server(redis_client: redis.Redis) -> None:
    redis_client.xadd("s", {"a": "1"})
    info = redis_client.info("server")
    assert "redis_version" in info
    assert redis_client.xlen("s") == 1


def test_kill_and_restart_loses_data_but_comes_back(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    redis_client.set("k", "v")
    redis_server.kill()
    assert not is_reachable(redis_server.url)
    with pytest.raises(redis.ConnectionError):
        redis_client.get("k")
    redis_server.start()
    assert redis_client.get("k") is None


def test_reachable_or_started_reuses_a_live_server(redis_server: LocalRedis) -> None:
    url, started = reachable_or_started(redis_server.url)
    assert url == redis_server.url and started is None


def test_reachable_or_started_starts_one_when_none_answers() -> None:
    dead = LocalRedis()  # never started: nothing listens on its port
    url, started = reachable_or_started(dead.url)
    try:
        assert started is not None and url == started.url != dead.url
        assert is_reachable(url)
    finally:
        if started is not None:
            started.stop()
    assert not is_reachable(url)
