"""Agent definitions: the configuration file that the server reads to start runs.

A run carries a snapshot of its agent's definition, taken when it starts, so editing the file changes new runs
only. The worker reads the file too, to refuse to start when an agent names a tool it does not have, and to
connect to the MCP servers that its ``mcp_servers`` section defines and agents use.

A run's snapshot crosses Temporal in every payload, so its annotations are real types, as in ``shared.contract``.
"""

import fnmatch
import os
import re
from collections.abc import Mapping
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
    # Who may decide this agent's approvals (authenticated subjects); empty: anyone with the right to decide.
    approvers: tuple[str, ...] = ()

    def requires_approval(self, tool_name: str, *, flagged_by_tool: bool) -> bool:
        if self.policy == "require_all":
            return True
        if self.policy == "allowlist":
            return tool_name not in self.allow
        return flagged_by_tool or tool_name in self.require


@dataclass(frozen=True)
class McpServerUse:
    """An agent's use of an MCP server: which of its tools the model is offered.

    ``allow`` and ``deny`` hold tool names as the server names them, or shell-style patterns (``read_*``); an
    empty ``allow`` lets every tool through, and ``deny`` wins over ``allow``.
    """

    server: str
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def admits(self, tool: str) -> bool:
        if any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.deny):
            return False
        return not self.allow or any(fnmatch.fnmatchcase(tool, pattern) for pattern in self.allow)


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
    # The MCP servers whose tools the model is offered (as mcp_<server>_<tool>), filtered.
    mcp_servers: tuple[McpServerUse, ...] = ()
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
    # A run continues as new (same run, a fresh Temporal history) between two rounds once its history has this many
    # events or bytes, or when Temporal suggests it. Temporal fails a run at 51,200 events or 50 MB and warns from
    # 10,240 events or 10 MB: these stay below the warnings, with room for any one round to finish.
    continue_as_new_after_events: int = 8000
    continue_as_new_after_bytes: int = 8 << 20

    def run_timeout_seconds(self) -> float:
        return self.timeout_seconds if self.timeout_seconds is not None else MODE_TIMEOUTS[self.mode]


_FIELDS = {f.name for f in fields(AgentConfig)} - {"name"}
_APPROVAL_FIELDS = {f.name for f in fields(ApprovalPolicy)}


def load_agents(path: str | Path) -> dict[str, AgentConfig]:
    """Reads the agents file; every problem raises AgentConfigError naming where it is."""
    return _load(Path(path))[0]


def load_mcp_servers(path: str | Path) -> "dict[str, McpServerConfig]":
    """The MCP servers the agents file defines (checked as load_agents checks the whole file)."""
    return _load(Path(path))[1]


def _load(path: Path) -> "tuple[dict[str, AgentConfig], dict[str, McpServerConfig]]":
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AgentConfigError(f"agents file {path} does not exist (set AGENTRUN_AGENTS_FILE)") from None
    except yaml.YAMLError as err:
        raise AgentConfigError(f"agents file {path} is not valid YAML: {err}") from None
    agents = (document or {}).get("agents") if isinstance(document, dict) else None
    if not isinstance(agents, dict) or not agents:
        raise AgentConfigError(f"agents file {path} must have a non-empty 'agents' mapping")
    servers_spec = document.get("mcp_servers") or {}
    if not isinstance(servers_spec, dict):
        raise AgentConfigError(f"{path}: 'mcp_servers' must be a mapping of server names to their settings")
    servers = {}
    for name, spec in servers_spec.items():
        try:
            servers[str(name)] = _mcp_server(str(name), spec)
        except (TypeError, ValueError) as err:
            raise AgentConfigError(f"{path}: mcp_servers: {name!r}: {err}") from None
    loaded = {}
    for name, spec in agents.items():
        where = f"{path}: agent {name!r}"
        try:
            loaded[str(name)] = agent = _agent(str(name), spec)
            for use in agent.mcp_servers:
                if use.server not in servers:
                    defined = ", ".join(sorted(servers)) or "none"
                    raise ValueError(
                        f"mcp_servers: {use.server!r} is not defined in the file's mcp_servers (defined: {defined})"
                    )
        except (TypeError, ValueError) as err:
            raise AgentConfigError(f"{where}: {err}") from None
    _check_sub_agents(path, loaded)
    return loaded, servers


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


