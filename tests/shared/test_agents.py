"""The agents file: what loads, and the errors that name what is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.agents import DEFAULT_MAX_DELEGATION_DEPTH, AgentConfigError, load_agents, sub_agent_snapshot

REPO = Path(__file__).parent.parent.parent


def test_the_shipped_file_defines_the_assistant() -> None:
    agents = load_agents(REPO / "agents.yaml")
    assert agents["assistant"].model
    assert agents["assistant"].system_prompt


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("agents: {}", "non-empty 'agents'"),
        ("agents:\n  a: {}", "needs a 'model'"),
        ("agents:\n  a: {model: m, colour: red}", "unknown keys ['colour']"),
        ("agents:\n  a: [1]", "must be a mapping"),
        ("agents: [", "not valid YAML"),
        ("agents:\n  a: {model: m, continue_as_new_after_events: 0}", "continue_as_new_after_events must be"),
        ("agents:\n  a: {model: m, continue_as_new_after_bytes: 1.5}", "continue_as_new_after_bytes must be"),
        ("agents:\n  a: {model: m, approval: {approvers: ada}}", "'approval.approvers' must be a list of subjects"),
    ],
)
def test_malformed_files_are_reported(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    with pytest.raises(AgentConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        load_agents(path)


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="does not exist"):
        load_agents(tmp_path / "nope.yaml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    return path


def test_sub_agents_load_with_their_queue_depth_and_snapshot(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
agents:
  planner: {model: m, sub_agents: [researcher, writer], max_delegation_depth: 2}
  researcher: {model: m, sub_agents: [fetcher], task_queue: research}
  writer: {model: m, sub_agents: [fetcher]}
  fetcher: {model: m}
  alone: {model: m}
""",
    )
    agents = load_agents(path)

    assert agents["planner"].sub_agents == ("researcher", "writer")
    assert agents["planner"].max_delegation_depth == 2
    assert agents["researcher"].task_queue == "research"
    assert agents["writer"].task_queue is None
    assert agents["alone"].max_delegation_depth == DEFAULT_MAX_DELEGATION_DEPTH
    # A diamond is no cycle, and the snapshot holds every agent below the root once.
    assert set(sub_agent_snapshot(agents, "planner")) == {"researcher", "writer", "fetcher"}
    assert sub_agent_snapshot(agents, "fetcher") == {}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "agents:\n  planner: {model: m, sub_agents: [researcher]}\n  researcher: {model: m, sub_agents: [planner]}",
            "sub-agents form a cycle: planner -> researcher -> planner",
        ),
        ("agents:\n  a: {model: m, sub_agents: [a]}", "sub-agents form a cycle: a -> a"),
        (
            "agents:\n  a: {model: m, sub_agents: [b]}\n  b: {model: m, sub_agents: [c]}\n"
            "  c: {model: m, sub_agents: [b]}",
            "sub-agents form a cycle: b -> c -> b",
        ),
        ("agents:\n  a: {model: m, sub_agents: [nobody]}", "agent 'a': sub_agents names unknown agent 'nobody'"),
        ("agents:\n  a: {model: m, sub_agents: researcher}", "'sub_agents' must be a list of agent names"),
        (
            "agents:\n  a: {model: m, sub_agents: [b.c]}\n  b.c: {model: m}",
            "cannot be offered as tool 'delegate_to_b.c'",
        ),
        (
            "agents:\n  a: {model: m, sub_agents: [b], tools: [delegate_to_b]}\n  b: {model: m}",
            "tool 'delegate_to_b' is the name of its delegation to 'b'",
        ),
        ("agents:\n  a: {model: m, max_delegation_depth: -1}", "max_delegation_depth must be a non-negative integer"),
        ("agents:\n  a: {model: m, task_queue: ''}", "task_queue must be a non-empty string"),
    ],
)
def test_bad_sub_agents_are_rejected_when_the_file_loads(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(AgentConfigError, match=re.escape(problem)):
        load_agents(write(tmp_path, text))


def test_approvers_restrict_an_agents_approvals(tmp_path: Path) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text("agents:\n  a: {model: m, approval: {policy: require_all, approvers: [ada, grace]}}")
    assert load_agents(path)["a"].approval.approvers == ("ada", "grace")
