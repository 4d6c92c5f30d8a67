"""Process settings shared by the worker and the gRPC server, read from the environment."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff
from temporalio.client import Client
from temporalio.service import TLSConfig

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
    openai_api_key: str | None = field(default=None, repr=False)
    # How long a run's event stream stays in Redis after its last event.
    stream_ttl_seconds: int = 24 * 3600
    # Modules whose top-level tools the worker registers beside the built-ins.
    tool_modules: tuple[str, ...] = ()
    # How long the worker waits out a Redis outage before an append fails (and Temporal retries the activity).
    redis_outage_seconds: float = 60.0
    # What one worker process runs at once. A streaming model call mostly waits on the network, so activities
    # (model and tool calls) are many; each holds one connection to the model endpoint while it runs.
    worker_activities: int = 1000
    worker_workflow_tasks: int = 200
    # Who may call the server (agent_service/_auth.py). With neither a JWKS nor a client CA, the server
    # authenticates no one and listens on loopback only, unless it is told --insecure.
    # A JWKS file, or an http(s) URL, with the keys that sign the bearer tokens the server accepts.
    auth_jwks: str | None = None
    auth_issuer: str | None = None
    auth_audience: str | None = None
    # The token claim that names the caller's tenant.
    auth_tenant_claim: str = "tenant"
    # Rights of client certificates by tenant and subject, O/CN ("acme/bot=runs:start runs:read; *=runs:read"):
    # the same CN in another tenant is someone else.
    auth_client_rights: str = ""
    # The server's TLS certificate chain and key (PEM files); with a client CA, every caller must present a
    # certificate that the CA signed (mutual TLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Run ids made from a request_id are an HMAC of the tenant and the request_id under this secret, so nobody can
    # work out another tenant's run ids. Every replica needs the same one; required with authentication.
    run_id_secret: str | None = field(default=None, repr=False)
    # Per principal, on each server process: open StreamRun calls, and StartRun calls per second with a burst.
    limit_streams: int = 1000
    limit_starts_per_second: float = 10.0
    limit_start_burst: int = 50
    # Temporal Cloud or a cluster with TLS: an API key, and TLS (on with any of these; TEMPORAL_TLS=true alone
    # uses the system's CAs). The names are Temporal's own environment configuration's.
    temporal_api_key: str | None = field(default=None, repr=False)
    temporal_tls: bool = False
    temporal_tls_ca: str | None = None
    temporal_tls_cert: str | None = None
    temporal_tls_key: str | None = None
    temporal_tls_server_name: str | None = None

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
            "redis_outage_seconds": float(env.get("AGENTRUN_REDIS_OUTAGE_SECONDS", cls.redis_outage_seconds)),
            "worker_activities": int(env.get("AGENTRUN_WORKER_ACTIVITIES", cls.worker_activities)),
            "worker_workflow_tasks": int(env.get("AGENTRUN_WORKER_WORKFLOW_TASKS", cls.worker_workflow_tasks)),
            "auth_jwks": env.get("AGENTRUN_AUTH_JWKS") or None,
            "auth_issuer": env.get("AGENTRUN_AUTH_ISSUER") or None,
            "auth_audience": env.get("AGENTRUN_AUTH_AUDIENCE") or None,
            "auth_tenant_claim": env.get("AGENTRUN_AUTH_TENANT_CLAIM") or cls.auth_tenant_claim,
            "auth_client_rights": env.get("AGENTRUN_AUTH_CLIENT_RIGHTS", cls.auth_client_rights),
            "tls_cert": env.get("AGENTRUN_TLS_CERT") or None,
            "tls_key": env.get("AGENTRUN_TLS_KEY") or None,
            "tls_client_ca": env.get("AGENTRUN_TLS_CLIENT_CA") or None,
            "run_id_secret": env.get("AGENTRUN_RUN_ID_SECRET") or None,
            "limit_streams": int(env.get("AGENTRUN_LIMIT_STREAMS", cls.limit_streams)),
            "limit_starts_per_second": float(env.get("AGENTRUN_LIMIT_STARTS_PER_SECOND", cls.limit_starts_per_second)),
            "limit_start_burst": int(env.get("AGENTRUN_LIMIT_START_BURST", cls.limit_start_burst)),
            "temporal_api_key": env.get("TEMPORAL_API_KEY") or None,
            "temporal_tls": env.get("TEMPORAL_TLS", "").lower() in ("1", "true", "yes"),
            "temporal_tls_ca": env.get("TEMPORAL_TLS_SERVER_CA_CERT_PATH") or None,
            "temporal_tls_cert": env.get("TEMPORAL_TLS_CLIENT_CERT_PATH") or None,
            "temporal_tls_key": env.get("TEMPORAL_TLS_CLIENT_KEY_PATH") or None,
            "temporal_tls_server_name": env.get("TEMPORAL_TLS_SERVER_NAME") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


async def connect_temporal(settings: Settings) -> Client:
    """A Temporal client; when the process traces, Temporal's OpenTelemetry interceptor carries the trace into
    workflow and activity headers (a worker built on this client traces its workflows and activities too).
    ConnectionError naming the address when Temporal cannot be reached."""
    from shared import telemetry

    interceptors = []
    if telemetry.enabled() and "temporal" not in telemetry.disabled_instrumentations():
        from temporalio.contrib.opentelemetry import TracingInterceptor

        interceptors.append(TracingInterceptor())
    try:
        return await Client.connect(
            settings.temporal_address,
            namespace=settings.temporal_namespace,
            interceptors=interceptors,
            api_key=settings.temporal_api_key,
            tls=_temporal_tls(settings),
        )
    except RuntimeError as err:  # the SDK's error for a server that does not answer
        raise ConnectionError(
            f"cannot connect to Temporal at {settings.temporal_address} (TEMPORAL_ADDRESS): {err}"
        ) from None


def _temporal_tls(settings: Settings) -> TLSConfig | bool:
    """TLS to Temporal: on when asked for, when any TLS file is given, and with an API key (Temporal Cloud)."""
    files = (settings.temporal_tls_ca, settings.temporal_tls_cert, settings.temporal_tls_key)
    if not any(files) and not settings.temporal_tls_server_name:
        return settings.temporal_tls or settings.temporal_api_key is not None
    ca, cert, key = (Path(path).read_bytes() if path else None for path in files)
    return TLSConfig(
        server_root_ca_cert=ca, client_cert=cert, client_private_key=key, domain=settings.temporal_tls_server_name
    )


# Connections a process opens to Redis at most; more callers wait for a free one instead of failing.
REDIS_MAX_CONNECTIONS = 64
# A command waits this long for a free connection, and for Redis to answer.
REDIS_TIMEOUT_SECONDS = 5.0
# Backoff between attempts while Redis is unreachable: 0.5 to 1 s once the first few have failed.
_OUTAGE_BACKOFF_CAP_SECONDS = 1.0


def connect_redis(settings: Settings, *, name: str, wait_out_outages: bool) -> redis.Redis:
    """A Redis client with its pool and retries set on purpose.

    The worker waits out an outage of about ``settings.redis_outage_seconds``: each command retries with backoff,
    and every append the worker makes is idempotent, so a retry after a lost reply adds nothing. The server fails
    fast instead (one retry), so that a caller hears UNAVAILABLE within its deadline. ``name`` is the connections'
    CLIENT SETNAME, so that an operator sees in CLIENT LIST which service holds them.
    """
    if wait_out_outages:
        attempts = max(1, math.ceil(settings.redis_outage_seconds / (0.75 * _OUTAGE_BACKOFF_CAP_SECONDS)))
        retry = Retry(EqualJitterBackoff(cap=_OUTAGE_BACKOFF_CAP_SECONDS, base=0.05), attempts)
    else:
        retry = Retry(NoBackoff(), 1)
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=REDIS_TIMEOUT_SECONDS,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        retry=retry,
        client_name=name,
    )
    return redis.Redis(connection_pool=pool)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets, so a service can drain before it exits."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
