"""The workflow code must replay every committed history: runs in flight survive a deploy."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.worker.record_histories import SCENARIOS
from worker.worker import SANDBOXED_RUNNER
from worker.workflows import AgentRunWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_every_scenario_has_a_history() -> None:
    assert {p.stem for p in HISTORIES} == set(SCENARIOS)


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())  # noqa: ASYNC240 (a small local file)
    # In the sandbox, as the test workers run: its determinism checks guard the workflow code.
    await Replayer(workflows=[AgentRunWorkflow], workflow_runner=SANDBOXED_RUNNER).replay_workflow(history)
