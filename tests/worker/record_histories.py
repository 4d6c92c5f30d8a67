"""Records workflow histories for the replay test: ``python -m tests.worker.record_histories``.

It records only the scenarios that have no file yet. Add a scenario when the
workflow gains a new path, run this, and commit the new file. Never re-record an
existing file to make a replay pass: a replay failure means the new workflow
code would break runs already in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import redis.asyncio as redis
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from devstack.stack import TEMPORAL_FAST_DISPATCH, redis_server, temporal_executable
from shared.agents import load_agents, sub_agent_snapshot
from shared.contract import DECIDE_APPROVAL_UPDATE, Approval, ApprovalAnswer, Decision, RunInput
from shared.settings import Settings
from worker import offline_model
from worker.worker import build_worker
from worker.workflows import AgentRunWorkflow

HERE = Path(__file__).parent
AGENTS = load_agents(HERE.parent / "agents.yaml")


async def cancel_soon(handle: WorkflowHandle[Any, Any]) -> None:
    await asyncio.sleep(1)
    await handle.cancel(reason="recorded cancellation")


async def approve_first(handle: WorkflowHandle[Any, Any]) -> None:
    for _ in range(100):
        approvals = (await (await handle.describe()).memo()).get("approvals", [])
        if approvals:
            decision = ApprovalAnswer(approvals[0]["approval_id"], Decision.APPROVE, "recorder", "fine")
            try:
                await handle.execute_update(DECIDE_APPROVAL_UPDATE, decision, result_type=Approval)
                return
            except WorkflowUpdateFailedError:
                pass
        await asyncio.sleep(0.05)


def call(name: str, **arguments: object) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


@dataclass
class Scenario:
    agent: str
    steps: list[dict[str, Any]]
    conversation_id: str = ""
    # Given a handle to the run's latest execution.
    act: Callable[[WorkflowHandle[Any, Any]], Awaitable[None]] | None = None
    # The scripts of sub-agents' runs, by key: a delegation's task names its sub-agent's script. Each child run's
    # history is recorded too, as "<scenario>.child<n>.json".
    sub_scripts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Record the run's last execution rather than its first (they differ when it continued as new).
    last_execution: bool = False


CONTINUED_STEPS = [call("calculator", expression="6*7"), call("echo", text="hi"), {"text": "done"}]

SCENARIOS = {
    # Recorded before tools existed: they keep the single-round path replayable.
    "completed": Scenario("assistant", [{"text": "A short answer."}]),
    "retried_then_completed": Scenario(
        "assistant",
        [{"text": "one two three four", "disconnect_after_chunks": 2}, {"text": "one two three four"}],
    ),
    "failed": Scenario("assistant", [{"error": {"status": 400, "message": "rejected"}}]),
    "cancelled": Scenario("assistant", [{"text": "slow " * 500, "delay_ms": 20}], act=cancel_soon),
    # The agent loop.
    "tools_two_rounds": Scenario("tools", [call("calculator", expression="2+3"), call("nope"), {"text": "It is 5."}]),
    "approval_approved": Scenario("careful", [call("echo", text="hi"), {"text": "done"}], act=approve_first),
    "approval_timed_out": Scenario("careful", [call("echo", text="hi"), {"text": "no answer"}]),
    "approval_failed_run": Scenario("strict", [call("echo", text="hi")]),
    "max_iterations": Scenario("limited", [call("echo", text="1"), call("echo", text="2")]),
    "conversation": Scenario("chat", [{"text": "Hello again."}], conversation_id="recorded-conversation"),
    "run_timed_out": Scenario("hasty", [{"text": "slow " * 200, "delay_ms": 20}]),
    "structured_output": Scenario("json", [{"text": '{"city": "Oslo", "population": 700000}'}]),
    # Since the model round that answers publishes run_completed itself.
    "answer_ends_run": Scenario("tools", [call("calculator", expression="2+3"), {"text": "It is 5."}]),
    "answer_ends_run_in_conversation": Scenario(
        "chat", [{"text": "Hello once more."}], conversation_id="recorded-conversation-2"
    ),
    # Sub-agents: a child run that delegates again and calls a tool beside it, and a child run that fails.
    "delegation": Scenario(
        "planner",
        [call("delegate_to_researcher", task="delegated-research: look it up"), {"text": "Planned."}],
        sub_scripts={
            "delegated-research": [
                {
                    "tool_calls": [
                        {"name": "delegate_to_fetcher", "arguments": {"task": "delegated-fetch: get it"}},
                        {"name": "echo", "arguments": {"text": "noted"}},
                    ]
                },
                {"text": "Researched."},
            ],
            "delegated-fetch": [{"text": "Fetched."}],
        },
    ),
    "sub_agent_error": Scenario(
        "planner",
        [call("delegate_to_researcher", task="errored-research: try"), {"text": "It did not work."}],
        sub_scripts={"errored-research": [{"error": {"status": 400, "message": "rejected"}}]},
    ),
    # Continue-as-new after every round: the first execution ends by continuing; the last one starts from the
    # progress the others carried (an approval decided in the second among it) and completes.
    "continued_first_execution": Scenario("stepwise", CONTINUED_STEPS, act=approve_first),
    "continued_last_execution": Scenario("stepwise", CONTINUED_STEPS, act=approve_first, last_execution=True),
}


def without_stack_traces(history_json: str) -> str:
    """The history without the failures' stack traces: they name paths of the recording machine, and replay
    does not read them."""

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: "" if key == "stackTrace" else scrub(item) for key, item in value.items()}
        if isinstance(value, list):
            return [scrub(item) for item in value]
        return value

    return json.dumps(scrub(json.loads(history_json)), indent=2) + "\n"


async def children(client: Client, workflow_id: str) -> list[str]:
    """The ids of the child workflows that a workflow started, and theirs, depth first."""
    found = []
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.HasField("child_workflow_execution_started_event_attributes"):
            child = event.child_workflow_execution_started_event_attributes.workflow_execution.workflow_id
            found += [child, *await children(client, child)]
    return found


async def main() -> None:
    missing = {name: s for name, s in SCENARIOS.items() if not (HERE / "histories" / f"{name}.json").exists()}
    if not missing:
        print("every scenario has a recorded history")
        return
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_executable(), dev_server_extra_args=TEMPORAL_FAST_DISPATCH
    )
    runner, base_url = await offline_model.serve()
    model = runner.app[offline_model.MODEL_KEY]
    async with redis_server(os.environ.get("REDIS_URL")) as redis_url:
        settings = Settings(
            task_queue=f"record-{uuid.uuid4().hex[:8]}",
            redis_prefix="record:",
            redis_url=redis_url,
            tool_modules=("tests.worker.extra_tools",),
        )
        redis_client = redis.Redis.from_url(redis_url)
        async with openai.AsyncOpenAI(base_url=base_url, api_key="offline", max_retries=0) as llm:
            worker = build_worker(
                env.client, settings, redis_client=redis_client, model=llm, agents=AGENTS, sandboxed=True
            )
            async with worker:
                for name, scenario in missing.items():
                    model.add_script(name, scenario.steps)
                    for key, steps in scenario.sub_scripts.items():
                        model.add_script(key, steps)
                    run_id = f"record-{name}-{uuid.uuid4().hex[:6]}"
                    handle = await env.client.start_workflow(
                        AgentRunWorkflow.run,
                        RunInput(
                            run_id,
                            AGENTS[scenario.agent],
                            f"{name}: go",
                            scenario.conversation_id,
                            sub_agent_snapshot(AGENTS, scenario.agent),
                        ),
                        id=run_id,
                        task_queue=settings.task_queue,
                    )
                    latest = env.client.get_workflow_handle(run_id)
                    if scenario.act is not None:
                        await scenario.act(latest)
                    try:
                        await handle.result()
                    except WorkflowFailureError:
                        pass
                    first = env.client.get_workflow_handle(run_id, run_id=handle.first_execution_run_id)
                    history = await (latest if scenario.last_execution else first).fetch_history()
                    (HERE / "histories" / f"{name}.json").write_text(without_stack_traces(history.to_json()))
                    for number, child in enumerate(await children(env.client, handle.id), 1):
                        child_history = await env.client.get_workflow_handle(child).fetch_history()
                        path = HERE / "histories" / f"{name}.child{number}.json"
                        path.write_text(without_stack_traces(child_history.to_json()))
                    print(f"recorded {name}")
        await redis_client.aclose()
    await runner.cleanup()
    await env.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
