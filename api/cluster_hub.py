"""The reply hub of an API replica on a Redis Cluster: one sharded pub/sub connection per primary node.

Sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis 7.0+) keeps a message inside the shard that owns its channel's slot
instead of copying it to every node over the cluster bus, so pub/sub traffic grows with the shard count like the
rest of the load. A subscriber must then listen on that shard's node: this hub keeps one `ReplyHub` per primary
(each with the same at-most-once rules: confirmed SSUBSCRIBE before the job is queued, a 503 for whoever waited
on a connection that dropped) and routes each channel to the hub of its slot's node. A slot map gone stale (the
cluster was resharded) shows as a refused SSUBSCRIBE: the map is reloaded and the channel routed once more.

On a cluster without sharded pub/sub (before 7.0) a PUBLISH reaches every node, so one plain hub on one node
serves every channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from api.errors import redis_unavailable
from api.reply_hub import Hub, ReplyHub, ShardMoved, Subscription
from common import keys, redis_client, redis_cluster
from common.settings import Settings

log = logging.getLogger("axion.api.replies")

RETRY_DISCOVERY_S = 1.0


class ClusterReplyHub:
    """ReplyHub's interface (start, stop, open, close, connected, last_error, open_count) over one hub per node."""

    def __init__(self, cluster: RedisCluster, settings: Settings) -> None:
        self.cluster = cluster
        self.settings = settings
        self.sharded = redis_cluster.sharded(cluster)
        self._hubs: dict[str, ReplyHub] = {}  # by node name (host:port)
        self._clients: list[aioredis.Redis] = []
        self._owners: dict[int, ReplyHub] = {}  # id(subscription) -> the hub it was opened on
        self._lock = asyncio.Lock()
        self._discovery: asyncio.Task[None] | None = None
        self._error: str | None = "the cluster's nodes are not known yet"

    async def start(self) -> None:
        """Learn the nodes and connect a hub to each. Never fails: with the cluster down it keeps trying in the
        background, and requests get a 503 meanwhile."""
        self._discovery = asyncio.create_task(self._discover(), name="axion-cluster-hub-discovery")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._discovery), self.settings.redis_timeout_s * 2)

    async def _discover(self) -> None:
        while True:
            try:
                await self.cluster.initialize()
                nodes = self.cluster.get_primaries()
                for node in nodes if self.sharded else nodes[:1]:
                    await self._hub(node)
                self._error = None
                log.info("reply hub: %s pub/sub on %d node(s) of the Redis Cluster",
                         "sharded" if self.sharded else "plain", len(self._hubs))
                return
            except Exception as exc:
                self._error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(RETRY_DISCOVERY_S)

    async def _hub(self, node: ClusterNode) -> ReplyHub:
        """The hub on `node`, connected (or reconnecting) before anyone uses it."""
        async with self._lock:
            hub = self._hubs.get(node.name)
            if hub is None:
                client = redis_client.connect_node(self.settings, node.host, int(node.port), node.connection_kwargs)
                self._clients.append(client)
                hub = ReplyHub(client, self.settings.redis_timeout_s, sharded=self.sharded)
                await hub.start()
                self._hubs[node.name] = hub
            return hub

    async def stop(self) -> None:
        if self._discovery:
            self._discovery.cancel()
            with contextlib.suppress(BaseException):
                await self._discovery
        for hub in self._hubs.values():
            await hub.stop()
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()

    @property
    def connected(self) -> bool:
        return self._error is None and all(hub.connected for hub in self._hubs.values())

    @property
    def last_error(self) -> str | None:
        return self._error or next((f"{name}: {hub.last_error}" for name, hub in self._hubs.items()
                                    if hub.last_error), None)

    @property
    def open_count(self) -> int:
        return sum(hub.open_count for hub in self._hubs.values())

    async def open(self, request_id: str | None = None, *, channel: str | None = None) -> Subscription:
        """Subscribe on the node that owns the channel's slot; returns once that node confirmed it."""
        if self._error is not None:
            raise redis_unavailable(f"No connection to the Redis Cluster for replies ({self._error}).")
        name = channel or keys.reply_channel(request_id or "")
        for attempt in range(2):
            try:
                hub = await self._hub(self._node_for(name))
                sub = await hub.open(channel=name)
            except ShardMoved:
                if attempt:
                    break
                await self.cluster.nodes_manager.initialize()  # resharded: reload the slot map, route again
                continue
            self._owners[id(sub)] = hub
            return sub
        raise redis_unavailable(f"The Redis Cluster keeps moving the slot of {name}; retry.")

    def _node_for(self, channel: str) -> ClusterNode:
        if not self.sharded:
            return self.cluster.get_primaries()[0]
        try:
            node = self.cluster.get_node_from_key(channel)
        except Exception as exc:  # the slot is not covered right now (failover, resharding)
            raise redis_unavailable(f"No Redis Cluster node owns the slot of {channel} ({exc}).") from None
        if node is None:
            raise redis_unavailable(f"No Redis Cluster node owns the slot of {channel}.")
        return node

    async def close(self, sub: Subscription) -> None:
        hub = self._owners.pop(id(sub), None)
        if hub is not None:
            await hub.close(sub)


def create_hub(client: aioredis.Redis, settings: Settings) -> Hub:
    """The reply hub that fits `client`: one pub/sub connection, or one per cluster node."""
    if redis_cluster.is_cluster(client):
        return ClusterReplyHub(client, settings)  # type: ignore[arg-type]
    return ReplyHub(client, timeout_s=settings.redis_timeout_s)
