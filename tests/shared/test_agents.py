"""The agents file: what loads, and the errors that name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.agents import AgentConfigError, load_agents

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


def test_approvers_restrict_an_agents_approvals(tmp_path: Path) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text("agents:\n  a: {model: m, approval: {policy: require_all, approvers: [ada, grace]}}")
    assert load_agents(path)["a"].approval.approvers == ("ada", "grace")
