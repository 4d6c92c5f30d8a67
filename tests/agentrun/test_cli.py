"""The agentrun command line as a separate process against a real stack."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import sys
from asyncio.subprocess import PIPE

import pytest

from agentrun.cli import command
from agentrun.v1 import agent_service_pb2 as pb
from devstack.stack import free_port
from tests.conftest import Stack

ECHO_HI = {"tool_calls": [{"name": "echo", "arguments": {"text": "hi"}}]}
CLI_TIMEOUT = 60
CLI = (sys.executable, "-m", "agentrun.cli")


async def start_cli(stack: Stack, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        "--server",
        stack.address,
        stdin=PIPE,
        stdout=PIPE,
        stderr=PIPE,
        env={**os.environ, "USER": "alice"},  # the default approver
    )


async def agentrun(stack: Stack, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """Runs the CLI with ``stdin`` as its whole input; returns its exit code, stdout and stderr."""
    process = await start_cli(stack, *args)
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), CLI_TIMEOUT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def run_id_of(stderr: str) -> str:
    match = re.search(r"\[run (run-\w+)\]", stderr)
    assert match, stderr
    return match.group(1)


async def first_approval(stack: Stack, run_id: str) -> pb.ApprovalRequested:
    async for event in stack.client.stream_run(run_id):
        if event.HasField("approval_requested"):
            return event.approval_requested
    raise AssertionError(f"run {run_id} asked for no approval")


async def finish(stack: Stack, run_id: str) -> pb.Run:
    async for event in stack.client.stream_run(run_id):
        if event.WhichOneof("kind") in ("run_completed", "run_failed", "run_cancelled"):
            break
    return await stack.client.get_run(run_id)


async def test_run_asks_for_approval_and_goes_on_when_approved(stack: Stack) -> None:
    key = stack.model.script(ECHO_HI, {"text": "The echo said hi."})

    code, out, err = await agentrun(stack, "run", "patient", f"{key} echo hi", "--prompt", stdin="y\n")

    assert code == 0, err
    run_id = run_id_of(err)
    *lines, last = out.splitlines()
    assert lines == [
        '→ echo({"text": "hi"})',
        'approve echo({"text": "hi"})? [y/N/reason] y',
        "✓ approved by alice",
        "← hi",
        "The echo said hi.",
    ]
    assert last.startswith(f"[run {run_id} completed: ")
    run = await stack.client.get_run(run_id)
    assert run.state == pb.RUN_STATE_COMPLETED
    assert run.output == "The echo said hi."
    assert [(d.approver, d.decision) for d in run.decided_approvals] == [("alice", pb.APPROVAL_DECISION_APPROVE)]


@pytest.mark.parametrize(("answer", "reason"), [("n", ""), ("not today", "not today")])
async def test_run_denies_with_the_answer_as_reason(stack: Stack, answer: str, reason: str) -> None:
    key = stack.model.script(ECHO_HI, {"text": "I may not echo."})

    code, out, err = await agentrun(
        stack, "run", "patient", f"{key} echo hi", "--prompt", "--approver", "bob", stdin=f"{answer}\n"
    )

    assert code == 0, err
    because = f": {reason}" if reason else ""
    # The denial once: the call's end, which says the same, is not shown again.
    assert f"⊘ denied by bob{because}\nI may not echo.\n" in out
    assert "← " not in out and "the call was denied" not in out
    run = await stack.client.get_run(run_id_of(err))
    assert run.state == pb.RUN_STATE_COMPLETED
    assert [(d.approver, d.decision, d.reason) for d in run.decided_approvals] == [
        ("bob", pb.APPROVAL_DECISION_DENY, reason)
    ]


async def test_without_a_prompt_the_stream_shows_the_approve_command_and_waits(stack: Stack) -> None:
    key = stack.model.script(
        {"tool_calls": [{"name": "calculator", "arguments": {"expression": "2+3"}}]}, {"text": "No."}
    )

    # stdin is a pipe, not a terminal, so nothing is asked; the careful agent's 2 s deadline denies the call.
    code, out, err = await agentrun(stack, "run", "careful", f"{key} add", stdin="y\n")

    assert code == 0, err
    run_id = run_id_of(err)
    run = await stack.client.get_run(run_id)
    (decided,) = run.decided_approvals
    assert decided.timed_out
    assert "[y/N/reason]" not in out
    assert '⏸ calculator({"expression": "2+3"}) waits for approval until' in out
    assert f"  approve: {command()} approve {run_id} {decided.approval_id} --server {stack.address}\n" in out
    assert f"⊘ timed out, denied: {decided.reason}\n" in out
    assert "the call was denied" not in out
    assert f"No.\n[run {run_id} completed: " in out


async def test_a_prompt_is_withdrawn_when_someone_else_decides(stack: Stack) -> None:
    key = stack.model.script(ECHO_HI, {"text": "Done."})
    run_id = await stack.client.start_run("patient", f"{key} echo hi")
    process = await start_cli(stack, "stream", run_id, "--prompt")
    assert process.stdout is not None
    shown = b""
    while b"[y/N/reason]" not in shown:
        chunk = await asyncio.wait_for(process.stdout.read(1024), CLI_TIMEOUT)
        assert chunk, shown
        shown += chunk

    approval = await first_approval(stack, run_id)
    await stack.client.approve(run_id, approval.approval_id, pb.APPROVAL_DECISION_APPROVE, approver="dora")

    # stdin stays open and unanswered: the command must still end with the run.
    rest = await asyncio.wait_for(process.stdout.read(), CLI_TIMEOUT)
    assert await asyncio.wait_for(process.wait(), CLI_TIMEOUT) == 0
    out = (shown + rest).decode()
    assert "[y/N/reason] \n✓ approved by dora\n← hi\nDone.\n" in out
    assert process.stdin is not None
    process.stdin.close()


async def test_approve_command_records_the_approver_and_reason(stack: Stack) -> None:
    key = stack.model.script(ECHO_HI, {"text": "Echoed."})
    run_id = await stack.client.start_run("patient", f"{key} echo hi")
    approval = await first_approval(stack, run_id)

    code, out, err = await agentrun(
        stack, "approve", run_id, approval.approval_id, "--reason", "ok", "--approver", "carol"
    )

    assert (code, out, err) == (0, "✓ approved by carol: ok\n", "")
    run = await finish(stack, run_id)
    assert run.state == pb.RUN_STATE_COMPLETED
    (decided,) = run.decided_approvals
    assert (decided.approver, decided.reason, decided.decision) == ("carol", "ok", pb.APPROVAL_DECISION_APPROVE)


async def test_approve_command_reports_a_conflicting_decision(stack: Stack) -> None:
    key = stack.model.script(ECHO_HI, {"text": "Echoed."})
    run_id = await stack.client.start_run("patient", f"{key} echo hi")
    approval = await first_approval(stack, run_id)
    await stack.client.approve(run_id, approval.approval_id, pb.APPROVAL_DECISION_APPROVE, approver="carol")
    # Whether the run is still waiting or has ended meanwhile, a contrary decision is refused.
    code, out, err = await agentrun(stack, "approve", run_id, approval.approval_id, "--deny", "--approver", "dave")

    assert code == 2
    assert out == ""
    assert err.startswith("error: FAILED_PRECONDITION: ")


async def test_get_summarizes_a_waiting_and_then_a_completed_run(stack: Stack) -> None:
    key = stack.model.script(ECHO_HI, {"text": "Echoed hi."})
    run_id = await stack.client.start_run("patient", f"{key} echo hi")
    approval = await first_approval(stack, run_id)

    code, out, err = await agentrun(stack, "get", run_id)

    assert code == 0, err
    assert f"run:      {run_id}\nagent:    patient\nstate:    waiting_for_approval\n" in out
    assert f"pending approvals:\n  {approval.approval_id}\n" in out
    assert '    ⏸ echo({"text": "hi"}) waits for approval until' in out
    assert f"    approve: {command()} approve {run_id} {approval.approval_id} --server {stack.address}\n" in out
    assert "decided approvals" not in out and "output:" not in out

    await stack.client.approve(
        run_id, approval.approval_id, pb.APPROVAL_DECISION_DENY, reason="not now", approver="carol"
    )
    run = await finish(stack, run_id)
    code, out, err = await agentrun(stack, "get", run_id)

    assert code == 0, err
    assert "state:    completed\n" in out
    assert "ended:    " in out
    usage = run.usage
    assert (
        f"usage:    {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
        f" ({usage.total_tokens} total)\n" in out
    )
    assert f"decided approvals:\n  {approval.approval_id}  echo  ⊘ denied by carol: not now\n" in out
    assert "pending approvals" not in out
    assert out.endswith("output:\nEchoed hi.\n")


async def test_get_shows_structured_output(stack: Stack) -> None:
    key = stack.model.script({"text": '{"city": "Paris", "population": 2100000}'})
    run_id = await stack.client.start_run("json", f"{key} a city")
    await finish(stack, run_id)

    code, out, err = await agentrun(stack, "get", run_id)

    assert code == 0, err
    assert out.endswith('structured output:\n{\n  "city": "Paris",\n  "population": 2100000\n}\n')


async def test_run_prompts_by_default_when_stdin_is_a_terminal(stack: Stack) -> None:
    key = stack.model.script(ECHO_HI, {"text": "Echoed."})
    controller, terminal = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            *CLI,
            "run",
            "patient",
            f"{key} echo hi",
            "--server",
            stack.address,
            "--approver",
            "erin",
            stdin=terminal,
            stdout=PIPE,
            stderr=PIPE,
        )
        assert process.stdout is not None
        shown = await asyncio.wait_for(process.stdout.readuntil(b"[y/N/reason] "), CLI_TIMEOUT)
        os.write(controller, b"yes\n")
        rest = await asyncio.wait_for(process.stdout.read(), CLI_TIMEOUT)
        assert await asyncio.wait_for(process.wait(), CLI_TIMEOUT) == 0
    finally:
        os.close(controller)
        os.close(terminal)

    assert shown.decode().endswith('approve echo({"text": "hi"})? [y/N/reason] ')
    assert rest.decode().startswith("✓ approved by erin\n← hi\nEchoed.\n")


async def test_server_takes_several_replicas_and_skips_a_dead_one(stack: Stack) -> None:
    key = stack.model.script({"text": "through the second"})
    servers = f"127.0.0.1:{free_port()},{stack.address}"  # nothing listens at the first
    process = await asyncio.create_subprocess_exec(
        *CLI, "run", "assistant", key, "--no-prompt", "--server", servers, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)

    assert process.returncode == 0, err.decode()
    assert "through the second" in out.decode()
