"""Connecting to Redis: URLs, TLS, and a client that reads stream entries as bytes.

URLs are redis-py's: `redis://host:6379/0`, `rediss://host:6380/0` for TLS, `unix:///path/redis.sock`. TLS
options go in the query string and reach redis-py's SSL connection as they are, for example
`rediss://redis:6380/0?ssl_ca_certs=/etc/alchemist/ca.pem` (a private CA), `&ssl_certfile=...&ssl_keyfile=...`
(client certificates), or `?ssl_cert_reqs=none` (no verification: only for tests).

Why a bytes client: stream entries are written by applications, and nothing stops one from writing bytes that
are not UTF-8. A client with `decode_responses=True` raises while parsing the reply, before the caller can look
at the entry, so one such entry would stop every read of the stream (and stay pending forever once read through
a consumer group). Stream reads therefore go through `bytes_twin(client)`, whose replies are never decoded; the
reader decodes each field itself and dead-letters what does not decode.
"""

from __future__ import annotations

import redis

_CONNECTION_SETTINGS = frozenset(
    {
        "host", "port", "path", "db", "username", "password", "credential_provider", "client_name",
        "socket_timeout", "socket_connect_timeout", "socket_keepalive", "socket_keepalive_options",
        "retry_on_timeout", "retry_on_error", "retry", "health_check_interval", "protocol",
    }
)  # fmt: skip


def connect(
    url: str,
    *,
    decode_responses: bool = True,
    socket_timeout: float | None = None,
    socket_connect_timeout: float | None = None,
) -> redis.Redis:
    """A client for `url` (redis://, rediss:// or unix://); raises ValueError for any other scheme."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"Redis URL {url!r} must start with redis://, rediss:// (TLS) or unix://")
    if decode_responses:
        return redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
        )
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
    )


def bytes_twin(client: redis.Redis) -> redis.Redis:
    """A client of the same server with the same settings (TLS, credentials, timeouts) whose replies are bytes.

    It has its own connection pool (decoding is a property of the connections); close it with `close()`.
    """
    pool = client.connection_pool
    # Only what says where and how to connect: the rest of a pool's kwargs is its own state (redis-py adds
    # handlers and registries there), which a second pool must not share.
    kwargs = {
        k: v for k, v in pool.connection_kwargs.items() if k in _CONNECTION_SETTINGS or k.startswith("ssl_")
    }
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **kwargs, decode_responses=False
        )
    )


def text(value: str | bytes | None) -> str:
    """A reply value as text, for replies that are ids or names we wrote ourselves (ASCII)."""
    if value is None:
        return ""
    return value.decode("utf-8", errors="backslashreplace") if isinstance(value, bytes) else str(value)
