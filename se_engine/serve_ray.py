"""Replicas of the whole engine behind one address, on Ray Serve (the ``ray`` extra).

    se-engine serve --ray --replicas 2 --models A B --method se --gammas 4 1

Each replica is a Ray actor holding one ``Engine`` (the same models and settings) behind the
OpenAI-compatible server of ``se_engine.server``: the same routes, streaming, errors, limits and
API key. Ray Serve's HTTP proxy at host:port spreads requests over the replicas (by their queue
lengths), restarts a replica whose process dies or whose health check (the engine thread alive)
fails, and scales between autoscaling bounds when given them. Every response names its replica in
the header ``X-Replica``. Splitting one ensemble's models over machines does not pay (the SE paper
measured parallel members at 0.39-0.82x of serial ones); replicating the whole ensemble does.

A replica's requests die with it: a client whose request was on a replica that died gets an error
(non-streaming: a 500 from the proxy; a stream: cut short, no [DONE]) and may retry it; the other
replicas serve on, and later requests go to them and to the restarted replica.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .async_engine import AsyncEngine
from .engine import Engine
from .server import MAX_QUEUED_SEQUENCES, OpenAIServer

logger = logging.getLogger(__name__)
APP_NAME = "se_engine"


@dataclass(frozen=True)
class ReplicaConfig:
    """What each replica runs and what it holds.

    engine: ``Engine``'s arguments (models by name or path: each replica loads its own).
    server: ``OpenAIServer``'s keyword arguments (model_name, limits, api_key, docs).
    num_replicas: replicas at start (with autoscaling: its initial count).
    num_cpus / num_gpus: Ray resources per replica (a replica on a GPU sees only its own, as cuda:0).
    autoscaling: Ray Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests,
        ...), passed through; None: a fixed num_replicas.
    shutdown_timeout: seconds a stopping replica lets its requests finish (Ray Serve's
        graceful_shutdown_timeout_s; None: Ray's default).
    """
    engine: Mapping[str, Any]
    server: Mapping[str, Any] = field(default_factory=dict)
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    autoscaling: Mapping[str, Any] | None = None
    shutdown_timeout: float | None = None

    def __post_init__(self):
        if isinstance(self.num_replicas, bool) or not isinstance(self.num_replicas, int) or self.num_replicas < 1:
            raise ValueError(f"num_replicas must be an int >= 1, got {self.num_replicas!r}")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if "models" not in self.engine:
            raise ValueError("engine must name the models: {'models': [...], ...}")


@serve.ingress()
class EngineReplica:
    """One replica: an engine and the HTTP server over it (built by Ray Serve in the replica's process)."""

    def __init__(self, engine: Mapping[str, Any], server: Mapping[str, Any]):
        self.engine = AsyncEngine(Engine(**engine))
        self.server = dict(server)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        replica = serve.get_replica_context().replica_id.unique_id
        return _NamedReplica(OpenAIServer(self.engine, **self.server).app, replica)

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose check raises: here, once its engine thread has stopped."""
        if not self.engine.alive:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:
        if hasattr(self, "engine"):
            self.engine.close("the replica is shutting down")


class _NamedReplica:
    """ASGI middleware: every HTTP response carries the header X-Replica (which replica served it)."""

    def __init__(self, app: ASGIApp, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-replica", self.replica)]}
            await send(message)

        await self.app(scope, receive, named)


def application(config: ReplicaConfig) -> serve.Application:
    """The Ray Serve application of ``config`` (for ``serve.run``, or a Serve config file's import path)."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        # The replica's own limits (429 beyond its queue) govern, not Ray's default of 5 requests in flight.
        "max_ongoing_requests": config.server.get("max_queued_sequences", MAX_QUEUED_SEQUENCES),
    }
    if config.shutdown_timeout is not None:
        options["graceful_shutdown_timeout_s"] = config.shutdown_timeout
    if config.autoscaling is not None:
        options["autoscaling_config"] = dict(config.autoscaling)
    else:
        options["num_replicas"] = config.num_replicas
    return serve.deployment(EngineReplica, name="EngineReplica", **options).bind(dict(config.engine),
                                                                                   dict(config.server))


def run(config: ReplicaConfig, host: str = "127.0.0.1", port: int = 8000, *, blocking: bool = True) -> None:
    """Starts Ray Serve (on the Ray cluster this process connects to: RAY_ADDRESS, else a local one) with
    the proxy at host:port, deploys ``config``'s replicas and, if ``blocking``, serves until SIGINT or
    SIGTERM, then shuts Serve down."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(config), name=APP_NAME, route_prefix="/")
    if not blocking:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logger.warning("serving %d replica(s) at http://%s:%d", config.num_replicas, host, port)
    stop.wait()
    serve.shutdown()
