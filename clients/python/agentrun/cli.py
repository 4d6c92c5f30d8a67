"""The ``agentrun`` command line: a client for runs.

Installed with the service distribution, it also has the service's commands (``dev``, ``server``, ``worker``),
which that distribution adds through the ``agentrun.commands`` entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from agentrun.client import AgentRunClient, tls_credentials
from agentrun.v1 import agent_service_pb2 as pb

DEFAULT_SERVER = os.environ.get("AGENTRUN_SERVER", "127.0.0.1:50051")
# Each entry point names a function that adds commands to the parser's subcommands.
COMMANDS_ENTRY_POINT = "agentrun.commands"
# How long a command keeps trying while no server answers: enough to move past a dead replica or to ride out a
# restart, short enough that a mistake shows soon (the client library's default is 60 s).
CLI_RETRY_SECONDS = 10.0
# Tool results and errors are shown on one line each, cut to this many characters.
BRIEF_CHARS = 200


def command() -> str:
    """This command line as the user can type it: ``agentrun`` when that is on PATH, else the path of the script
    installed beside this interpreter (``.venv/bin/agentrun`` after ``make dev``)."""
    script = Path(sys.executable).parent / "agentrun"
    on_path = shutil.which("agentrun")
    if not script.exists() or (on_path and os.path.samefile(on_path, script)):
        return "agentrun"
    relative = os.path.relpath(script)
    return str(script) if relative.startswith("..") else relative


def default_approver() -> str:
    return os.environ.get("USER") or "cli"


def dev_directory(server: str) -> Path:
    """Where ``agentrun dev`` keeps what its server at ``server`` trusts and the token it makes for this user's
    CLI: one folder per address, so that dev stacks on other ports keep theirs."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "agentrun" / "dev" / server.replace(":", "-").replace("/", "-")


def _token(server: str) -> str | None:
    """AGENTRUN_TOKEN; else, for the address of a running ``agentrun dev``, the token it made for this user."""
    token = os.environ.get("AGENTRUN_TOKEN", "").strip()
    if token:
        return token
    try:
        return (dev_directory(server) / "token").read_text().strip() or None
    except OSError:
        return None


def _credentials() -> grpc.ChannelCredentials | None:
    """TLS to the server when asked for: AGENTRUN_TLS=true (the system's CAs), AGENTRUN_TLS_CA (a PEM file), and
    for mutual TLS AGENTRUN_TLS_CLIENT_CERT and AGENTRUN_TLS_CLIENT_KEY."""
    ca, cert, key = (os.environ.get(f"AGENTRUN_TLS_{name}") or None for name in ("CA", "CLIENT_CERT", "CLIENT_KEY"))
    if not (ca or cert or key or os.environ.get("AGENTRUN_TLS", "").lower() in ("1", "true", "yes")):
        return None
    try:
        return tls_credentials(ca_file=ca, cert_file=cert, key_file=key)
    except (OSError, ValueError) as err:  # a file that cannot be read, or a certificate without its key
        print(f"error: AGENTRUN_TLS_*: {err}", file=sys.stderr)
        sys.exit(2)


class _Output:
    """Writes the streamed text to stdout, starting every event line on a line of its own."""

    def __init__(self) -> None:
        self.at_line_start = True
        # Who wrote the text last: "" for the run's own agent, else the sub-agent's label.
        self._writer = ""

    def text(self, text: str, who: str = "") -> None:
        if text:
            if who != self._writer and not self.at_line_start:
                print(flush=True)  # another agent's text starts on a line of its own
            if who and (self.at_line_start or who != self._writer):
                print(who, end="")
            self._writer = who
            print(text, end="", flush=True)
            self.at_line_start = text.endswith("\n")

    def line(self, text: str, *, file: TextIO | None = None) -> None:
        if not self.at_line_start:
            print(flush=True)
        print(text, file=file or sys.stdout, flush=True)
        self.at_line_start = True


