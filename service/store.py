"""The Redis client the stores share: one server (a bounded connection pool) or a Redis Cluster.

Backpressure: a worker holds at most SIDREC_REDIS_MAX_CONNECTIONS connections. A request that
finds them all busy waits up to SIDREC_REDIS_POOL_TIMEOUT_S for one (redis-py's
BlockingConnectionPool), then fails with StoreOverloaded: the service is busier than its pool,
Redis itself is fine, and the client gets 503 `overloaded` with Retry-After rather than the
"Redis did not answer" 503 that sends an operator to look at Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError

from .settings import Settings

# Either client: the stores use only commands both have, on single-slot keys.
StoreClient = Redis | RedisCluster


class StoreOverloaded(RedisError):
    """No Redis connection came free in time: this worker is overloaded, Redis is not down."""


class _WaitingPool(BlockingConnectionPool):
    """BlockingConnectionPool whose "waited too long" is StoreOverloaded, not ConnectionError
    (redis-py raises ConnectionError for both a full pool and a dead server)."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except RedisConnectionError as e:
            if isinstance(e.__cause__, asyncio.TimeoutError):
                raise StoreOverloaded(
                    f"no Redis connection free within {self.timeout}s "
                    f"({self.max_connections} in use)"
                ) from e
            raise


def is_overload(exc: BaseException) -> bool:
    """The pool was full (ours timed out waiting, or a cluster node's pool was at its cap)."""
    return isinstance(exc, StoreOverloaded | MaxConnectionsError)


def connect(
    settings: Settings, max_connections: int | None = None, pool_timeout: float | None = None
) -> StoreClient:
    """The client for SIDREC_REDIS_URL (a Redis Cluster when SIDREC_REDIS_CLUSTER is set)."""
    assert settings.redis_url
    max_connections = max_connections or settings.redis_max_connections
    common: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "health_check_interval": 10,
    }
    if settings.redis_cluster:
        # redis-py's cluster client keeps one pool per node and has no blocking variant: past
        # the cap a node's pool raises MaxConnectionsError at once, answered as `overloaded`.
        return RedisCluster.from_url(settings.redis_url, max_connections=max_connections, **common)
    pool = _WaitingPool.from_url(
        settings.redis_url,
        # Two retries cover a pooled connection gone stale (Redis restarted); redis-py's
        # default of ten, with backoff, held a request for seconds before its 503.
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2),
        max_connections=max_connections,
        timeout=pool_timeout or settings.redis_pool_timeout_s,
        **common,
    )
    return Redis.from_pool(pool)
