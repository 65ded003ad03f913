import pytest
import redis
from alchemist_protocol.local_redis import LocalRedis, is_reachable


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
