"""Who this Serve replica is (id, rank, app) and the middleware that names it on every answer.

Kept apart from deployment.py (the routes): the replica's identity keys its saved state
(moeray/serving/persist.py), and the header tells which replica served, or lost, a request.
"""

import os

from ray import serve


def replica_identity() -> tuple[str, int | None, str | None]:
    """(replica id, replica rank, app name) from Serve; outside a replica (never in production)
    the pid, and no rank or app: nothing is saved then."""
    try:
        ctx = serve.get_replica_context()
    except Exception:  # noqa: BLE001
        return f"pid-{os.getpid()}", None, None
    rank = getattr(ctx, "rank", None)
    rank = getattr(rank, "rank", rank)  # Ray 2.60: a ReplicaRank (rank, node_rank, local_rank)
    return ctx.replica_id.unique_id, rank if isinstance(rank, int) else None, ctx.app_name


_REPLICA_HEADER = b"x-moeray-replica"


class NameTheReplica:
    """Every answer names the replica that gave it (`x-moeray-replica`): which engine served a
    request, and after a replica died, which requests it took with it. Plain ASGI (no
    BaseHTTPMiddleware): a stream and its cancellation pass through untouched."""

    def __init__(self, asgi_app):
        self.app = asgi_app
        self.name: bytes | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.name is None:
            replica, _, _ = replica_identity()
            self.name = replica.encode()
        name = self.name

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (_REPLICA_HEADER, name)]}
            await send(message)

        return await self.app(scope, receive, send_named)
