"""The floor agentrun is measured against: a plain Temporal workflow with one activity making the same model call.

No events, no Redis, no gRPC: the activity streams the reply with the ``openai`` client and returns its text, with
the time its first text arrived (the earliest a durable run whose model call is an activity can have a token). Its
worker runs in its own process, as agentrun's does:
    python -m bench._plain --temporal HOST:PORT --task-queue QUEUE --model-url URL
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    import openai
    from temporalio.client import Client
    from temporalio.worker import UnsandboxedWorkflowRunner, Worker

WORKFLOW = "PlainModelCall"


@dataclass
class PlainReply:
    text: str
    first_text_at: float  # wall clock (time.time()) when the activity had the reply's first text


class Model:
    def __init__(self, base_url: str) -> None:
        self._llm = openai.AsyncOpenAI(base_url=base_url, api_key="offline", max_retries=0)

    @activity.defn
    async def call_model(self, prompt: str) -> PlainReply:
        stream = await self._llm.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True
        )
        parts, first_text_at = [], 0.0
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    first_text_at = first_text_at or time.time()
                    parts.append(choice.delta.content)
        return PlainReply("".join(parts), first_text_at)


@workflow.defn(name=WORKFLOW)
class PlainModelCall:
    @workflow.run
    async def run(self, prompt: str) -> PlainReply:
        reply: PlainReply = await workflow.execute_activity(
            "call_model", prompt, result_type=PlainReply, start_to_close_timeout=timedelta(minutes=5)
        )
        return reply


async def serve(temporal: str, task_queue: str, model_url: str) -> None:
    client = await Client.connect(temporal)
    model = Model(model_url)
    # The same runner and concurrency as agentrun's worker, so the comparison is of the work, not the settings.
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[PlainModelCall],
        activities=[model.call_model],
        workflow_runner=UnsandboxedWorkflowRunner(),
        max_concurrent_activities=1000,
        max_concurrent_workflow_tasks=200,
    )
    await worker.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temporal", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--model-url", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.temporal, args.task_queue, args.model_url))
