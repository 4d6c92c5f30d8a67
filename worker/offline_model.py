"""OFFLINE OpenAI-compatible model server.

This is not a language model: it answers Chat Completions requests with
deterministic or scripted replies over real HTTP, so the worker, its tests and
local demos can run without network access or API keys. It follows the
OpenAI wire format closely enough for the official ``openai`` client.

Tests script replies through HTTP (``/_offline/...``) because the server often
runs in a different process from the code under test.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from shared.agents import DELEGATION_TOOL_PREFIX

MODEL_NAME = "offline"
FINGERPRINT = "agentrun-offline"
# Tool-call arguments are streamed in slices of this many characters; JSON
# often has no whitespace, so word tokenization would yield a single piece.
ARGUMENT_PIECE_CHARS = 8
REQUEST_MAX_BYTES = 64 << 20

_TOKEN_RE = re.compile(r"\S+\s*|\s+")
# Arithmetic in a prompt, such as "what is 12 * (3 + 4)?".
_ARITHMETIC = re.compile(r"[\d.(][\d.\s()+\-*/%]*[+\-*/%][\d.\s()+\-*/%]*[\d.)]")


def tokenize(text: str) -> list[str]:
    """Split text into word-with-trailing-whitespace pieces; ''.join() restores it."""
    return _TOKEN_RE.findall(text)


def _argument_pieces(arguments: str) -> list[str]:
    return [arguments[i : i + ARGUMENT_PIECE_CHARS] for i in range(0, len(arguments), ARGUMENT_PIECE_CHARS)]


class ScriptError(ValueError):
    """A script or step definition is malformed."""


@dataclass(frozen=True)
class ToolCallSpec:
    name: str
    arguments: str
    id: str | None = None


@dataclass(frozen=True)
class Step:
    chunks: tuple[str, ...] = ()
    tool_calls: tuple[ToolCallSpec, ...] = ()
    delay_ms: float | None = None
    first_delay_ms: float = 0.0
    error_status: int | None = None
    error_message: str = ""
    # Sent as the error's Retry-After header (seconds), as a rate-limited endpoint does.
    retry_after: float | None = None
    disconnect_after_chunks: int | None = None


_STEP_KEYS = {
    "text",
    "chunks",
    "tool_calls",
    "delay_ms",
    "first_delay_ms",
    "error",
    "disconnect_after_chunks",
}


def _non_negative_number(raw: dict[str, Any], key: str, where: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ScriptError(f"{where}.{key} must be a non-negative number")
    return float(value)


def parse_step(raw: Any, where: str = "step") -> Step:
    """Validate one JSON step; errors name the offending field."""
    if not isinstance(raw, dict):
        raise ScriptError(f"{where} must be an object")
    # Reject unknown keys so a typo in a test fails loudly instead of silently
    # producing the default reply.
    unknown = sorted(set(raw) - _STEP_KEYS)
    if unknown:
        raise ScriptError(f"{where} has unknown field(s): {', '.join(unknown)}")
    if not raw.keys() & {"text", "chunks", "tool_calls", "error"}:
        raise ScriptError(f"{where} needs one of: text, chunks, tool_calls, error")
    if "text" in raw and "chunks" in raw:
        raise ScriptError(f"{where} cannot have both text and chunks")

    chunks: tuple[str, ...] = ()
    if "text" in raw:
        if not isinstance(raw["text"], str):
            raise ScriptError(f"{where}.text must be a string")
        chunks = tuple(tokenize(raw["text"]))
    elif "chunks" in raw:
        if not isinstance(raw["chunks"], list) or not all(isinstance(c, str) for c in raw["chunks"]):
            raise ScriptError(f"{where}.chunks must be a list of strings")
        chunks = tuple(raw["chunks"])

    tool_calls: list[ToolCallSpec] = []
    raw_calls = raw.get("tool_calls", [])
    if not isinstance(raw_calls, list):
        raise ScriptError(f"{where}.tool_calls must be a list")
    for i, call in enumerate(raw_calls):
        call_where = f"{where}.tool_calls[{i}]"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ScriptError(f"{call_where} must be an object with a string name")
        arguments = call.get("arguments", "{}")
        if not isinstance(arguments, str):
            try:
                arguments = json.dumps(arguments)
            except TypeError as exc:
                raise ScriptError(f"{call_where}.arguments: {exc}") from None
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ScriptError(f"{call_where}.id must be a string")
        tool_calls.append(ToolCallSpec(call["name"], arguments, call_id))

    error_status: int | None = None
    error_message = ""
    retry_after: float | None = None
    if "error" in raw:
        error = raw["error"]
        status = error.get("status") if isinstance(error, dict) else None
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ScriptError(f"{where}.error.status must be an integer 400-599")
        error_status = status
        error_message = str(error.get("message", "offline scripted error"))
        retry_after = error.get("retry_after")
        if retry_after is not None and (isinstance(retry_after, bool) or not isinstance(retry_after, int | float)):
            raise ScriptError(f"{where}.error.retry_after must be a number of seconds")

    disconnect = raw.get("disconnect_after_chunks")
    if disconnect is not None and (isinstance(disconnect, bool) or not isinstance(disconnect, int) or disconnect < 0):
        raise ScriptError(f"{where}.disconnect_after_chunks must be a non-negative integer")

    return Step(
        chunks=chunks,
        tool_calls=tuple(tool_calls),
        delay_ms=_non_negative_number(raw, "delay_ms", where),
        first_delay_ms=_non_negative_number(raw, "first_delay_ms", where) or 0.0,
        error_status=error_status,
        error_message=error_message,
        retry_after=retry_after,
        disconnect_after_chunks=disconnect,
    )


@dataclass
class _Script:
    steps: list[Step]
    used: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    request_times: list[float] = field(default_factory=list)
    # Keep only this many of the latest request bodies: a long run's requests hold its whole transcript each.
    keep: int | None = None

    def record(self, body: dict[str, Any]) -> None:
        self.requests.append(body)
        self.request_times.append(time.monotonic())
        if self.keep is not None:
            del self.requests[: -self.keep]

    def next_step(self) -> Step:
        # Past the end the last step repeats, so retries and extra turns stay
        # predictable instead of falling back to the default reply.
        step = self.steps[min(self.used, len(self.steps) - 1)]
        self.used += 1
        return step


def _message_texts(message: Any) -> list[str]:
    if not isinstance(message, dict):
        return []
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return []


def _error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error_response(message: str, status: int = 400, param: str | None = None) -> web.Response:
    return web.json_response(_error_body(message, status, param), status=status)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


@dataclass
class _Reply:
    """A step resolved for one request (tool-call ids assigned)."""

    chunks: tuple[str, ...]
    tool_calls: list[tuple[str, str, str]]  # (id, name, arguments)
    delay: float
    first_delay: float
    disconnect_after: int | None

    @property
    def completion_tokens(self) -> int:
        pieces = sum(len(_argument_pieces(args)) for _, _, args in self.tool_calls)
        return len(self.chunks) + pieces

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"


class OfflineModel:
    """State of the offline server: scripts, recorded requests, default delay."""

    def __init__(self, token_delay: float = 0.0) -> None:
        self.token_delay = token_delay
        self._scripts: dict[str, _Script] = {}
        self._call_ids = itertools.count(1)
        # aiohttp refuses bodies past 1 MiB by default; a long run's transcript is larger, as real endpoints allow.
        self.app = web.Application(client_max_size=REQUEST_MAX_BYTES)
        # Lets in-process callers of serve() reach the state via runner.app.
        self.app[MODEL_KEY] = self
        self.app.add_routes(
            [
                web.get("/v1/models", self._handle_models),
                web.post("/v1/chat/completions", self._handle_chat),
                web.post("/_offline/scripts", self._handle_add_script),
                web.get("/_offline/scripts/{key}/requests", self._handle_requests),
                web.delete("/_offline/scripts/{key}", self._handle_delete_script),
            ]
        )

    # --- in-process scripting API -------------------------------------------

    def add_script(self, key: str, steps: list[Any], *, keep_requests: int | None = None) -> None:
        """Register (or replace) a script; steps are JSON-shaped dicts. ``keep_requests`` keeps only the latest
        request bodies."""
        if not isinstance(key, str) or not key:
            raise ScriptError("key must be a non-empty string")
        if not isinstance(steps, list) or not steps:
            raise ScriptError("steps must be a non-empty list")
        parsed = [parse_step(s, f"steps[{i}]") for i, s in enumerate(steps)]
        self._scripts[key] = _Script(parsed, keep=keep_requests)

    def requests_for(self, key: str) -> list[dict[str, Any]]:
        """Chat request bodies that matched ``key``, oldest first."""
        return list(self._scripts[key].requests)

    def request_times_for(self, key: str) -> list[float]:
        """When each request that matched ``key`` arrived (monotonic seconds), oldest first."""
        return list(self._scripts[key].request_times)

    def remove_script(self, key: str) -> bool:
        return self._scripts.pop(key, None) is not None

    # --- reply selection ------------------------------------------------------

    def _match(self, messages: list[Any]) -> _Script | None:
        # Keys are in what the caller wrote; tool results, the bulk of a long run's messages, are not searched.
        said = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "tool")]
        texts = [t for m in said for t in _message_texts(m)]
        # First registered key wins, so overlapping keys behave predictably.
        for key, script in self._scripts.items():
            if any(key in t for t in texts):
                return script
        return None

    def _default_step(self, messages: list[Any], tools: list[Any]) -> Step:
        """Without a script: answer a tool result, hand the user's message to the first sub-agent offered, use the
        calculator on arithmetic, else echo the user.

        Just enough agent behaviour to show tool calls and approvals in a demo.
        """
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        if last.get("role") == "tool":
            result = " ".join(_message_texts(last))
            return Step(chunks=tuple(tokenize(f"The tool answered: {result}")))
        said = ""
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                said = " ".join(_message_texts(message))
                break
        names = [t.get("function", {}).get("name") for t in tools if isinstance(t, dict)]
        offered = set(names)
        delegations = [name for name in names if isinstance(name, str) and name.startswith(DELEGATION_TOOL_PREFIX)]
        if delegations:
            return Step(tool_calls=(ToolCallSpec(delegations[0], json.dumps({"task": said})),))
        arithmetic = _ARITHMETIC.search(said)
        if "calculator" in offered and arithmetic:
            expression = json.dumps({"expression": arithmetic.group(0).strip()})
            return Step(tool_calls=(ToolCallSpec("calculator", expression),))
        return Step(chunks=tuple(tokenize(f"I am the offline model. You said: {said}")))

    def _resolve(self, step: Step) -> _Reply:
        delay_ms = step.delay_ms
        delay = self.token_delay if delay_ms is None else delay_ms / 1000
        return _Reply(
            chunks=step.chunks,
            tool_calls=[(c.id or f"call_{next(self._call_ids)}", c.name, c.arguments) for c in step.tool_calls],
            delay=delay,
            first_delay=step.first_delay_ms / 1000,
            disconnect_after=step.disconnect_after_chunks,
        )

    # --- HTTP handlers --------------------------------------------------------

    async def _handle_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": MODEL_NAME,
                        "object": "model",
                        "created": 0,
                        "owned_by": "agentrun-offline",
                    }
                ],
            }
        )

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error_response("Request body is not valid JSON.")
        if not isinstance(body, dict):
            return _error_response("Request body must be a JSON object.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error_response("'messages' is required and must be a non-empty array.", param="messages")

        script = self._match(messages)
        if script is not None:
            script.record(body)
            step = script.next_step()
        else:
            tools = body.get("tools")
            step = self._default_step(messages, tools if isinstance(tools, list) else [])
        if step.error_status is not None:
            response = _error_response(step.error_message, step.error_status)
            if step.retry_after is not None:
                response.headers["Retry-After"] = f"{step.retry_after:g}"
            return response

        reply = self._resolve(step)
        prompt_tokens = max(1, sum(len(t.split()) for m in messages for t in _message_texts(m)))
        model = body.get("model") if isinstance(body.get("model"), str) else MODEL_NAME
        meta = {
            "id": f"chatcmpl-offline-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": FINGERPRINT,
        }
        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return await self._stream(request, reply, meta, prompt_tokens, include_usage)
        return await self._complete(request, reply, meta, prompt_tokens)

    async def _complete(
        self, request: web.Request, reply: _Reply, meta: dict[str, Any], prompt_tokens: int
    ) -> web.StreamResponse:
        # Take as long as the equivalent stream would, so latency settings
        # mean the same thing in both modes.
        pieces = reply.completion_tokens
        total = (reply.first_delay + reply.delay * max(0, pieces - 1)) if pieces else 0.0
        if total:
            await asyncio.sleep(total)
        if reply.disconnect_after is not None:
            return _drop_connection(request)

        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(reply.chunks) if reply.chunks or not reply.tool_calls else None,
            "refusal": None,
        }
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                for cid, name, args in reply.tool_calls
            ]
        return web.json_response(
            {
                **meta,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": reply.finish_reason,
                    }
                ],
                "usage": _usage(prompt_tokens, reply.completion_tokens),
            }
        )

    async def _stream(
        self,
        request: web.Request,
        reply: _Reply,
        meta: dict[str, Any],
        prompt_tokens: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            # aiohttp hands each write straight to the transport, so every
            # chunk leaves immediately; that is what makes TTFT measurable.
            await response.write(f"data: {data}\n\n".encode())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {
                **meta,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                out["usage"] = None
            return out

        deltas: list[dict[str, Any]] = [{"content": c} for c in reply.chunks]
        for index, (cid, name, args) in enumerate(reply.tool_calls):
            deltas.append(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": cid,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            )
            deltas.extend(
                {"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in _argument_pieces(args)
            )

        try:
            await send(chunk({"role": "assistant", "content": ""}))
            for sent, delta in enumerate(deltas):
                if reply.disconnect_after is not None and sent >= reply.disconnect_after:
                    return _drop_connection(request, response)
                wait = reply.first_delay if sent == 0 else reply.delay
                if wait:
                    await asyncio.sleep(wait)
                await send(chunk(delta))
            if reply.disconnect_after is not None:
                return _drop_connection(request, response)

            await send(chunk({}, reply.finish_reason))
            if include_usage:
                await send(
                    {
                        **meta,
                        "object": "chat.completion.chunk",
                        "choices": [],
                        "usage": _usage(prompt_tokens, reply.completion_tokens),
                    }
                )
            await send("[DONE]")
            await response.write_eof()
        except ConnectionResetError:
            # The client went away mid-stream (e.g. the agent cancelled);
            # that is routine for a streaming server, not an error to log.
            pass
        return response

    async def _handle_add_script(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error_response("Script body is not valid JSON.")
        if not isinstance(body, dict):
            return _error_response("Script body must be a JSON object with key and steps.")
        key: Any = body.get("key")
        steps: Any = body.get("steps")
        try:
            self.add_script(key, steps)
        except ScriptError as exc:
            return _error_response(str(exc))
        return web.json_response({"key": key, "steps": len(steps)})

    async def _handle_requests(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if key not in self._scripts:
            return _error_response(f"No script with key {key!r}.", status=404, param="key")
        return web.json_response({"requests": self.requests_for(key)})

    async def _handle_delete_script(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if not self.remove_script(key):
            return _error_response(f"No script with key {key!r}.", status=404, param="key")
        return web.json_response({"deleted": key})


def _drop_connection(request: web.Request, response: web.StreamResponse | None = None) -> web.StreamResponse:
    """Close the socket mid-response, like a model provider dropping a stream."""
    if request.transport is not None:
        # close() (not abort()) so chunks already written still reach the
        # client before the FIN; aiohttp then treats the finish as a reset.
        request.transport.close()
    return response if response is not None else web.Response()


MODEL_KEY = web.AppKey("offline_model", OfflineModel)


async def serve(host: str = "127.0.0.1", port: int = 0, *, token_delay: float = 0.0) -> tuple[web.AppRunner, str]:
    """Start the offline model server; returns the runner and its /v1 base URL."""
    model = OfflineModel(token_delay=token_delay)
    runner = web.AppRunner(model.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}/v1"


async def _main(host: str, port: int, token_delay: float) -> None:
    runner, base_url = await serve(host, port, token_delay=token_delay)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"agentrun OFFLINE model (not a real LLM) serving at {base_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="agentrun OFFLINE OpenAI-compatible model server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    asyncio.run(_main(args.host, args.port, args.token_delay_ms / 1000))


if __name__ == "__main__":
    main()