def _mapping(spec: Any, known: set[str]) -> dict[str, Any]:
    """A copy of one entry of the file, refusing keys it does not know."""
    if not isinstance(spec, dict):
        raise ValueError("must be a mapping")
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"has unknown keys {sorted(unknown)} (known: {', '.join(sorted(known))})")
    return dict(spec)


def _agent(name: str, spec: Any) -> AgentConfig:
    spec = _mapping(spec, _FIELDS)
    if not isinstance(spec.get("model"), str) or not spec["model"]:
        raise ValueError("needs a 'model' name")
    # YAML reads "0" as an int; the dataclass says float, which is what Temporal's converter gives back.
    for key in ("temperature", "top_p", "timeout_seconds"):
        if isinstance(spec.get(key), int):
            spec[key] = float(spec[key])
    spec["tools"] = tuple(_names(spec.get("tools", []), "tools"))
    spec["mcp_servers"] = _mcp_uses(spec.get("mcp_servers", {}))
    spec["sub_agents"] = tuple(_names(spec.get("sub_agents", []), "sub_agents", what="agent names"))
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
    if agent.task_queue is not None and (not isinstance(agent.task_queue, str) or not agent.task_queue.strip()):
        raise ValueError("task_queue must be a non-empty string")
    depth = agent.max_delegation_depth
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError("max_delegation_depth must be a non-negative integer")
    for key in ("continue_as_new_after_events", "continue_as_new_after_bytes"):
        if not isinstance(getattr(agent, key), int) or getattr(agent, key) < 1:
            raise ValueError(f"{key} must be a positive integer")
    if agent.history_max_messages < 1 or agent.history_ttl_seconds < 1:
        raise ValueError("history_max_messages and history_ttl_seconds must be positive")
    if agent.output_schema is not None:
        try:
            jsonschema.Draft202012Validator.check_schema(agent.output_schema)
        except jsonschema.SchemaError as err:
            raise ValueError(f"output_schema is not a valid JSON schema: {err.message}") from None


# What an MCP server's name may hold: it is part of its tools' names (mcp_<server>_<tool>), so no '_', which keeps
# the server of a tool name unambiguous.
_SERVER_NAME = re.compile(r"^[A-Za-z0-9-]{1,32}$")
# ${NAME} in a server's env or headers: a value the worker takes from its own environment when it connects.
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A call must end within the tool activity's 5 minutes (worker/workflows.py, TOOL_TIMEOUT), connecting included.
MAX_MCP_CALL_SECONDS = 240.0
MAX_MCP_CONNECT_SECONDS = 30.0


@dataclass(frozen=True)
class McpServerConfig:
    """How the worker reaches one MCP server: a command it starts (stdio) or a URL (streamable HTTP).

    Values may name variables of the worker's environment as ``${NAME}``; secrets must: a bearer token is
    only ever read from the variable that ``bearer_token_env`` names.
    """

    name: str
    # stdio: the process the worker starts and talks to over its stdin and stdout.
    command: str = ""
    args: tuple[str, ...] = ()
    # Added to the small environment the SDK gives the process (PATH, HOME and the like, not the worker's own).
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    # Streamable HTTP.
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    bearer_token_env: str = ""
    # Starting the process or opening the connection, and the protocol's handshake.
    connect_timeout_seconds: float = 10.0
    # One tool call, from request to result.
    call_timeout_seconds: float = 60.0
    # How often the worker lists the server's tools again; 0: only when it starts.
    refresh_seconds: float = 300.0

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"

    def describe(self) -> str:
        """Where the server is, for error messages (never a header or an environment value)."""
        if self.command:
            return f"stdio: {' '.join([self.command, *self.args])}"
        return f"streamable HTTP: {self.url}"


