"""The ``agentrun`` command line: the dev stack, the two services, and a client for runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import grpc

from agentrun.client import AgentRunClient
from agentrun.v1 import agent_service_pb2 as pb

DEFAULT_SERVER = os.environ.get("AGENTRUN_SERVER", "127.0.0.1:50051")
DEMO_PROMPT = "In two sentences: why run an LLM agent as a durable workflow?"


async def print_stream(client: AgentRunClient, run_id: str, *, after_sequence: int = 0) -> int:
    """Prints a run's text as it streams; returns the process exit code for how the run ended."""
    async for event in client.stream_run(run_id, after_sequence=after_sequence):
        kind = event.WhichOneof("kind")
        if kind == "text_delta":
            print(event.text_delta.text, end="", flush=True)
        elif kind == "run_completed":
            usage = event.run_completed.usage
            tokens = f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
            print(f"\n[run {run_id} completed: {tokens}]")
            return 0
        elif kind == "run_failed":
            print(f"\n[run {run_id} failed: {event.run_failed.error}]", file=sys.stderr)
            return 1
        elif kind == "run_cancelled":
            reason = event.run_cancelled.reason
            print(f"\n[run {run_id} cancelled{': ' + reason if reason else ''}]", file=sys.stderr)
            return 1
    return 1


def _describe(run: pb.Run) -> str:
    state = pb.RunState.Name(run.state).removeprefix("RUN_STATE_").lower()
    line = f"{run.run_id}  {run.agent:<12} {state:<10} {run.create_time.ToDatetime():%Y-%m-%d %H:%M:%S}"
    return line


async def _client_command(args: argparse.Namespace) -> int:
    async with AgentRunClient(args.server) as client:
        if args.command == "run":
            run_id = await client.start_run(
                args.agent, args.prompt, conversation_id=args.conversation or "", request_id=args.request_id or ""
            )
            print(f"[run {run_id}]", file=sys.stderr)
            return await print_stream(client, run_id)
        if args.command == "stream":
            return await print_stream(client, args.run_id, after_sequence=args.after)
        if args.command == "get":
            run = await client.get_run(args.run_id)
            print(run)
            return 0
        if args.command == "list":
            page = await client.list_runs(page_size=args.limit)
            for run in page.runs:
                print(_describe(run))
            return 0
        if args.command == "cancel":
            await client.cancel_run(args.run_id, reason=args.reason)
            print(f"cancellation of {args.run_id} requested")
            return 0
    raise AssertionError(args.command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentrun", description="Durable LLM agent runs over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    dev = commands.add_parser("dev", help="start Temporal, Redis, the worker and the server, and stream a demo run")
    dev.add_argument("--port", type=int, default=50051, help="gRPC port of the server")
    dev.add_argument("--temporal-port", type=int, default=7233, help="gRPC port of the Temporal dev server")
    dev.add_argument("--ui-port", type=int, default=8233, help="port of Temporal's web UI")
    dev.add_argument("--prompt", default=DEMO_PROMPT, help="the demo run's prompt")
    dev.add_argument("--once", action="store_true", help="stop after the demo run instead of serving")
    server = commands.add_parser("server", help="run the gRPC server (TEMPORAL_ADDRESS, REDIS_URL, ...)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=50051)
    commands.add_parser("worker", help="run the worker service (TEMPORAL_ADDRESS, REDIS_URL, OPENAI_* ...)")

    def client_command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--server", default=DEFAULT_SERVER, help="address of an agentrun server (AGENTRUN_SERVER)")
        return sub

    run = client_command("run", "start a run and stream its answer")
    run.add_argument("agent")
    run.add_argument("prompt")
    run.add_argument("--conversation", help="conversation id")
    run.add_argument("--request-id", help="idempotency key: the same key returns the same run")
    stream = client_command("stream", "stream an existing run")
    stream.add_argument("run_id")
    stream.add_argument("--after", type=int, default=0, help="resume after this sequence number")
    get = client_command("get", "show a run")
    get.add_argument("run_id")
    listing = client_command("list", "list recent runs")
    listing.add_argument("--limit", type=int, default=20)
    cancel = client_command("cancel", "cancel a run")
    cancel.add_argument("run_id")
    cancel.add_argument("--reason", default="")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.command in ("server", "worker") else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.command == "worker":
        from worker.settings import Settings
        from worker.worker import run_worker

        asyncio.run(run_worker(Settings.from_env()))
        return
    if args.command == "server":
        from agent_service.server import run_server
        from worker.settings import Settings

        asyncio.run(run_server(Settings.from_env(), port=args.port, host=args.host))
        return
    if args.command == "dev":
        from agentrun._dev import run_dev

        asyncio.run(
            run_dev(
                port=args.port,
                temporal_port=args.temporal_port,
                ui_port=args.ui_port,
                demo_prompt=args.prompt,
                once=args.once,
            )
        )
        return
    try:
        sys.exit(asyncio.run(_client_command(args)))
    except grpc.aio.AioRpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
