"""Records workflow histories for the replay test: ``python -m tests.worker.record_histories``.

Run it when a new kind of run appears (or the workflow's inputs change shape) and
commit the files it writes. Never re-record to make a failing replay pass: a
replay failure means the new workflow code would break runs already in flight.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import openai
import redis.asyncio as redis
from temporalio.client import WorkflowFailureError
from temporalio.testing import WorkflowEnvironment

from agentrun._dev import TEMPORAL_FAST_DISPATCH, redis_server, temporal_executable
from worker import offline_model
from worker.agents import load_agents
from worker.settings import Settings
from worker.worker import build_worker
from worker.workflows import AgentRunWorkflow, RunInput

HERE = Path(__file__).parent
AGENTS = load_agents(HERE.parent / "agents.yaml")


async def main() -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_executable(), dev_server_extra_args=TEMPORAL_FAST_DISPATCH
    )
    runner, base_url = await offline_model.serve()
    model = runner.app[offline_model.MODEL_KEY]
    async with redis_server(os.environ.get("REDIS_URL")) as redis_url:
        settings = Settings(task_queue=f"record-{uuid.uuid4().hex[:8]}", redis_prefix="record:", redis_url=redis_url)
        redis_client = redis.Redis.from_url(redis_url)
        async with openai.AsyncOpenAI(base_url=base_url, api_key="offline", max_retries=0) as llm:
            worker = build_worker(env.client, settings, redis_client=redis_client, model=llm, agents=AGENTS)
            async with worker:
                scenarios = {
                    "completed": [{"text": "A short answer."}],
                    "retried_then_completed": [
                        {"text": "one two three four", "disconnect_after_chunks": 2},
                        {"text": "one two three four"},
                    ],
                    "failed": [{"error": {"status": 400, "message": "rejected"}}],
                    "cancelled": [{"text": "slow " * 500, "delay_ms": 20}],
                }
                for name, steps in scenarios.items():
                    model.add_script(name, steps)
                    run_id = f"record-{name}-{uuid.uuid4().hex[:6]}"
                    handle = await env.client.start_workflow(
                        AgentRunWorkflow.run,
                        RunInput(run_id, AGENTS["assistant"], f"{name}: go"),
                        id=run_id,
                        task_queue=settings.task_queue,
                    )
                    if name == "cancelled":
                        await asyncio.sleep(1)
                        await handle.cancel(reason="recorded cancellation")
                    try:
                        await handle.result()
                    except WorkflowFailureError:
                        pass
                    history = await handle.fetch_history()
                    (HERE / "histories" / f"{name}.json").write_text(history.to_json())
                    print(f"recorded {name}")
        await redis_client.aclose()
    await runner.cleanup()
    await env.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
