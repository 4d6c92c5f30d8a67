"""Agent definitions: the configuration file that the server reads to start runs.

A run carries a snapshot of its agent's definition, taken when it starts, so editing the file changes new runs
only. The worker reads the file too, to refuse to start when an agent names a tool it does not have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import jsonschema
import yaml

APPROVAL_POLICIES = ("auto", "require_all", "allowlist")
ON_APPROVAL_TIMEOUT = ("deny", "fail")
MODE_TIMEOUTS = {"interactive": 5 * 60, "autonomous": 60 * 60}
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# How many levels of sub-agents a run may go down unless its agent says otherwise: a planner, its specialists and
# their helpers, with one level to spare. Each level multiplies a run's cost and latency, so the limit is low.
DEFAULT_MAX_DELEGATION_DEPTH = 3
# An agent's sub-agent is offered to its model as the tool "delegate_to_<sub-agent>".
DELEGATION_TOOL_PREFIX = "delegate_to_"
# What OpenAI accepts as a function name (a delegation tool's name must be one).
_TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class AgentConfigError(ValueError):
    """The agents file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class ApprovalPolicy:
    """Which tool calls wait for a person, and for how long.

    ``auto`` asks only for the tools listed in ``require`` (and tools registered
    as needing approval); ``require_all`` asks for every call; ``allowlist`` asks
    for every call except the tools listed in ``allow``.
    """

    policy: str = "auto"
    allow: tuple[str, ...] = ()
    require: tuple[str, ...] = ()
    timeout_seconds: float = 300.0
    # What a passed deadline means: "deny" tells the model, "fail" ends the run.
    on_timeout: str = "deny"

    def requires_approval(self, tool_name: str, *, flagged_by_tool: bool) -> bool:
        if self.policy == "require_all":
            return True
        if self.policy == "allowlist":
            return tool_name not in self.allow
        return flagged_by_tool or tool_name in self.require


@dataclass(frozen=True)
class AgentConfig:
    """One agent: what it is told, which model and tools it uses, and its limits."""

    name: str
    model: str
    system_prompt: str = ""
    description: str = ""
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    reasoning_effort: str | None = None
    tools: tuple[str, ...] = ()
    approval: ApprovalPolicy = field(default_factory=ApprovalPolicy)
    max_iterations: int = 10
    # "interactive" runs time out after 5 minutes, "autonomous" ones after 60;
    # timeout_seconds overrides either.
    mode: str = "interactive"
    timeout_seconds: float | None = None
    # A JSON schema for the answer; the run's result then carries the parsed JSON.
    output_schema: dict[str, Any] | None = None
    history_max_messages: int = 50
    history_ttl_seconds: int = 7 * 24 * 3600
    # How many times a model call is tried while the endpoint is unreachable, overloaded or rate limited
    # (1, 2, 4 ... 60 s apart, or as its Retry-After says) before the run fails.
    model_attempts: int = 10
    # Whether traces record prompts, completions, and tool arguments and results. Off by default: they may hold
    # secrets and personal data.
    trace_content: bool = False
    # Agents this one may hand a task to: each is offered to its model as a delegation tool, and a call runs the
    # sub-agent as a child run whose events go to the root run's stream.
    sub_agents: tuple[str, ...] = ()
    # The task queue of this agent's runs when another agent delegates to it, so that workers of its own can serve
    # it; None: the root run's task queue.
    task_queue: str | None = None
    # How many levels of sub-agents a run of this agent may go down (its children are level 1). The limit of the
    # run's root agent holds at every level: an agent at the limit is offered no delegation tools.
    max_delegation_depth: int = DEFAULT_MAX_DELEGATION_DEPTH

    def run_timeout_seconds(self) -> float:
        return self.timeout_seconds if self.timeout_seconds is not None else MODE_TIMEOUTS[self.mode]


_FIELDS = {f.name for f in fields(AgentConfig)} - {"name"}
_APPROVAL_FIELDS = {f.name for f in fields(ApprovalPolicy)}


