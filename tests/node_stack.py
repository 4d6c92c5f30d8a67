"""The real stack for the TypeScript client's tests: ``python -m tests.node_stack``, from the repository's root.

It starts a Temporal dev server, uses the Redis at ``REDIS_URL`` (else an embedded Valkey), serves the offline model
(scriptable over HTTP), and runs the worker and ``--replicas`` gRPC servers as separate processes, each with its own
task queue and Redis key prefix. When everything serves, it prints one line of JSON saying where (the servers'
addresses and process ids, the model's URL, this interpreter), then keeps the stack up until its stdin closes, so
the Node test that spawned it cannot leave it behind. With ``--auth`` the servers take tokens of a test issuer, and
the line carries some: ``ada`` (tenant acme, every right), ``reader`` (acme, runs:read) and ``eve`` (globex).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

import redis.asyncio as redis

from devstack.stack import redis_server, temporal_dev_server
from shared.settings import Settings
from tests.conftest import AGENTS_FILE
from tests.credentials import AUDIENCE, ISSUER, Issuer
from tests.processes import Workers, replicas
from worker import offline_model


async def main(replica_count: int, auth: bool) -> None:
    unique = uuid.uuid4().hex[:12]
    async with (
        temporal_dev_server(port=None, ui_port=None, ui=False) as temporal_address,
        redis_server(os.environ.get("REDIS_URL")) as redis_url,
    ):
        key_folder = tempfile.TemporaryDirectory()
        issuer = Issuer(Path(key_folder.name) / "jwks.json")
        auth_env = {
            "AGENTRUN_AUTH_JWKS": str(issuer.jwks_file),
            "AGENTRUN_AUTH_ISSUER": ISSUER,
            "AGENTRUN_AUTH_AUDIENCE": AUDIENCE,
            "AGENTRUN_RUN_ID_SECRET": uuid.uuid4().hex,
        }
        tokens = {
            "ada": issuer.token(expires_in=3600),
            "reader": issuer.token("reader", scope="runs:read", expires_in=3600),
            "eve": issuer.token("eve", tenant="globex", expires_in=3600),
        }
        runner, model_url = await offline_model.serve()
        settings = Settings(
            temporal_address=temporal_address,
            task_queue=f"test-node-{unique}",
            redis_url=redis_url,
            redis_prefix=f"test:node-{unique}:",
            agents_file=str(AGENTS_FILE),
            openai_base_url=model_url,
            openai_api_key="offline",
            tool_modules=("tests.worker.extra_tools",),
        )
        workers = Workers(settings)
        try:
            await workers.start()
            async with replicas(settings, replica_count, **(auth_env if auth else {})) as servers:
                ready = {
                    "servers": [server.address for server in servers],
                    "server_pids": [server.process.pid for server in servers],
                    "worker_pids": [process.pid for process in workers.processes],
                    "model_url": model_url,
                    "python": sys.executable,
                    "tokens": tokens if auth else {},
                }
                print(json.dumps(ready), flush=True)
                await asyncio.to_thread(sys.stdin.read)  # until the test closes our stdin (or exits)
        finally:
            await workers.stop_all()
            await runner.cleanup()
            key_folder.cleanup()
            client = redis.Redis.from_url(redis_url)
            keys = [key async for key in client.scan_iter(match=f"{settings.redis_prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=1, help="how many server processes to start")
    parser.add_argument("--auth", action="store_true", help="servers that take the tokens printed")
    args = parser.parse_args()
    asyncio.run(main(args.replicas, args.auth))