_MCP_SERVER_FIELDS = {f.name for f in fields(McpServerConfig)} - {"name"}


def _mcp_server(name: str, spec: Any) -> McpServerConfig:
    if not _SERVER_NAME.match(name):
        raise ValueError("the name must be 1-32 letters, digits or '-' (it becomes part of tool names)")
    spec = _mapping(spec, _MCP_SERVER_FIELDS)
    if bool(spec.get("command")) == bool(spec.get("url")):
        raise ValueError("needs either 'command' (stdio) or 'url' (streamable HTTP), not both")
    stdio_only = {"command", "args", "env", "cwd"}
    http_only = {"url", "headers", "bearer_token_env"}
    wrong = sorted(set(spec) & (http_only if spec.get("command") else stdio_only))
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do not apply to a {'stdio' if spec.get('command') else 'HTTP'} server")
    for key in ("command", "url", "cwd", "bearer_token_env"):
        if key in spec and not isinstance(spec[key], str):
            raise ValueError(f"'{key}' must be a string")
    if spec.get("url") and not re.match(r"^https?://", spec["url"]):
        raise ValueError("'url' must start with http:// or https://")
    if spec.get("bearer_token_env") and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", spec["bearer_token_env"]):
        raise ValueError("'bearer_token_env' must be the name of an environment variable, not the token")
    args = spec.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str | int | float) for a in args):
        raise ValueError("'args' must be a list of strings")
    spec["args"] = tuple(str(a) for a in args)
    for key in ("env", "headers"):
        value = spec.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str | int | float) for v in value.values()):
            raise ValueError(f"'{key}' must be a mapping of names to strings")
        spec[key] = {str(k): str(v) for k, v in value.items()}
    for header, value in spec["headers"].items():
        if header.lower() == "authorization" and not ENV_REFERENCE.search(value):
            raise ValueError(
                "headers: the Authorization header must not be written in the file: put the token in an "
                "environment variable and name it in 'bearer_token_env' (or write ${NAME})"
            )
    for key, limit in (
        ("connect_timeout_seconds", MAX_MCP_CONNECT_SECONDS),
        ("call_timeout_seconds", MAX_MCP_CALL_SECONDS),
        ("refresh_seconds", None),
    ):
        if key not in spec:
            continue
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"'{key}' must be a number of seconds")
        spec[key] = float(value)
        if key == "refresh_seconds":
            if value < 0:
                raise ValueError("'refresh_seconds' must be 0 (never) or positive")
        elif not 0 < value <= (limit or 0):
            raise ValueError(f"'{key}' must be positive and at most {limit:g} (a tool call's activity has 5 minutes)")
    return McpServerConfig(name=name, **spec)


def _mcp_uses(value: Any) -> tuple[McpServerUse, ...]:
    if not isinstance(value, dict):
        raise ValueError("'mcp_servers' must be a mapping of server names to {allow, deny} (or to nothing)")
    uses = []
    for server, filters in value.items():
        filters = filters or {}
        if not isinstance(filters, dict) or set(filters) - {"allow", "deny"}:
            raise ValueError(f"mcp_servers: {server!r} must map to {{allow: [...], deny: [...]}} or to nothing")
        uses.append(
            McpServerUse(
                str(server),
                allow=tuple(_names(filters.get("allow", []), f"mcp_servers.{server}.allow")),
                deny=tuple(_names(filters.get("deny", []), f"mcp_servers.{server}.deny")),
            )
        )
    return tuple(uses)


def resolve_env(value: str, where: str, environ: Mapping[str, str] | None = None) -> str:
    """``value`` with every ``${NAME}`` replaced from the environment; ValueError naming ``where`` and the
    variable when one is unset."""
    environ = os.environ if environ is None else environ

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ValueError(f"{where} names ${{{name}}}, which is not set in the worker's environment")
        return environ[name]

    return ENV_REFERENCE.sub(replace, value)
