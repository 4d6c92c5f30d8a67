"""The agentrun command line as a separate process against a real stack."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import pytest

from agentrun.cli import command
from agentrun.v1 import agent_service_pb2 as pb
from devstack.stack import free_port
from shared.agents import load_agents
from tests.conftest import AGENTS_FILE, Stack, server_for, with_mutual_tls
from tests.credentials import CertificateAuthority, Issuer

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


async def test_stream_shows_sequence_numbers_and_says_when_nothing_is_after_n(stack: Stack) -> None:
    key = stack.model.script({"chunks": ["one ", "two"]})
    run_id = await stack.client.start_run("assistant", key)
    run = await finish(stack, run_id)
    assert run.state == pb.RUN_STATE_COMPLETED

    code, out, err = await agentrun(stack, "stream", run_id, "--show-sequence")

    assert (code, err) == (0, "")
    lines = out.splitlines()
    numbers = [int(line.split(" ", 1)[0].removeprefix("#")) for line in lines]
    assert numbers == list(range(1, len(lines) + 1))
    assert '"one "' in out and '"two"' in out
    last = numbers[-1]
    assert lines[-1].startswith(f"#{last} [run {run_id} completed: ")

    # From the number before the end: only the end.
    code, out, err = await agentrun(stack, "stream", run_id, "--after", str(last - 1))
    assert (code, err) == (0, "")
    assert out.startswith(f"[run {run_id} completed: ")

    # At or past the end: nothing to show, and it says so.
    for after in (last, last + 10):
        code, out, err = await agentrun(stack, "stream", run_id, "--after", str(after))
        assert (code, out) == (0, "")
        assert err == f"[run {run_id} completed: no events after sequence {after}]\n"


async def test_agents_lists_the_configured_agents_and_an_unknown_agent_is_told_them(stack: Stack) -> None:
    code, out, err = await agentrun(stack, "agents")

    assert (code, err) == (0, "")
    configured = sorted(load_agents(AGENTS_FILE))
    names = [line.split("  ")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert names == configured
    assert "careful  Every tool call needs approval; a missed deadline denies.\n" in out
    assert "  model: offline; tools: calculator, echo; approval: require_all\n" in out
    assert "  model: offline; tools: none; sub-agents: researcher; approval: auto\n" in out  # the planner

    code, out, err = await agentrun(stack, "run", "nosuch", "hello")

    assert (code, out) == (2, "")
    assert err == f"error: NOT_FOUND: agent 'nosuch' is not configured; the agents are: {', '.join(configured)}\n"


async def test_a_server_that_does_not_answer_gets_a_hint(stack: Stack) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    process = await asyncio.create_subprocess_exec(
        *CLI, "list", "--server", nowhere, "--retry-seconds", "0.5", stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    text = err.decode()

    assert (process.returncode, out) == (2, b"")
    hint = f"  no agentrun server answers at {nowhere}: start one with `make dev` (or `{command()} dev`, or "
    # While it retries, and not again with the error it gives up with.
    assert text.startswith("! UNAVAILABLE: failed to connect to all addresses")
    assert text.count(hint) == 1
    assert "or give its address with --server or AGENTRUN_SERVER\n  retrying for up to 0.5 s (Ctrl-C stops)\n" in text
    assert "\nerror: UNAVAILABLE: failed to connect to all addresses" in text

    # Without retries, the error itself carries the hint.
    process = await asyncio.create_subprocess_exec(
        *CLI, "get", "run-x", "--server", nowhere, "--retry-seconds", "0", stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    text = err.decode()
    assert (process.returncode, out) == (2, b"")
    assert text.startswith("error: UNAVAILABLE: failed to connect to all addresses")
    assert hint in text and "retrying" not in text


async def test_get_shows_a_cancelled_runs_reason_usage_and_partial_answer_and_cancel_again_says_so(
    stack: Stack,
) -> None:
    words = [f"word{i} " for i in range(200)]
    key = stack.model.script(ECHO_HI, {"chunks": words, "delay_ms": 20})
    run_id = await stack.client.start_run("tools", f"{key} echo")
    async for event in stack.client.stream_run(run_id):
        if event.HasField("text_delta") and "word3 " in event.text_delta.text:
            break

    code, out, err = await agentrun(stack, "cancel", run_id, "--reason", "no longer needed")
    assert (code, err) == (0, "")
    assert out.startswith(f"cancellation of {run_id} requested")
    run = await finish(stack, run_id)
    assert run.state == pb.RUN_STATE_CANCELLED

    code, out, err = await agentrun(stack, "get", run_id)

    assert (code, err) == (0, "")
    assert "state:    cancelled\n" in out
    assert "reason:   no longer needed\n" in out
    # The first round, with its tool call, finished: its tokens are counted.
    assert run.usage.prompt_tokens > 0
    assert f"usage:    {run.usage.prompt_tokens} prompt + {run.usage.completion_tokens} completion tokens" in out
    partial = out.split("partial output (until cancelled):\n", 1)[1]
    assert partial.startswith("word0 word1 word2 word3 ")
    assert partial.rstrip("\n") != "".join(words).rstrip()

    code, out, err = await agentrun(stack, "cancel", run_id)
    assert (code, out, err) == (0, f"{run_id} was already cancelled\n", "")


async def test_list_aligns_its_columns_and_takes_only_a_positive_limit(stack: Stack) -> None:
    key = stack.model.script(ECHO_HI, {"text": "done"})
    waiting = await stack.client.start_run("patient", f"{key} echo hi")
    await first_approval(stack, waiting)
    done = await stack.client.start_run("assistant", "hello")
    await finish(stack, done)

    code, out, err = await agentrun(stack, "list")

    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["RUN", "AGENT", "STATE", "CREATED"]
    assert sorted(row.split()[:3] for row in rows) == sorted(
        [[done, "assistant", "completed"], [waiting, "patient", "waiting_for_approval"]]
    )
    for column in ("AGENT", "STATE", "CREATED"):
        start = header.index(column)
        assert all(row[start - 2 : start] == "  " and row[start] != " " for row in rows), out

    code, out, err = await agentrun(stack, "list", "--limit", "1")
    assert (code, len(out.splitlines())) == (0, 2)

    code, out, err = await agentrun(stack, "list", "--limit", "0")
    assert (code, out) == (2, "")
    assert "argument --limit: must be at least 1, not 0" in err


async def test_every_option_has_help() -> None:
    for command_name in ("run", "stream", "approve", "get", "list", "cancel", "agents", "dev", "server", "worker"):
        process = await asyncio.create_subprocess_exec(*CLI, command_name, "--help", stdout=PIPE, stderr=PIPE)
        out, _ = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
        assert process.returncode == 0
        lines = out.decode().splitlines()
        # An option without help stands alone on its line, with no help text on the next one either.
        bare = [
            line.strip()
            for line, following in zip(lines, [*lines[1:], ""], strict=True)
            if re.fullmatch(r"  (-[a-z], )?--[a-z-]+( [A-Z_]+)?", line) and not re.match(r" {10,}\S", following)
        ]
        assert bare == [], f"{command_name}: {bare} have no help"


async def test_streaming_a_run_again_asks_about_no_approval_that_was_decided(stack: Stack) -> None:
    key = stack.model.script(ECHO_HI, {"text": "Echoed."})
    code, out, err = await agentrun(stack, "run", "patient", f"{key} echo hi", "--prompt", stdin="y\n")
    assert code == 0, err
    run_id = run_id_of(err)

    # stdin stays open: a prompt would wait for an answer.
    process = await start_cli(stack, "stream", run_id, "--prompt", "--show-sequence")
    assert process.stdout is not None
    replayed = await asyncio.wait_for(process.stdout.read(), CLI_TIMEOUT)
    assert await asyncio.wait_for(process.wait(), CLI_TIMEOUT) == 0
    assert process.stdin is not None
    process.stdin.close()

    text = replayed.decode()
    assert "[y/N/reason]" not in text
    assert "#2 approval requested\n#3 ✓ approved by alice\n#4 ← hi\n" in text


async def test_run_and_get_mark_what_sub_agents_did(stack: Stack) -> None:
    child = stack.model.script({"tool_calls": [{"name": "echo", "arguments": {"text": "p. 7"}}]}, {"text": "On p. 7."})
    root = stack.model.script(
        {"tool_calls": [{"name": "delegate_to_researcher", "arguments": {"task": f"{child} find it"}}]},
        {"text": "Found: p. 7."},
    )

    code, out, err = await agentrun(stack, "run", "planner", f"{root} where?")

    assert code == 0, err
    run_id = run_id_of(err)
    assert out.startswith(
        f'→ delegate_to_researcher({{"task": "{child} find it"}})\n'
        '[researcher] → echo({"text": "p. 7"})\n'
        "[researcher] ← p. 7\n"
        "[researcher] On p. 7.\n"
        "← On p. 7.\n"
        "Found: p. 7.\n"
    )
    code, out, err = await agentrun(stack, "get", run_id)

    assert code == 0, err
    run = await stack.client.get_run(run_id)
    assert [list(p.agent_path) for p in run.usage_by_agent] == [["planner"], ["planner", "researcher"]]
    planner, researcher = (p.usage for p in run.usage_by_agent)
    assert (
        f"  planner             {planner.prompt_tokens} prompt + {planner.completion_tokens} completion tokens\n"
        f"  planner/researcher  {researcher.prompt_tokens} prompt + {researcher.completion_tokens} completion tokens\n"
    ) in out


async def test_the_cli_calls_a_tls_server_with_a_token_or_a_client_certificate(
    stack: Stack, issuer: Issuer, tmp_path: Path
) -> None:
    ca = CertificateAuthority(tmp_path)
    client_cert = ca.issue("ops-bot", "acme")
    settings = with_mutual_tls(stack.settings, issuer, ca, "acme/ops-bot=runs:read")
    async with server_for(stack, settings) as address:
        server = address.replace("127.0.0.1", "localhost")
        tls = {"AGENTRUN_TLS_CA": str(ca.cert_file)}
        mutual = tls | {"AGENTRUN_TLS_CLIENT_CERT": str(client_cert.cert_file)}
        mutual |= {"AGENTRUN_TLS_CLIENT_KEY": str(client_cert.key_file)}

        async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
            process = await asyncio.create_subprocess_exec(
                *CLI, *args, "--server", server, "--retry-seconds", "0", stdout=PIPE, stderr=PIPE,
                env={**os.environ, **env},
            )  # fmt: skip
            out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
            assert process.returncode is not None
            return process.returncode, out.decode(), err.decode()

        code, out, err = await cli(mutual, "agents")
        assert (code, err) == (0, ""), err
        assert out.startswith("assistant  Test assistant.\n")

        # The certificate may read; a token sent beside it may start runs as well.
        code, _, err = await cli(mutual, "run", "assistant", "hi")
        assert code == 2
        assert err == "error: PERMISSION_DENIED: 'ops-bot' may not call StartRun: it needs the right 'runs:start'\n"
        code, out, err = await cli(mutual | {"AGENTRUN_TOKEN": issuer.token()}, "run", "assistant", "hi")
        assert code == 0, err
        assert "You said: hi" in out

        code, _, err = await cli({"AGENTRUN_TLS_CLIENT_CERT": str(client_cert.cert_file)}, "agents")
        assert code == 2
        assert err == "error: AGENTRUN_TLS_*: a client certificate needs its key, and a key its certificate\n"