class _StdinLines:
    """The lines of stdin, read on a daemon thread.

    A prompt can be left unanswered when its approval is decided elsewhere and the run ends; a read blocked in
    asyncio.to_thread(input) would then keep the process alive until Enter. The thread reads the file
    descriptor, not sys.stdin, so it holds no lock that the interpreter needs at exit.
    """

    def __init__(self) -> None:
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.closed = False
        loop = asyncio.get_running_loop()

        def put(line: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for the line any more
                loop.call_soon_threadsafe(self._lines.put_nowait, line)

        def read() -> None:
            pending = b""
            while chunk := os.read(sys.stdin.fileno(), 4096):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    put(line.decode(errors="replace").rstrip("\r"))
            if pending:
                put(pending.decode(errors="replace"))
            put(None)

        threading.Thread(target=read, name="stdin", daemon=True).start()

    async def readline(self) -> str | None:
        """The next line without its line break, or None once stdin is closed."""
        if self.closed:
            return None
        line = await self._lines.get()
        self.closed = line is None
        return line


class _Prompter:
    """Asks about each pending approval in turn, while the stream goes on printing events.

    A prompt whose approval is decided meanwhile, by another approver or by its deadline, is withdrawn.
    """

    def __init__(self, client: AgentRunClient, run_id: str, approver: str, out: _Output, server: str | None) -> None:
        self._client = client
        self._run_id = run_id
        self._approver = approver
        self._out = out
        self._server = server
        self._turn = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._unanswered: set[str] = set()
        self._stdin: _StdinLines | None = None

    def ask(self, request: pb.ApprovalRequested) -> None:
        self._unanswered.add(request.approval_id)
        self._tasks[request.approval_id] = asyncio.create_task(self._ask(request))

    def decided(self, approval_id: str) -> None:
        if approval_id in self._unanswered:
            self._unanswered.discard(approval_id)
            self._tasks[approval_id].cancel()

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _ask(self, request: pb.ApprovalRequested) -> None:
        # A stream that replays a run's past shows requests that were decided long ago: ask only about pending ones.
        pending = (await self._client.get_run(self._run_id)).pending_approvals
        if request.approval_id not in {p.approval_id for p in pending}:
            self._unanswered.discard(request.approval_id)
            return
        async with self._turn:
            answer = await self._read(f"approve {_call(request.tool_name, request.arguments)}? [y/N/reason] ")
            self._unanswered.discard(request.approval_id)
        if answer is None:  # stdin is closed: someone else has to decide
            self._out.line(_pending(self._run_id, request, self._server))
            return
        answer = answer.strip()
        approve = answer.lower() in ("y", "yes")
        reason = "" if approve or answer.lower() in ("", "n", "no") else answer
        try:
            await self._client.approve(
                self._run_id,
                request.approval_id,
                pb.APPROVAL_DECISION_APPROVE if approve else pb.APPROVAL_DECISION_DENY,
                reason=reason,
                approver=self._approver,
                arguments_sha256=request.arguments_sha256,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                self._out.line(f"! your answer was not recorded: {err.details()}")
            else:
                self._out.line(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
                self._out.line(_pending(self._run_id, request, self._server))

    async def _read(self, prompt: str) -> str | None:
        if self._stdin is None:
            self._stdin = _StdinLines()
        if self._stdin.closed:
            return None
        self._out.text(prompt)
        answer = await self._stdin.readline()
        if sys.stdin.isatty():
            self._out.at_line_start = True  # the terminal echoed the Enter
        else:
            self._out.text(f"{answer or ''}\n")  # echoed so that a transcript shows the answer
        return answer


async def print_stream(
    client: AgentRunClient,
    run_id: str,
    *,
    after_sequence: int = 0,
    prompt: bool | None = None,
    approver: str | None = None,
    server: str | None = None,
    show_sequence: bool = False,
    out: _Output | None = None,
) -> int:
    """Prints a run's text, tool calls and approvals as they stream; returns the exit code for how the run ended.

    With ``prompt`` (by default, when stdin is a terminal) it asks about each pending approval and answers it as
    ``approver``; otherwise it prints the command that answers it. ``server`` goes into the printed commands.
    With ``show_sequence``, every event goes on a line of its own after its sequence number, the number that
    ``stream --after`` resumes from.
    """
    out = out or _Output()
    if prompt is None:
        prompt = sys.stdin.isatty()
    prompter = _Prompter(client, run_id, approver or default_approver(), out, server) if prompt else None
    # A resumed stream repeats the pending approval requests.
    requested: set[str] = set()
    # A denial is shown once, as the decision; the denied call's end says the same again.
    denied: set[str] = set()
    received = False
    try:
        async for event in client.stream_run(run_id, after_sequence=after_sequence):
            received = True
            kind = event.WhichOneof("kind")
            who = _sub_agent_label(event)
            number = (f"#{event.sequence} " if show_sequence else "") + who
            if kind == "text_delta":
                if show_sequence:
                    out.line(f"{number}{json.dumps(event.text_delta.text, ensure_ascii=False)}")
                else:
                    out.text(event.text_delta.text, who)
            elif kind == "tool_call_started":
                started = event.tool_call_started
                out.line(f"{number}→ {_call(started.tool_name, _brief(started.arguments))}")
            elif kind == "tool_call_finished":
                finished = event.tool_call_finished
                if finished.status != pb.TOOL_CALL_STATUS_DENIED or finished.call_id not in denied:
                    out.line(number + _finished(finished))
            elif kind == "approval_requested":
                request = event.approval_requested
                if request.approval_id in requested:
                    continue
                requested.add(request.approval_id)
                if prompter is not None:
                    if number:
                        out.line(number + "approval requested")
                    prompter.ask(request)
                else:
                    out.line(number + _pending(run_id, request, server))
            elif kind == "approval_decided":
                decided = event.approval_decided
                if prompter is not None:
                    prompter.decided(decided.approval_id)
                if decided.decision == pb.APPROVAL_DECISION_DENY:
                    denied.add(decided.call_id)
                out.line(number + _decided(decided))
            elif kind == "events_lost":
                first = event.events_lost.first_sequence
                out.line(f"! events {first} to {event.sequence} are no longer available", file=sys.stderr)
            elif kind == "run_completed":
                out.line(f"{number}[run {run_id} completed: {_usage(event.run_completed.usage)}]")
                return 0
            elif kind == "run_failed":
                out.line(f"{number}[run {run_id} failed: {event.run_failed.error}]", file=sys.stderr)
                return 1
            elif kind == "run_cancelled":
                reason = event.run_cancelled.reason
                out.line(f"{number}[run {run_id} cancelled{': ' + reason if reason else ''}]", file=sys.stderr)
                return 1
    finally:
        if prompter is not None:
            await prompter.close()
    if not received:
        # The run has ended and the caller has seen all of it.
        state = (await client.get_run(run_id)).state
        out.line(f"[run {run_id} {_state(state)}: no events after sequence {after_sequence}]", file=sys.stderr)
        return 0 if state == pb.RUN_STATE_COMPLETED else 1
    return 1


def _brief(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= BRIEF_CHARS else line[: BRIEF_CHARS - 1] + "…"


def _call(tool_name: str, arguments: str) -> str:
    return f"{tool_name}({arguments})"


def _usage(usage: pb.Usage) -> str:
    return f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"


def _time(timestamp: Timestamp) -> str:
    return f"{timestamp.ToDatetime(UTC).astimezone():%Y-%m-%d %H:%M:%S %Z}"


def _sub_agent_label(event: pb.RunEvent) -> str:
    """ "[researcher] " before what a sub-agent's run did ("[researcher/fetcher] " further down); "" for the root's."""
    return f"[{'/'.join(event.agent_path[1:])}] " if len(event.agent_path) > 1 else ""


def _finished(finished: pb.ToolCallFinished) -> str:
    if finished.status == pb.TOOL_CALL_STATUS_COMPLETED:
        return f"← {_brief(finished.result)}"
    if finished.status == pb.TOOL_CALL_STATUS_DENIED:
        return f"⊘ denied: {_brief(finished.error)}"
    return f"✗ {_brief(finished.error)}"


def _decided(decided: pb.ApprovalDecided) -> str:
    return _decision(decided.decision, decided.approver, decided.reason, timed_out=decided.timed_out)


def _decision(decision: pb.ApprovalDecision.ValueType, approver: str, reason: str, *, timed_out: bool = False) -> str:
    mark, verb = ("✓", "approved") if decision == pb.APPROVAL_DECISION_APPROVE else ("⊘", "denied")
    line = f"{mark} timed out, {verb}" if timed_out else f"{mark} {verb} by {approver}"
    return f"{line}: {reason}" if reason else line


def _approve_command(run_id: str, approval_id: str, server: str | None) -> str:
    address = f" --server {server}" if server and server != DEFAULT_SERVER else ""
    return f"{command()} approve {run_id} {approval_id}{address}"


def _pending(run_id: str, request: pb.ApprovalRequested, server: str | None) -> str:
    command = _approve_command(run_id, request.approval_id, server)
    return "\n".join(
        [
            f"⏸ {_call(request.tool_name, request.arguments)} waits for approval until {_time(request.deadline)}",
            f"  approve: {command}",
            f"  deny:    {command} --deny --reason '...'",
        ]
    )


@dataclass
class _Cancelled:
    """What the stream of a cancelled run tells that the run's record does not."""

    reason: str = ""
    partial_output: str = ""


async def _cancelled(client: AgentRunClient, run_id: str) -> _Cancelled:
    """The reason from the run's run_cancelled event, and the text of the answer it had begun (the text after its
    last tool call)."""
    cancelled = _Cancelled()
    text: list[str] = []
    async for event in client.stream_run(run_id):
        kind = event.WhichOneof("kind")
        if kind == "text_delta" and len(event.agent_path) <= 1:
            text.append(event.text_delta.text)
        elif kind == "tool_call_finished":
            text.clear()
        elif kind == "run_cancelled":
            cancelled.reason = event.run_cancelled.reason
    cancelled.partial_output = "".join(text)
    return cancelled


def _summary(run: pb.Run, server: str | None, cancelled: _Cancelled | None = None) -> str:
    lines = [
        f"run:      {run.run_id}",
        f"agent:    {run.agent}",
        f"state:    {_state(run.state)}",
        f"created:  {_time(run.create_time)}",
    ]
    if run.HasField("end_time"):
        lines.append(f"ended:    {_time(run.end_time)}")
    if run.conversation_id:
        lines.append(f"conversation: {run.conversation_id}")
    if run.error:
        lines.append(f"error:    {run.error}")
    if cancelled is not None:
        lines.append(f"reason:   {cancelled.reason or '(none given)'}")
    if run.HasField("usage"):
        lines.append(f"usage:    {_usage(run.usage)} ({run.usage.total_tokens} total)")
        if len(run.usage_by_agent) > 1:  # sub-agents ran: each agent's part
            width = max(len("/".join(part.agent_path)) for part in run.usage_by_agent)
            for part in run.usage_by_agent:
                lines.append(f"  {'/'.join(part.agent_path):<{width}}  {_usage(part.usage)}")
    if run.pending_approvals:
        lines.append("pending approvals:")
        for request in run.pending_approvals:
            lines.append(f"  {request.approval_id}")
            lines += [f"    {line}" for line in _pending(run.run_id, request, server).splitlines()]
    if run.decided_approvals:
        lines.append("decided approvals:")
        for decided in run.decided_approvals:
            lines.append(f"  {decided.approval_id}  {decided.tool_name}  {_decided(decided)}")
    if run.output:
        lines += ["output:", run.output]
    if cancelled is not None and cancelled.partial_output:
        lines += ["partial output (until cancelled):", cancelled.partial_output]
    if run.HasField("structured_output"):
        structured = _whole_numbers(json_format.MessageToDict(run.structured_output))
        # A Struct keeps no key order, so sorting makes the output stable.
        lines += ["structured output:", json.dumps(structured, indent=2, sort_keys=True, ensure_ascii=False)]
    return "\n".join(lines)


def _whole_numbers(value: Any) -> Any:
    """A protobuf Value holds every number as a double; whole ones read better without the ".0"."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


def _state(state: pb.RunState.ValueType) -> str:
    return pb.RunState.Name(state).removeprefix("RUN_STATE_").lower()


def _table(runs: Sequence[pb.Run]) -> str:
    """One line per run, in columns as wide as their widest entry."""
    rows = [("RUN", "AGENT", "STATE", "CREATED")]
    rows += [(run.run_id, run.agent, _state(run.state), _time(run.create_time)) for run in runs]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[3]]) for row in rows
    )


async def _client_command(args: argparse.Namespace) -> int:
    out = _Output()

    def notice(err: grpc.aio.AioRpcError) -> None:
        """Says once per cause why the command waits, so that a person can tell a restart from a mistake."""
        cause = f"{err.code().name}: {err.details()}"
        if cause not in _NOTICES:
            _NOTICES.add(cause)
            out.line(f"! {cause}{_hint(err, args.server)}", file=sys.stderr)
            out.line(f"  retrying for up to {args.retry_seconds:g} s (Ctrl-C stops)", file=sys.stderr)

    async with AgentRunClient(
        args.server,
        retry_budget_seconds=args.retry_seconds,
        on_retry=notice,
        token=_token(args.server),
        credentials=_credentials(),
    ) as client:
        if args.command == "run":
            run_id = await client.start_run(
                args.agent, args.prompt, conversation_id=args.conversation or "", request_id=args.request_id or ""
            )
            print(f"[run {run_id}]", file=sys.stderr)
            return await print_stream(
                client,
                run_id,
                prompt=args.ask,
                approver=args.approver,
                server=args.server,
                show_sequence=args.show_sequence,
                out=out,
            )
        if args.command == "stream":
            return await print_stream(
                client,
                args.run_id,
                after_sequence=args.after,
                prompt=args.ask,
                approver=args.approver,
                server=args.server,
                show_sequence=args.show_sequence,
                out=out,
            )
        if args.command == "approve":
            decision = pb.APPROVAL_DECISION_DENY if args.deny else pb.APPROVAL_DECISION_APPROVE
            recorded = await client.approve(
                args.run_id, args.approval_id, decision, reason=args.reason, approver=args.approver
            )
            print(_decision(recorded.decision, recorded.approver, recorded.reason))
            return 0
        if args.command == "get":
            run = await client.get_run(args.run_id)
            cancelled = await _cancelled(client, run.run_id) if run.state == pb.RUN_STATE_CANCELLED else None
            print(_summary(run, args.server, cancelled))
            return 0
        if args.command == "list":
            page = await client.list_runs(page_size=args.limit)
            print(_table(page.runs) if page.runs else "no runs yet")
            return 0
        if args.command == "cancel":
            if (await client.get_run(args.run_id)).state == pb.RUN_STATE_CANCELLED:
                print(f"{args.run_id} was already cancelled")
                return 0
            await client.cancel_run(args.run_id, reason=args.reason)
            print(f"cancellation of {args.run_id} requested ({command()} get {args.run_id} shows when it has ended)")
            return 0
        if args.command == "agents":
            for agent in await client.list_agents():
                print(f"{agent.name}  {agent.description}".rstrip())
                tools = ", ".join(agent.tools) or "none"
                delegates = f"; sub-agents: {', '.join(agent.sub_agents)}" if agent.sub_agents else ""
                print(f"  model: {agent.model}; tools: {tools}{delegates}; approval: {agent.approval_policy}")
            return 0
    raise AssertionError(args.command)


# The hints already given, so that the error a command gives up with does not repeat one.
_NOTICES: set[str] = set()


def _hint(err: grpc.aio.AioRpcError, server: str) -> str:
    """For a server that cannot be reached, or that wants credentials, what to do about it; once per process."""
    if err.code() == grpc.StatusCode.UNAUTHENTICATED:
        return (
            "\n  the server authenticates its callers: set AGENTRUN_TOKEN to a token it accepts (the CLI finds the "
            "token of a local `agentrun dev` by itself), or give a client certificate (AGENTRUN_TLS_CLIENT_CERT)"
        )
    if err.code() != grpc.StatusCode.UNAVAILABLE or "failed to connect" not in (err.details() or ""):
        return ""
    if "hint" in _NOTICES:
        return ""
    _NOTICES.add("hint")
    return (
        f"\n  no agentrun server answers at {server}: start one with `make dev` (or `{command()} dev`, or "
        f"`{command()} server` beside `{command()} worker`), or give its address with --server or AGENTRUN_SERVER"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _not_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentrun", description="Durable LLM agent runs over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)

    def client_command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument(
            "--server",
            default=DEFAULT_SERVER,
            help="address of an agentrun server, or of several replicas separated by commas (AGENTRUN_SERVER)",
        )
        sub.add_argument(
            "--retry-seconds",
            type=_not_negative,
            default=CLI_RETRY_SECONDS,
            help=f"how long to keep trying while no server answers (default: {CLI_RETRY_SECONDS:g})",
        )
        return sub

    def approver_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--approver",
            default=default_approver(),
            help="who decides approvals, on a server that authenticates no one (default: $USER); a server that "
            "authenticates records the token's subject instead",
        )

    def streaming_command(name: str, help: str) -> argparse.ArgumentParser:
        sub = client_command(name, help)
        approver_option(sub)
        sub.add_argument(
            "--prompt",
            dest="ask",
            action=argparse.BooleanOptionalAction,
            help="ask about each approval on stdin (default: when stdin is a terminal)",
        )
        sub.add_argument(
            "--show-sequence",
            action="store_true",
            help="show each event on its own line after its sequence number (what --after takes)",
        )
        return sub

    run = streaming_command("run", "start a run and stream its answer")
    run.add_argument("agent", help=f"a configured agent (see: {command()} agents)")
    run.add_argument("prompt", help="what to ask the agent")
    run.add_argument("--conversation", help="conversation id")
    run.add_argument("--request-id", help="idempotency key: the same key returns the same run")
    stream = streaming_command("stream", "stream an existing run")
    stream.add_argument("run_id")
    stream.add_argument(
        "--after", type=int, default=0, help="resume after this sequence number (see --show-sequence); 0 for all"
    )
    approve = client_command("approve", "approve or deny a pending approval")
    approve.add_argument("run_id")
    approve.add_argument("approval_id")
    approve.add_argument("--deny", action="store_true", help="deny instead of approve")
    approve.add_argument("--reason", default="", help="why; a denial's reason is shown to the model")
    approver_option(approve)
    get = client_command("get", "show a run")
    get.add_argument("run_id")
    listing = client_command("list", "list recent runs")
    listing.add_argument(
        "--limit", type=_positive, default=20, help="how many runs to show, newest first (default: 20)"
    )
    cancel = client_command("cancel", "cancel a run")
    cancel.add_argument("run_id")
    cancel.add_argument("--reason", default="", help="why; shown in the run's run_cancelled event and by get")
    client_command("agents", "list the agents that the server offers")
    # The service distribution adds its commands (dev, server, worker) here; the client works without them.
    for entry_point in entry_points(group=COMMANDS_ENTRY_POINT):
        entry_point.load()(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if hasattr(args, "main"):  # a command that the service distribution added
        sys.exit(args.main(args))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        sys.exit(asyncio.run(_client_command(args)))
    except grpc.aio.AioRpcError as err:
        print(f"error: {err.code().name}: {err.details()}{_hint(err, args.server)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
