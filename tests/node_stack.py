"""The real stack for the TypeScript client's tests: ``python -m tests.node_stack``, from the repository's root.

It starts a Temporal dev server, uses the Redis at ``REDIS_URL`` (else an embedded Valkey), serves the offline model
(scriptable over HTTP), and runs the worker and ``--replicas`` gRPC servers as separate processes, each with its own
task queue and Redis key prefix. When everything serves, it prints one line of JSON saying where (the servers'
addresses and process ids, the model's URL, this interpreter), then keeps the stack up until its stdin closes, so
the Node test that spawned it cannot leave it behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid

import redis.asyncio as redis

from devstack.stack import redis_server, temporal_dev_server
from shared.settings import Settings
from tests.conftest import AGENTS_FILE
from tests.processes import Workers, replicas
from worker import offline_model


async def main(replica_count: int) -> None:
    unique = uuid.uuid4().hex[:12]
    async with (
        temporal_dev_server(port=None, ui_port=None, ui=False) as temporal_address,
        redis_server(os.environ.get("REDIS_URL")) as redis_url,
    ):
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
            async with replicas(settings, replica_count) as servers:
                ready = {
                    "servers": [server.address for server in servers],
                    "server_pids": [server.process.pid for server in servers],
                    "worker_pids": [process.pid for process in workers.processes],
                    "model_url": model_url,
                    "python": sys.executable,
                }
                print(json.dumps(ready), flush=True)
                await asyncio.to_thread(sys.stdin.read)  # until the test closes our stdin (or exits)
        finally:
            await workers.stop_all()
            await runner.cleanup()
            client = redis.Redis.from_url(redis_url)
            keys = [key async for key in client.scan_iter(match=f"{settings.redis_prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=1, help="how many server processes to start")
    asyncio.run(main(parser.parse_args().replicas))
