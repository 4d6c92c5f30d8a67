"""Process settings shared by the worker and the gRPC server, read from the environment."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass

import redis.asyncio as redis
from temporalio.client import Client

OFFLINE_API_KEY = "offline"


@dataclass(frozen=True)
class Settings:
    """Where Temporal, Redis and the model are, and how this deployment names its things."""

    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    task_queue: str = "agentrun"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefixes every Redis key, so several deployments (or tests) can share one Redis.
    redis_prefix: str = "agentrun:"
    agents_file: str = "agents.yaml"
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    # How long a run's event stream stays in Redis after its last event.
    stream_ttl_seconds: int = 24 * 3600
    # Modules whose top-level tools the worker registers beside the built-ins.
    tool_modules: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        values: dict[str, object] = {
            "temporal_address": env.get("TEMPORAL_ADDRESS", cls.temporal_address),
            "temporal_namespace": env.get("TEMPORAL_NAMESPACE", cls.temporal_namespace),
            "task_queue": env.get("AGENTRUN_TASK_QUEUE", cls.task_queue),
            "redis_url": env.get("REDIS_URL", cls.redis_url),
            "redis_prefix": env.get("AGENTRUN_REDIS_PREFIX", cls.redis_prefix),
            "agents_file": env.get("AGENTRUN_AGENTS_FILE", cls.agents_file),
            "openai_base_url": env.get("OPENAI_BASE_URL") or None,
            "openai_api_key": env.get("OPENAI_API_KEY") or None,
            "stream_ttl_seconds": int(env.get("AGENTRUN_STREAM_TTL_SECONDS", cls.stream_ttl_seconds)),
            "tool_modules": tuple(m.strip() for m in env.get("AGENTRUN_TOOL_MODULES", "").split(",") if m.strip()),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


async def connect_temporal(settings: Settings) -> Client:
    return await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)


def connect_redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets, so a service can drain before it exits."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
