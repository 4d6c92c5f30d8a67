"""A run executes the agent snapshot it started with: a deploy of the agents file changes new runs only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agentrun.v1 import agent_service_pb2 as pb
from tests.agent_service.test_agent_loop import approve, calls, until
from tests.agent_service.test_runs import collect
from tests.conftest import AGENTS_FILE, Stack
from worker.tools import Tool, ToolRegistry, calculator, tool


def agents_file(directory: Path, edit: Any) -> Path:
    """A copy of the test agents file with ``edit`` applied to its parsed content."""
    document = yaml.safe_load(AGENTS_FILE.read_text())
    edit(document["agents"])
    path = directory / "agents.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def test_a_changed_prompt_reaches_new_runs_only(stack: Stack, tmp_path: Path) -> None:
    key = stack.model.script(calls(("echo", {"text": "hi"})), {"text": "done"})
    run_id = await stack.client.start_run("patient", key)
    _, requested = await until(stack, run_id, "approval_requested")

    def new_prompt(agents: dict[str, Any]) -> None:
        agents["patient"]["system_prompt"] = "You are the new prompt."

    await stack.restart_worker(agents_file=agents_file(tmp_path, new_prompt))
    await approve(stack, run_id, requested.approval_requested.approval_id, pb.APPROVAL_DECISION_APPROVE)
    events = await collect(stack, run_id, after=requested.sequence)

    assert events[-1].run_completed.output == "done"
    first_round, second_round = stack.model.server.requests_for(key)
    # The snapshot has no system prompt; the worker that ran the second round read one from its file.
    assert first_round["messages"][0]["role"] == "user"
    assert second_round["messages"][0]["role"] == "user"
    assert "You are the new prompt." not in str(second_round["messages"])


@tool(name="echo")
def echo_twice(text: str, times: int) -> str:
    """Return the text several times."""
    return text * times


@pytest.mark.parametrize(
    ("tools", "problem"),
    [
        ([calculator], "tool 'echo' and this worker lacks it"),
        ([calculator, echo_twice], "tool 'echo' and this worker has a version with other arguments"),
    ],
    ids=["tool removed", "tool changed"],
)
async def test_a_worker_without_a_tool_the_snapshot_needs_fails_the_run_naming_it(
    stack: Stack, tmp_path: Path, tools: list[Tool], problem: str
) -> None:
    key = stack.model.script(calls(("echo", {"text": "hi"})), {"text": "done"})
    run_id = await stack.client.start_run("patient", key)
    _, requested = await until(stack, run_id, "approval_requested")

    def only_patient_without_echo(agents: dict[str, Any]) -> None:
        patient = agents["patient"]
        agents.clear()
        agents["patient"] = patient | {"tools": [t.name for t in tools if t.name != "echo"]}

    await stack.restart_worker(agents_file=agents_file(tmp_path, only_patient_without_echo), tools=ToolRegistry(tools))
    await approve(stack, run_id, requested.approval_requested.approval_id, pb.APPROVAL_DECISION_APPROVE)
    events = await collect(stack, run_id, after=requested.sequence)

    assert problem in events[-1].run_failed.error
    assert (await stack.client.get_run(run_id)).state == pb.RUN_STATE_FAILED
