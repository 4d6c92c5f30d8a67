"""The commands that the service distribution adds to the ``agentrun`` command line.

They are registered through the ``agentrun.commands`` entry point and import the services only when they run,
so the client's commands stay as quick to start as before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

SERVICE_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
DEMO_PROMPT = "In two sentences: why run an LLM agent as a durable workflow?"


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = commands.add_parser("dev", help="start Temporal, Redis, the worker and the server, and stream a demo run")
    dev.add_argument("--port", type=int, default=50051, help="gRPC port of the server (default: 50051)")
    dev.add_argument(
        "--temporal-port", type=int, default=7233, help="gRPC port of the Temporal dev server (default: 7233)"
    )
    dev.add_argument("--ui-port", type=int, default=8233, help="port of Temporal's web UI (default: 8233)")
    dev.add_argument("--prompt", default=DEMO_PROMPT, help="the demo run's prompt")
    dev.add_argument("--once", action="store_true", help="stop after the demo run instead of serving")
    dev.add_argument(
        "--trace",
        action="store_true",
        help="trace every run and print each trace as a tree (OTEL_EXPORTER_OTLP_ENDPOINT sends them elsewhere)",
    )
    dev.set_defaults(main=_dev)
    server = commands.add_parser("server", help="run the gRPC server (TEMPORAL_ADDRESS, REDIS_URL, ...)")
    server.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)"
    )
    server.add_argument("--port", type=int, default=50051, help="port to listen on (default: 50051)")
    server.add_argument(
        "--insecure",
        action="store_true",
        help="listen on a non-loopback --host without authentication (anyone who reaches the port can do anything), "
        "or with it but without TLS (tokens cross the network in plaintext)",
    )
    server.set_defaults(main=_server)
    worker = commands.add_parser("worker", help="run the worker service (TEMPORAL_ADDRESS, REDIS_URL, OPENAI_* ...)")
    worker.set_defaults(main=_worker)


def _dev(args: argparse.Namespace) -> int:
    from devstack.stack import PortInUse, run_dev

    logging.basicConfig(level=logging.WARNING, format=SERVICE_LOG_FORMAT)
    try:
        with _printed_traces() if args.trace else contextlib.nullcontext():
            from shared import telemetry

            # One process runs the server and the worker here: its spans and metrics are agentrun-dev's.
            telemetry.setup("agentrun-dev")
            asyncio.run(
                run_dev(
                    port=args.port,
                    temporal_port=args.temporal_port,
                    ui_port=args.ui_port,
                    demo_prompt=args.prompt,
                    once=args.once,
                )
            )
    except PortInUse as err:
        print(f"agentrun dev: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the stack took over the signal
        return 130
    return 0


@contextlib.contextmanager
def _printed_traces() -> Iterator[None]:
    """An OTLP receiver that prints each trace as a tree, in a process of its own, and the services exporting to it."""
    from devstack.stack import free_port

    port = free_port()
    # Only agentrun's traces: the Temporal dev server reads the same variables and exports its own.
    # In a session of its own, like Temporal: Ctrl-C reaches only agentrun dev, which stops it last.
    receiver = subprocess.Popen(
        [sys.executable, "-m", "devstack.collector", "--port", str(port), "--only", "agentrun"], start_new_session=True
    )
    os.environ.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": os.environ.get("OTEL_METRICS_EXPORTER", "none"),
            "OTEL_BSP_SCHEDULE_DELAY": "500",
        }
    )
    try:
        yield
    finally:
        receiver.terminate()
        receiver.wait()


def _server(args: argparse.Namespace) -> int:
    from agent_service._auth import AuthConfigError
    from agent_service.server import run_server
    from shared.settings import Settings

    logging.basicConfig(level=logging.INFO, format=SERVICE_LOG_FORMAT)
    try:
        asyncio.run(run_server(Settings.from_env(), port=args.port, host=args.host, insecure=args.insecure))
    except (OSError, AuthConfigError) as err:
        print(f"agentrun server: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _worker(args: argparse.Namespace) -> int:
    from shared.settings import Settings
    from worker.worker import run_worker

    logging.basicConfig(level=logging.INFO, format=SERVICE_LOG_FORMAT)
    try:
        asyncio.run(run_worker(Settings.from_env()))
    except ConnectionError as err:
        print(f"agentrun worker: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
