"""The types that cross the Temporal boundary between the gRPC server, the workflow and its activities.

Every workflow and activity takes one dataclass, so fields can be added without breaking histories: a field
that an older history lacks takes its default. Enums are string enums whose values are the strings earlier
histories hold. Nothing here imports ``openai``, ``redis`` or the tools.

The annotations are real types, not strings (no ``from __future__ import annotations``): Temporal's converter looks
up a dataclass's field types on every payload it decodes, and strings are compiled again each time, which doubled
the cost of decoding a run's input on the way to its first token. Only types defined further down are quoted.
"""

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from shared.agents import AgentConfig

# The server starts and updates the workflow by these names, without importing the workflow's code.
# The characters of ids (run_id, request_id, conversation_id, agent) and of tenants, which go into Temporal queries
# and Redis keys: one rule for all, matched whole (fullmatch: "$" would let a final newline in).
ID_CHARACTERS = "letters, digits and . _ : -"
ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]+")

WORKFLOW_NAME = "AgentRunWorkflow"
DECIDE_APPROVAL_UPDATE = "decide_approval"

# Memo keys the workflow writes and the server reads back: they outlive the run's Redis stream.
MEMO_AGENT = "agent"
MEMO_CONVERSATION = "conversation_id"
MEMO_LAST_SEQUENCE = "last_sequence"
MEMO_APPROVALS = "approvals"
# The tokens the run used, recorded when it ends (a cancelled run has no result to carry them).
MEMO_USAGE = "usage"
# The tokens each sub-agent below the run used (a list of AgentUsage), recorded as each delegation ends.
MEMO_SUB_AGENT_USAGE = "sub_agent_usage"
# The workflow ids of the sub-agents' runs that the run started, recorded as each starts: with theirs, where to
# look for their approvals when Redis no longer knows which run asked.
MEMO_SUB_RUNS = "sub_runs"
# When the run's first execution started; only runs that continued as new have it (Temporal's start time is then
# the latest execution's).
MEMO_STARTED = "started"
# Set by the server when it starts the run: the tenant it belongs to ("" before tenants, or without
# authentication), and who may decide its approvals (the agent's approval.approvers; empty: anyone with the right).
MEMO_TENANT = "tenant"
MEMO_APPROVERS = "approvers"
# The Keyword search attribute that ListRuns filters a tenant's runs by; the Temporal namespace must have it.
TENANT_SEARCH_ATTRIBUTE = "AgentrunTenant"

# The approver recorded when an approval's deadline decides it.
TIMEOUT_APPROVER = "agentrun:timeout"


