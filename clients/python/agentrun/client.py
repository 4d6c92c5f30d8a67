"""The Python client library of agentrun: a thin, typed layer over the generated gRPC stubs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc

from agentrun.v1 import agent_service_pb2 as pb
from agentrun.v1 import agent_service_pb2_grpc as pb_grpc

# The code after which a stream is worth resuming: the server or the network went
# away, not the request.
_RESUMABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
TERMINAL_KINDS = frozenset({"run_completed", "run_failed", "run_cancelled"})
# Until the server authenticates callers, Approve takes the approver's identity from this metadata key.
APPROVER_METADATA = "x-agentrun-approver"


class RunEndedError(Exception):
    """A run ended without an answer; ``event`` is its terminal event."""

    def __init__(self, run_id: str, event: pb.RunEvent) -> None:
        if event.HasField("run_cancelled"):
            ending = f"was cancelled: {event.run_cancelled.reason}" if event.run_cancelled.reason else "was cancelled"
        else:
            ending = f"failed: {event.run_failed.error}"
        super().__init__(f"run {run_id} {ending}")
        self.run_id = run_id
        self.event = event


class RunFailedError(RunEndedError):
    """A run failed; ``event.run_failed.error`` says why."""


class RunCancelledError(RunEndedError):
    """A run was cancelled; ``event.run_cancelled.reason`` says why, when the canceller gave a reason."""


class AgentRunClient:
    """Calls an agentrun server. Use as ``async with AgentRunClient("localhost:50051") as client``."""

    def __init__(self, target: str = "localhost:50051", *, channel: grpc.aio.Channel | None = None) -> None:
        self.channel = channel or grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.AgentServiceStub(self.channel)

    async def __aenter__(self) -> AgentRunClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def start_run(self, agent: str, input: str, *, conversation_id: str = "", request_id: str = "") -> str:
        """Starts a run and returns its id; reuse ``request_id`` to make retries safe."""
        response = await self.stub.StartRun(
            pb.StartRunRequest(agent=agent, input=input, conversation_id=conversation_id, request_id=request_id)
        )
        return response.run_id

    async def stream_run(
        self, run_id: str, *, after_sequence: int = 0, max_reconnects: int = 10
    ) -> AsyncGenerator[pb.RunEvent]:
        """Yields the run's events to its terminal event, reconnecting where it left off if the connection drops."""
        reconnects = 0
        while True:
            try:
                async for response in self.stub.StreamRun(
                    pb.StreamRunRequest(run_id=run_id, after_sequence=after_sequence)
                ):
                    event = response.event
                    # A resumed stream first repeats the pending approval requests with their old sequence
                    # numbers; resuming from those again would repeat the events in between.
                    after_sequence = max(after_sequence, event.sequence)
                    reconnects = 0
                    yield event
                    if event.WhichOneof("kind") in TERMINAL_KINDS:
                        return
                return
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RESUMABLE or reconnects >= max_reconnects:
                    raise
                reconnects += 1
                await asyncio.sleep(min(0.1 * 2**reconnects, 5.0))

    async def run(self, agent: str, input: str, *, conversation_id: str = "", request_id: str = "") -> pb.RunCompleted:
        """Starts a run and waits for its answer.

        Raises ``RunFailedError`` or ``RunCancelledError`` (both ``RunEndedError``) when the run ends without one.
        """
        run_id = await self.start_run(agent, input, conversation_id=conversation_id, request_id=request_id)
        async for event in self.stream_run(run_id):
            if event.HasField("run_completed"):
                return event.run_completed
            if event.HasField("run_cancelled"):
                raise RunCancelledError(run_id, event)
            if event.HasField("run_failed"):
                raise RunFailedError(run_id, event)
        raise RunFailedError(run_id, pb.RunEvent(run_failed=pb.RunFailed(error="the stream ended without a result")))

    async def get_run(self, run_id: str) -> pb.Run:
        return (await self.stub.GetRun(pb.GetRunRequest(run_id=run_id))).run

    async def cancel_run(self, run_id: str, *, reason: str = "") -> None:
        await self.stub.CancelRun(pb.CancelRunRequest(run_id=run_id, reason=reason))

    async def list_runs(self, *, page_size: int = 0, page_token: str = "") -> pb.ListRunsResponse:
        return await self.stub.ListRuns(pb.ListRunsRequest(page_size=page_size, page_token=page_token))

    async def approve(
        self,
        run_id: str,
        approval_id: str,
        decision: pb.ApprovalDecision.ValueType,
        *,
        reason: str = "",
        approver: str,
        arguments_sha256: str = "",
    ) -> pb.ApproveResponse:
        """Answers a pending approval as ``approver`` and returns the decision the run recorded.

        Pass the request's ``arguments_sha256`` to make sure the decision applies to exactly the arguments shown.
        """
        request = pb.ApproveRequest(
            run_id=run_id, approval_id=approval_id, decision=decision, reason=reason, arguments_sha256=arguments_sha256
        )
        return await self.stub.Approve(request, metadata=((APPROVER_METADATA, approver),))
