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
        ("agents:\n  a: {model: m, continue_as_new_after_events: 0}", "continue_as_new_after_events must be"),
        ("agents:\n  a: {model: m, continue_as_new_after_bytes: 1.5}", "continue_as_new_after_bytes must be"),
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
