"""Offline model server, exercised through the real openai client over a socket."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from worker.offline_model import MODEL_KEY, serve, tokenize


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    runner, url = await serve(port=0)
    try:
        yield url
    finally:
        await runner.cleanup()


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="offline", max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _root(base_url: str) -> str:
    return base_url.removesuffix("/v1")


async def _script(http: aiohttp.ClientSession, base_url: str, steps: list[dict[str, Any]]) -> str:
    key = f"script-{uuid.uuid4().hex}"
    body = {"key": key, "steps": steps}
    async with http.post(f"{_root(base_url)}/_offline/scripts", json=body) as r:
        assert r.status == 200, await r.text()
    return key


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def _stream_text(client: openai.AsyncOpenAI, text: str) -> list[str]:
    stream = await client.chat.completions.create(model="offline", messages=_user(text), stream=True)
    return [_content(c) async for c in stream if _content(c)]


def _content(chunk: ChatCompletionChunk) -> str:
    return (chunk.choices[0].delta.content or "") if chunk.choices else ""


def test_tokenize_round_trips() -> None:
    text = "  Hello  world.\nSecond line "
    assert "".join(tokenize(text)) == text
    assert tokenize("Hello world.") == ["Hello ", "world."]


async def test_models_lists_offline(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["offline"]


async def test_default_streamed_reply_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-anything",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "ping pong"},
        ],
        stream=True,
        stream_options={"include_usage": True},
        temperature=0.2,
        max_completion_tokens=50,
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.system_fingerprint for c in chunks} == {"agentrun-offline"}
    assert {c.model for c in chunks} == {"gpt-anything"}
    pieces = [_content(c) for c in chunks if _content(c)]
    assert "".join(pieces) == "I am the offline model. You said: ping pong"
    assert len(pieces) > 3
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == 4
    assert usage_chunk.usage.completion_tokens == len(pieces)
    assert usage_chunk.usage.total_tokens == 4 + len(pieces)


async def test_stream_without_include_usage_has_no_usage_chunk(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="offline", messages=_user("hi"), stream=True)
    chunks = [c async for c in stream]
    assert all(c.choices and c.usage is None for c in chunks)


async def test_non_streaming_reply_and_usage(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="offline",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
    )
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.content == "I am the offline model. You said: hello there"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 2
    assert completion.usage.completion_tokens == len(tokenize(choice.message.content))
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0


async def test_script_steps_consumed_in_order_then_last_repeats(
    client: openai.AsyncOpenAI, http: aiohttp.ClientSession, base_url: str
) -> None:
    key = await _script(http, base_url, [{"text": "first answer"}, {"chunks": ["sec", "ond"]}])
    replies = ["".join(await _stream_text(client, f"{key} turn {i}")) for i in range(3)]
    assert replies == ["first answer", "second", "second"]
    assert await _stream_text(client, f"{key} again") == ["sec", "ond"]


async def test_parallel_tool_calls_streaming(
    client: openai.AsyncOpenAI, http: aiohttp.ClientSession, base_url: str
) -> None:
    key = await _script(
        http,
        base_url,
        [
            {
                "tool_calls": [
                    {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                    {
                        "name": "get_time",
                        "arguments": '{"tz": "Europe/Paris"}',
                        "id": "call_custom",
                    },
                ]
            }
        ],
    )
    stream = await client.chat.completions.create(
        model="offline",
        messages=_user(f"weather? {key}"),
        stream=True,
        tools=[
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": {"type": "object"}},
            }
        ],
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for tc in choice.delta.tool_calls or []:
            acc = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            acc["id"] += tc.id or ""
            if tc.function:
                acc["name"] += tc.function.name or ""
                acc["arguments"] += tc.function.arguments or ""
    assert finish == "tool_calls"
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert json.loads(calls[1]["arguments"]) == {"tz": "Europe/Paris"}
    assert calls[0]["id"].startswith("call_") and calls[1]["id"] == "call_custom"


async def test_parallel_tool_calls_non_streaming(
    client: openai.AsyncOpenAI, http: aiohttp.ClientSession, base_url: str
) -> None:
    key = await _script(
        http,
        base_url,
        [{"tool_calls": [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]}],
    )
    completion = await client.chat.completions.create(model="offline", messages=_user(key))
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    tool_calls = [t for t in choice.message.tool_calls or [] if isinstance(t, ChatCompletionMessageFunctionToolCall)]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in tool_calls] == [
        ("a", {"x": 1}),
        ("b", {}),
    ]
    assert len({t.id for t in tool_calls}) == 2


async def test_error_step_raises_api_status_error(
    client: openai.AsyncOpenAI, http: aiohttp.ClientSession, base_url: str
) -> None:
    key = await _script(http, base_url, [{"error": {"status": 429, "message": "slow down"}}])
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="offline", messages=_user(key), stream=True)
    assert caught.value.status_code == 429
    assert "slow down" in caught.value.message


async def test_disconnect_after_chunks_breaks_stream(
    client: openai.AsyncOpenAI, http: aiohttp.ClientSession, base_url: str
) -> None:
    key = await _script(http, base_url, [{"text": "one two three four five", "disconnect_after_chunks": 2}])
    received: list[str] = []
    # A dropped chunked body surfaces as a connection error mid-iteration.
    with pytest.raises(openai.APIConnectionError):
        stream = await client.chat.completions.create(model="offline", messages=_user(key), stream=True)
        async for chunk in stream:
            received.append(_content(chunk))
    assert "".join(received) == "one two "


async def test_delays_are_applied(client: openai.AsyncOpenAI, http: aiohttp.ClientSession, base_url: str) -> None:
    key = await _script(http, base_url, [{"text": "a b c", "first_delay_ms": 100, "delay_ms": 30}])
    start = time.monotonic()
    stream = await client.chat.completions.create(model="offline", messages=_user(key), stream=True)
    arrivals: list[float] = []
    async for chunk in stream:
        if _content(chunk):
            arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 3
    assert arrivals[0] >= 0.09
    assert arrivals[2] - arrivals[0] >= 0.05


async def test_recorded_requests_and_delete(
    client: openai.AsyncOpenAI, http: aiohttp.ClientSession, base_url: str
) -> None:
    key = await _script(http, base_url, [{"text": "ok"}])
    await client.chat.completions.create(model="offline", messages=_user(f"first {key}"))
    await client.chat.completions.create(
        model="offline",
        messages=[
            {"role": "user", "content": f"first {key}"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second"},
        ],
    )
    await client.chat.completions.create(model="offline", messages=_user("unrelated"))

    url = f"{_root(base_url)}/_offline/scripts/{key}"
    async with http.get(f"{url}/requests") as r:
        recorded = (await r.json())["requests"]
    assert [len(req["messages"]) for req in recorded] == [1, 3]
    assert recorded[1]["messages"][-1] == {"role": "user", "content": "second"}

    async with http.delete(url) as r:
        assert r.status == 200
    completion = await client.chat.completions.create(model="offline", messages=_user(key))
    assert completion.choices[0].message.content == f"I am the offline model. You said: {key}"


async def test_bad_requests_get_openai_style_400(
    client: openai.AsyncOpenAI, http: aiohttp.ClientSession, base_url: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="offline", messages=[])
    assert caught.value.status_code == 400

    async with http.post(f"{base_url}/chat/completions", data=b"{not json") as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["type"] == "invalid_request_error" and error["code"] is None

    async with http.post(f"{_root(base_url)}/_offline/scripts", json={"key": "k", "steps": [{"txt": "typo"}]}) as r:
        assert r.status == 400
        assert "txt" in (await r.json())["error"]["message"]


async def test_client_closing_stream_early_is_not_a_server_error(
    client: openai.AsyncOpenAI,
    http: aiohttp.ClientSession,
    base_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = await _script(http, base_url, [{"text": "w " * 10, "delay_ms": 10}])
    stream = await client.chat.completions.create(model="offline", messages=_user(key), stream=True)
    async for _ in stream:
        break
    await stream.close()
    await asyncio.sleep(0.05)  # let the server try to write into the closed socket
    # The server keeps serving, and logs nothing at error level for the hang-up.
    completion = await client.chat.completions.create(model="offline", messages=_user("still there?"))
    assert (completion.choices[0].message.content or "").endswith("still there?")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_in_process_scripting_via_runner_app() -> None:
    runner, url = await serve(port=0)
    try:
        model = runner.app[MODEL_KEY]
        model.add_script("in-process-key", [{"text": "direct"}])
        async with openai.AsyncOpenAI(base_url=url, api_key="offline", max_retries=0) as c:
            completion = await c.chat.completions.create(model="offline", messages=_user("in-process-key"))
        assert completion.choices[0].message.content == "direct"
        assert len(model.requests_for("in-process-key")) == 1
    finally:
        await runner.cleanup()


async def test_without_a_script_it_uses_the_calculator_when_offered(client: openai.AsyncOpenAI) -> None:
    calculator: ChatCompletionToolParam = {
        "type": "function",
        "function": {"name": "calculator", "parameters": {"type": "object"}},
    }
    asked: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is 12 * (3 + 4)?"}]

    call = await client.chat.completions.create(model="offline", messages=asked, tools=[calculator])
    plain = await client.chat.completions.create(model="offline", messages=asked)
    answered = await client.chat.completions.create(
        model="offline",
        messages=[*asked, {"role": "tool", "tool_call_id": "call_1", "content": "84"}],
        tools=[calculator],
    )

    tool_call = (call.choices[0].message.tool_calls or [])[0]
    assert isinstance(tool_call, ChatCompletionMessageFunctionToolCall)
    assert tool_call.function.name == "calculator"
    assert json.loads(tool_call.function.arguments) == {"expression": "12 * (3 + 4)"}
    assert plain.choices[0].message.content == "I am the offline model. You said: What is 12 * (3 + 4)?"
    assert answered.choices[0].message.content == "The tool answered: 84"