def load_agents(path: str | Path) -> dict[str, AgentConfig]:
    """Reads the agents file; every problem raises AgentConfigError naming where it is."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AgentConfigError(f"agents file {path} does not exist (set AGENTRUN_AGENTS_FILE)") from None
    except yaml.YAMLError as err:
        raise AgentConfigError(f"agents file {path} is not valid YAML: {err}") from None
    agents = (document or {}).get("agents") if isinstance(document, dict) else None
    if not isinstance(agents, dict) or not agents:
        raise AgentConfigError(f"agents file {path} must have a non-empty 'agents' mapping")
    loaded = {}
    for name, spec in agents.items():
        where = f"{path}: agent {name!r}"
        try:
            loaded[str(name)] = _agent(str(name), spec)
        except (TypeError, ValueError) as err:
            raise AgentConfigError(f"{where}: {err}") from None
    _check_sub_agents(path, loaded)
    return loaded


def delegation_tool_name(sub_agent: str) -> str:
    """The name of the tool through which a model hands a task to ``sub_agent``."""
    return DELEGATION_TOOL_PREFIX + sub_agent


def sub_agent_snapshot(agents: dict[str, AgentConfig], name: str) -> dict[str, AgentConfig]:
    """The definitions of every agent that a run of ``name`` may delegate to, directly or further down: a run
    carries them from its start, as it carries its own."""
    snapshot: dict[str, AgentConfig] = {}
    waiting = list(agents[name].sub_agents)
    while waiting:
        sub = waiting.pop()
        if sub not in snapshot:
            snapshot[sub] = agents[sub]
            waiting += agents[sub].sub_agents
    return snapshot


def _check_sub_agents(path: Path, agents: dict[str, AgentConfig]) -> None:
    """Every sub-agent exists, can be named as a tool, and no agent reaches itself through its sub-agents."""
    for agent in agents.values():
        where = f"{path}: agent {agent.name!r}"
        for sub in agent.sub_agents:
            if sub not in agents:
                known = ", ".join(sorted(agents))
                raise AgentConfigError(f"{where}: sub_agents names unknown agent {sub!r}; the agents are: {known}")
            tool_name = delegation_tool_name(sub)
            if not _TOOL_NAME_PATTERN.match(tool_name):
                raise AgentConfigError(
                    f"{where}: sub-agent {sub!r} cannot be offered as tool {tool_name!r}: a tool name is 1 to 64 "
                    "letters, digits, '_' or '-'"
                )
            if tool_name in agent.tools:
                raise AgentConfigError(f"{where}: tool {tool_name!r} is the name of its delegation to {sub!r}")
    # Depth-first from every agent; an agent met again on the path it was reached by closes a cycle.
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            raise AgentConfigError(f"{path}: sub-agents form a cycle: {cycle}")
        if name in done:
            return
        for sub in agents[name].sub_agents:
            visit(sub, [*trail, name])
        done.add(name)

    for name in agents:
        visit(name, [])


def _agent(name: str, spec: Any) -> AgentConfig:
    if not isinstance(spec, dict):
        raise ValueError("must be a mapping")
    spec = dict(spec)
    unknown = set(spec) - _FIELDS
    if unknown:
        raise ValueError(f"has unknown keys {sorted(unknown)}")
    if not isinstance(spec.get("model"), str) or not spec["model"]:
        raise ValueError("needs a 'model' name")
    # YAML reads "0" as an int; the dataclass says float, which is what Temporal's converter gives back.
    for key in ("temperature", "top_p", "timeout_seconds"):
        if isinstance(spec.get(key), int):
            spec[key] = float(spec[key])
    spec["tools"] = tuple(_names(spec.get("tools", []), "tools"))
    spec["sub_agents"] = tuple(_names(spec.get("sub_agents", []), "sub_agents", "agent names"))
    approval = spec.get("approval", {})
    if not isinstance(approval, dict) or set(approval) - _APPROVAL_FIELDS:
        raise ValueError(f"'approval' must be a mapping of {sorted(_APPROVAL_FIELDS)}")
    approval = dict(approval)
    approval["allow"] = tuple(_names(approval.get("allow", []), "approval.allow"))
    approval["require"] = tuple(_names(approval.get("require", []), "approval.require"))
    if "timeout_seconds" in approval:
        approval["timeout_seconds"] = float(approval["timeout_seconds"])
    spec["approval"] = ApprovalPolicy(**approval)
    agent = AgentConfig(name=name, **spec)
    _check(agent)
    return agent


def _names(value: Any, key: str, what: str = "tool names") -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"'{key}' must be a list of {what}")
    return value


def _check(agent: AgentConfig) -> None:
    if agent.approval.policy not in APPROVAL_POLICIES:
        raise ValueError(f"approval.policy must be one of {', '.join(APPROVAL_POLICIES)}")
    if agent.approval.on_timeout not in ON_APPROVAL_TIMEOUT:
        raise ValueError(f"approval.on_timeout must be one of {', '.join(ON_APPROVAL_TIMEOUT)}")
    if agent.approval.timeout_seconds <= 0:
        raise ValueError("approval.timeout_seconds must be positive")
    if agent.mode not in MODE_TIMEOUTS:
        raise ValueError(f"mode must be one of {', '.join(MODE_TIMEOUTS)}")
    if agent.timeout_seconds is not None and agent.timeout_seconds <= 0:
        raise ValueError("timeout_seconds must be positive")
    if not isinstance(agent.max_iterations, int) or agent.max_iterations < 1:
        raise ValueError("max_iterations must be a positive integer")
    if agent.reasoning_effort is not None and agent.reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}")
    if not isinstance(agent.trace_content, bool):
        raise ValueError("trace_content must be true or false")
    if not isinstance(agent.model_attempts, int) or agent.model_attempts < 1:
        raise ValueError("model_attempts must be a positive integer")
    if agent.task_queue is not None and (not isinstance(agent.task_queue, str) or not agent.task_queue.strip()):
        raise ValueError("task_queue must be a non-empty string")
    depth = agent.max_delegation_depth
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError("max_delegation_depth must be a non-negative integer")
    if agent.history_max_messages < 1 or agent.history_ttl_seconds < 1:
        raise ValueError("history_max_messages and history_ttl_seconds must be positive")
    if agent.output_schema is not None:
        try:
            jsonschema.Draft202012Validator.check_schema(agent.output_schema)
        except jsonschema.SchemaError as err:
            raise ValueError(f"output_schema is not a valid JSON schema: {err.message}") from None