class ToolCallStatus(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    DENIED = "denied"


class Decision(StrEnum):
    PENDING = ""
    APPROVE = "approve"
    DENY = "deny"


class RunEnd(StrEnum):
    """How a run ended; the values are the names of the terminal events."""

    COMPLETED = "run_completed"
    FAILED = "run_failed"
    CANCELLED = "run_cancelled"


class ErrorType(StrEnum):
    """The ``type`` of the ApplicationErrors that the workflow and the activities raise."""

    # An Approve that cannot apply: the server answers FAILED_PRECONDITION.
    APPROVAL_CONFLICT = "ApprovalConflict"
    # Why a run failed.
    RUN_TIMED_OUT = "RunTimedOut"
    APPROVAL_TIMED_OUT = "ApprovalTimedOut"
    INVALID_OUTPUT = "InvalidOutput"
    ACTIVITY_FAILED = "ActivityFailed"
    # A model endpoint refused the request in a way that another attempt cannot fix.
    MODEL_REJECTED = "ModelRejected"
    # A model endpoint could not answer now (unreachable, overloaded, rate limited): retried.
    MODEL_UNAVAILABLE = "ModelUnavailable"
    # Redis stayed unreachable for longer than the worker waits: retried.
    STREAM_UNAVAILABLE = "StreamUnavailable"
    # A worker lacks a tool that the run's agent snapshot needs, or has a different version of it.
    SNAPSHOT_UNSUPPORTED = "SnapshotUnsupported"
    # The service behind a tool (an MCP server) could not be reached: retried, and the last attempt tells the model.
    TOOL_UNAVAILABLE = "ToolUnavailable"
    # Redis lost the run's transcript (shared/transcripts.py): the workflow sends it whole again, or fails the run
    # when it no longer has all of it.
    TRANSCRIPT_LOST = "TranscriptLost"


@dataclass
class Usage:
    """Tokens spent by model calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.total_tokens + other.total_tokens,
        )

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(
            self.prompt_tokens - other.prompt_tokens,
            self.completion_tokens - other.completion_tokens,
            self.cached_tokens - other.cached_tokens,
            self.reasoning_tokens - other.reasoning_tokens,
            self.total_tokens - other.total_tokens,
        )


@dataclass
class AgentUsage:
    """The tokens that the runs of one agent in a run's tree used, the agent named by its path from the root."""

    agent_path: list[str]
    usage: Usage = field(default_factory=Usage)


@dataclass
class Delegation:
    """Where a sub-agent's run stands in its tree."""

    # The run's own id, its workflow id: its parent's and the delegating call's ("<parent>/<call id>").
    sub_run: str
    # The agents from the root of the run to this one.
    agent_path: list[str]
    # The root run's task queue: the queue of sub-agents that name none of their own.
    task_queue: str
    # The root agent's max_delegation_depth, which holds at every level.
    max_depth: int
    # The last sequence its parent knew published when it delegated: the run numbers its events past it.
    after_sequence: int = 0


@dataclass
class RunInput:
    """Everything a run needs, fixed when it starts: the agent definition is a snapshot.

    A sub-agent's run has the root's ``run_id``: it publishes into the root's stream, and its approvals are
    answered through the root's id.
    """

    run_id: str
    agent: AgentConfig
    input: str
    conversation_id: str = ""
    # The definitions of the agents the run may delegate to, directly or further down: part of its snapshot.
    sub_agents: dict[str, AgentConfig] = field(default_factory=dict)
    # Set for a sub-agent's run, started by a delegation of another run.
    delegation: Delegation | None = None
    # Set when the run continued as new: where the earlier executions left it.
    progress: "RunProgress | None" = None


@dataclass
class RunProgress:
    """What a run's earlier executions did, carried into the execution that continues it as new."""

    # When the first execution started: the run's timeout counts from there.
    started_at: datetime
    # The next model round.
    round: int
    last_sequence: int
    # How many batches of events the workflow has published (each is named by its number).
    batches: int
    usage: Usage
    approvals: "list[Approval]"
    tool_digests: dict[str, str]
    # The run's messages from index ``first_message`` on: all of them (0) when they are small, else those that
    # its transcript in Redis does not hold yet.
    messages: list[dict[str, Any]]
    first_message: int
    # How many messages the transcript in Redis holds.
    stored_messages: int
    # The sub-agents' runs that the earlier executions started, and what each agent path below the run used.
    sub_runs: list[str] = field(default_factory=list)
    sub_agent_usage: list[AgentUsage] = field(default_factory=list)


@dataclass
class RunResult:
    """The final answer, its cost, and the sequence number of the run's terminal event."""

    output: str
    # Everything the run's tree used, its sub-agents' runs included.
    usage: Usage = field(default_factory=Usage)
    last_sequence: int = 0
    structured_output: Any = None
    # What the sub-agents below the run used, each agent path once.
    sub_agent_usage: list[AgentUsage] = field(default_factory=list)


@dataclass
class Approval:
    """An approval request of the run and, once given, its decision."""

    approval_id: str
    call_id: str
    tool_name: str
    arguments: str
    arguments_sha256: str
    deadline: str  # RFC 3339, UTC
    sequence: int = 0
    decision: Decision = Decision.PENDING
    approver: str = ""
    reason: str = ""
    timed_out: bool = False
    # When the run asked (RFC 3339, UTC); empty in runs that predate it.
    requested_at: str = ""


@dataclass
class ApprovalAnswer:
    """An answer to an approval request, sent by Approve as a workflow update."""

    approval_id: str
    decision: Decision
    approver: str
    reason: str = ""
    # When set, the answer applies only to a request with exactly these arguments.
    arguments_sha256: str = ""


@dataclass
class ToolCallRequest:
    """A tool call the model made; ``error`` is set when it cannot run (unknown tool, bad arguments)."""

    call_id: str
    name: str
    arguments: str
    error: str = ""
    needs_approval: bool = False
    # Set when the call is a delegation: the sub-agent it hands its task to.
    sub_agent: str = ""


@dataclass
class CallModelInput:
    """One model round of a run.

    ``messages`` are the run's own messages (its user message first) from index ``first_message`` on: those that
    the run's transcript in Redis does not hold yet (all of them when ``first_message`` is 0, as in runs that
    predate transcripts). ``after_sequence`` is the last event the workflow knows was published.
    """

    run_id: str
    agent: AgentConfig
    messages: list[dict[str, Any]]
    after_sequence: int
    round: int = 0
    conversation_id: str = ""
    # The last round the agent may take: the model is told to answer without tools.
    final_round: bool = False
    # The agents from the run's root to the one calling, stamped on every event.
    agent_path: list[str] = field(default_factory=list)
    # The tools' schema digests that the run's first round used; empty in the first round.
    tool_digests: dict[str, str] = field(default_factory=dict)
    # What the run's earlier rounds cost: a round whose reply is the run's answer ends the run with the total.
    usage_before: Usage = field(default_factory=Usage)
    # The sub-agents that this round offers as delegation tools: their names and descriptions.
    sub_agents: dict[str, str] = field(default_factory=dict)
    # For a sub-agent's run, its workflow id: its writes to the root's stream are named after it, and its answer
    # goes back to its parent instead of ending the stream. Empty for a root run.
    sub_run: str = ""
    first_message: int = 0


@dataclass
class ModelReply:
    """What the model answered, what it cost, and the last event sequence the round published."""

    text: str
    usage: Usage
    last_sequence: int
    # The assistant message to add to the run's messages.
    message: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[ToolCallRequest] = field(default_factory=list)
    # With an output schema: the parsed answer, or why it does not fit the schema.
    structured_output: Any = None
    output_error: str = ""
    # The schema digest of every tool of the agent, as this round offered them: the run's tool snapshot.
    tool_digests: dict[str, str] = field(default_factory=dict)
    # The sequence of the run_completed event that this round published, its reply being the run's answer; 0 when
    # the workflow ends the run (as it did for every round before rounds could).
    ended_run: int = 0


@dataclass
class RunToolInput:
    """One tool call to execute."""

    run_id: str
    call_id: str
    name: str
    arguments: str
    after_sequence: int
    agent_path: list[str] = field(default_factory=list)
    # The tool's schema digest in the run's snapshot; empty for runs that predate snapshots of tools.
    tool_digest: str = ""
    # Whether the call's arguments and result go into its trace (the agent's trace_content).
    trace_content: bool = False
    # As in CallModelInput.
    sub_run: str = ""


@dataclass
class ToolOutcome:
    """How a tool call ended: completed with a result, or failed with an error for the model."""

    status: ToolCallStatus
    result: str = ""
    error: str = ""
    last_sequence: int = 0


@dataclass
class ToolCallEnd:
    """The end of a tool call that the workflow itself decides: denied, not run, or a delegation's end."""

    call_id: str
    tool_name: str
    status: ToolCallStatus
    error: str = ""
    # A delegation's answer: the sub-agent's output.
    result: str = ""


@dataclass
class WorkflowEvent:
    """An event that the workflow produces itself; exactly one field is set."""

    tool_call_finished: ToolCallEnd | None = None
    approval_requested: Approval | None = None
    approval_decided: Approval | None = None


@dataclass
class PublishEventsInput:
    """Events from the workflow for the run's stream; ``once`` names the batch so a retried publish adds nothing."""

    run_id: str
    after_sequence: int
    events: list[WorkflowEvent]
    once: str
    agent_path: list[str] = field(default_factory=list)
    # As in CallModelInput: the approvals a sub-agent's run requests are answered through the root run's id.
    sub_run: str = ""


@dataclass
class RunOutcome:
    """How a run ended, as its terminal event tells it."""

    end: RunEnd
    output: str = ""
    usage: Usage = field(default_factory=Usage)
    structured_output: Any = None
    error: str = ""
    reason: str = ""


@dataclass
class PublishOutcomeInput:
    """The run's terminal event, published when the run ends."""

    run_id: str
    after_sequence: int
    outcome: RunOutcome
    # The run's conversation, released for the next run once the run has ended.
    conversation_id: str = ""
    agent_path: list[str] = field(default_factory=list)
