"""Real components for the tests: one Temporal dev server and one Redis for the session,
and for each test its own task queue, Redis key prefix, worker and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import redis.asyncio as redis
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from agent_service.server import serve, shutdown
from agentrun.client import AgentRunClient
from devstack.stack import TEMPORAL_FAST_DISPATCH, redis_server, temporal_executable
from shared.agents import load_agents
from shared.contract import TENANT_SEARCH_ATTRIBUTE
from shared.settings import Settings
from tests.credentials import AUDIENCE, ISSUER, CertificateAuthority, Issuer
from worker import offline_model
from worker.tools import ToolRegistry
from worker.worker import build_worker

TESTS = Path(__file__).parent
AGENTS_FILE = TESTS / "agents.yaml"


def details(err: grpc.aio.AioRpcError) -> str:
    """The status message of a failed call ("" when it has none)."""
    return err.details() or ""


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_executable(),
        dev_server_extra_args=TEMPORAL_FAST_DISPATCH,
        # As the dev stack registers it: ListRuns filters a tenant's runs by it.
        search_attributes=[SearchAttributeKey.for_keyword(TENANT_SEARCH_ATTRIBUTE)],
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def redis_url() -> AsyncIterator[str]:
    async with redis_server(os.environ.get("REDIS_URL")) as url:
        yield url


@dataclass
class Model:
    """The offline model server, scriptable in-process."""

    base_url: str
    server: offline_model.OfflineModel

    def script(self, *steps: dict[str, Any], keep_requests: int | None = None) -> str:
        """Registers a script and returns its key; put the key in a run's input to use it. ``keep_requests`` keeps
        only that many of the latest requests."""
        key = f"script-{uuid.uuid4().hex[:12]}"
        self.server.add_script(key, list(steps), keep_requests=keep_requests)
        return key


@pytest.fixture(scope="session")
async def model() -> AsyncIterator[Model]:
    runner, base_url = await offline_model.serve()
    yield Model(base_url, runner.app[offline_model.MODEL_KEY])
    await runner.cleanup()


@pytest.fixture
def settings(temporal_env: WorkflowEnvironment, redis_url: str, model: Model) -> Settings:
    unique = uuid.uuid4().hex[:12]
    return Settings(
        temporal_address=temporal_env.client.service_client.config.target_host,
        task_queue=f"test-{unique}",
        redis_url=redis_url,
        redis_prefix=f"test:{unique}:",
        agents_file=str(AGENTS_FILE),
        openai_base_url=model.base_url,
        openai_api_key="offline",
        tool_modules=("tests.worker.extra_tools",),
    )


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{settings.redis_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@dataclass
class Stack:
    """A worker and a gRPC server for one test, and a client connected to the server over a socket."""

    client: AgentRunClient
    settings: Settings
    temporal: Client
    redis: redis.Redis
    model: Model
    address: str
    llm: openai.AsyncOpenAI
    worker: Worker
    _running: asyncio.Task[None]

    async def restart_worker(self, *, agents_file: Path | None = None, tools: ToolRegistry | None = None) -> None:
        """Stops the worker and starts another on the same task queue, as a deploy does."""
        await self.stop()
        if agents_file is not None:
            self.settings = replace(self.settings, agents_file=str(agents_file))
        self.worker = build_worker(
            self.temporal,
            self.settings,
            redis_client=self.redis,
            model=self.llm,
            agents=load_agents(self.settings.agents_file),
            tools=tools,
            sandboxed=True,
        )
        self._running = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        await self.worker.shutdown()
        await self._running


@pytest.fixture
async def stack(
    settings: Settings, temporal_env: WorkflowEnvironment, redis_client: redis.Redis, model: Model
) -> AsyncIterator[Stack]:
    agents = load_agents(settings.agents_file)
    async with openai.AsyncOpenAI(base_url=model.base_url, api_key="offline", max_retries=0) as llm:
        worker = build_worker(
            temporal_env.client, settings, redis_client=redis_client, model=llm, agents=agents, sandboxed=True
        )
        running = asyncio.create_task(worker.run())
        server, port = await serve(settings, port=0, temporal=temporal_env.client, redis_client=redis_client)
        address = f"127.0.0.1:{port}"
        async with AgentRunClient(address) as client:
            stack = Stack(client, settings, temporal_env.client, redis_client, model, address, llm, worker, running)
            yield stack
        await shutdown(server, grace=0)
        await stack.stop()


@pytest.fixture
def issuer(tmp_path: Path) -> Issuer:
    return Issuer(tmp_path / "jwks.json")


def with_auth(settings: Settings, issuer: Issuer, **overrides: Any) -> Settings:
    """The settings of a server that takes the issuer's tokens."""
    values: dict[str, Any] = dict(
        auth_jwks=str(issuer.jwks_file),
        auth_issuer=ISSUER,
        auth_audience=AUDIENCE,
        run_id_secret=f"secret-{uuid.uuid4().hex}",
    )
    return replace(settings, **(values | overrides))


def with_mutual_tls(settings: Settings, issuer: Issuer, ca: CertificateAuthority, client_rights: str) -> Settings:
    """The settings of a server that takes the issuer's tokens over TLS, and certificates that ``ca`` signed (its
    own certificate is for localhost)."""
    server_cert = ca.issue("localhost", dns="localhost")
    return with_auth(
        settings,
        issuer,
        tls_cert=str(server_cert.cert_file),
        tls_key=str(server_cert.key_file),
        tls_client_ca=str(ca.cert_file),
        auth_client_rights=client_rights,
    )


@contextlib.asynccontextmanager
async def server_for(stack: Stack, settings: Settings, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Another server beside the stack's, on its worker's task queue and Redis prefix, with ``settings``; yields
    its address."""
    server, port = await serve(settings, port=0, host=host, temporal=stack.temporal, redis_client=stack.redis)
    try:
        yield f"{host}:{port}"
    finally:
        await shutdown(server, grace=0)


@dataclass
class AuthStack:
    """A server that authenticates with the issuer's tokens, beside the stack's (which authenticates no one)."""

    stack: Stack
    issuer: Issuer
    address: str

    def client(self, token: str | None) -> AgentRunClient:
        """A client sending ``token``; it gives up at once on UNAVAILABLE, so that a refusal shows."""
        return AgentRunClient(self.address, token=token, retry_budget_seconds=0)


@pytest.fixture
async def auth_stack(stack: Stack, issuer: Issuer) -> AsyncIterator[AuthStack]:
    async with server_for(stack, with_auth(stack.settings, issuer)) as address:
        yield AuthStack(stack, issuer, address)
