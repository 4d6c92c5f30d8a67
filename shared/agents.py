"""Agent definitions: the configuration file that the server reads to start runs.

A run carries a snapshot of its agent's definition, taken when it starts, so editing the file changes new runs
only. The worker reads the file too, to refuse to start when an agent names a tool it does not have.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import jsonschema
import yaml

APPROVAL_POLICIES = ("auto", "require_all", "allowlist")
ON_APPROVAL_TIMEOUT = ("deny", "fail")
MODE_TIMEOUTS = {"interactive": 5 * 60, "autonomous": 60 * 60}
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")


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
    # Who may decide this agent's approvals (authenticated subjects); empty: anyone with the right to decide.
    approvers: tuple[str, ...] = ()

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
    return loaded


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
    approval = spec.get("approval", {})
    if not isinstance(approval, dict) or set(approval) - _APPROVAL_FIELDS:
        raise ValueError(f"'approval' must be a mapping of {sorted(_APPROVAL_FIELDS)}")
    approval = dict(approval)
    approval["allow"] = tuple(_names(approval.get("allow", []), "approval.allow"))
    approval["require"] = tuple(_names(approval.get("require", []), "approval.require"))
    approval["approvers"] = tuple(_names(approval.get("approvers", []), "approval.approvers", what="subjects"))
    if "timeout_seconds" in approval:
        approval["timeout_seconds"] = float(approval["timeout_seconds"])
    spec["approval"] = ApprovalPolicy(**approval)
    agent = AgentConfig(name=name, **spec)
    _check(agent)
    return agent


def _names(value: Any, key: str, *, what: str = "tool names") -> list[str]:
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
    if agent.history_max_messages < 1 or agent.history_ttl_seconds < 1:
        raise ValueError("history_max_messages and history_ttl_seconds must be positive")
    if agent.output_schema is not None:
        try:
            jsonschema.Draft202012Validator.check_schema(agent.output_schema)
        except jsonschema.SchemaError as err:
            raise ValueError(f"output_schema is not a valid JSON schema: {err.message}") from None
