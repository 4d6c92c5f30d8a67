"""The tool registry: schemas derived from type hints, argument checking, calls, and the built-in tools."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from typing import Annotated, Literal

import pytest

from shared.agents import AgentConfig, McpServerUse
from worker.tools import (
    Tool,
    ToolArgumentError,
    ToolContext,
    ToolRegistry,
    UnknownToolError,
    builtin_tools,
    calculator,
    current_time,
    default_registry,
    echo,
    mcp_tool_name,
    random_number,
    tool,
)

CONTEXT = ToolContext(run_id="run-1", call_id="call-1", idempotency_key="run-1/call-1")


@tool
def search(
    query: Annotated[str, "What to look for"],
    context: ToolContext,
    limit: int = 10,
    tags: list[str] | None = None,
    order: Literal["newest", "oldest"] = "newest",
    weights: dict[str, float] | None = None,
) -> list[str]:
    """Search the notes.

    Longer explanation that the model does not need."""
    return [query] * limit


# ---- Schema derivation ----


def test_schema_is_derived_from_type_hints() -> None:
    assert search.parameters == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to look for"},
            "limit": {"type": "integer", "default": 10},
            "tags": {"type": ["array", "null"], "items": {"type": "string"}, "default": None},
            "order": {"enum": ["newest", "oldest"], "type": "string", "default": "newest"},
            "weights": {"type": ["object", "null"], "additionalProperties": {"type": "number"}, "default": None},
        },
        "required": ["query"],
        "additionalProperties": False,
    }


def test_description_is_the_first_paragraph_of_the_docstring() -> None:
    assert search.name == "search"
    assert search.description == "Search the notes."


def test_nullable_without_default_is_optional_and_bool_float_map() -> None:
    @tool
    def f(flag: bool, ratio: float, note: str | None) -> None:
        """F."""

    assert f.parameters["required"] == ["flag", "ratio"]
    assert f.parameters["properties"] == {
        "flag": {"type": "boolean"},
        "ratio": {"type": "number"},
        "note": {"type": ["string", "null"], "default": None},
    }


def test_options_override_the_defaults() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}

    @tool(name="renamed", description="Explicit.", parameters=schema, requires_approval=True)
    def f(x: int) -> int:
        return x

    assert (f.name, f.description, f.parameters, f.requires_approval) == ("renamed", "Explicit.", schema, True)
    assert search.requires_approval is False


def test_spec_is_an_openai_function_tool() -> None:
    spec = search.spec()
    assert spec == {
        "type": "function",
        "function": {"name": "search", "description": "Search the notes.", "parameters": search.parameters},
    }
    spec["function"]["parameters"]["properties"].clear()
    assert search.parameters["properties"], "editing a spec must not change the tool"


class Opaque:
    pass


@pytest.mark.parametrize(
    "annotation",
    [Opaque, "set[int]", "int | str", "dict[int, str]", "Literal[1.5j]", "list[Opaque]"],
)
def test_unsupported_annotation_names_the_parameter(annotation: object) -> None:
    def f(bad):  # type: ignore[no-untyped-def]
        """F."""

    f.__annotations__ = {"bad": annotation}
    with pytest.raises(TypeError, match="parameter 'bad' of f"):
        tool(f)


def test_missing_annotation_names_the_parameter() -> None:
    def f(plain):  # type: ignore[no-untyped-def]
        """F."""

    with pytest.raises(TypeError, match="parameter 'plain' of f needs a type annotation"):
        tool(f)


def test_a_tool_needs_a_description_and_a_valid_name() -> None:
    def undocumented() -> None:
        pass

    with pytest.raises(TypeError, match="needs a description"):
        tool(undocumented)
    with pytest.raises(ValueError, match="must be 1-64 letters"):
        tool(name="has space", description="D.")(undocumented)


# ---- Registry ----


def test_registry_lookup_and_errors() -> None:
    registry = ToolRegistry([echo, calculator])
    assert registry.names() == ["echo", "calculator"]
    assert registry.get("echo") is echo
    with pytest.raises(ValueError, match="'echo' is already registered"):
        registry.register(echo)
    with pytest.raises(UnknownToolError, match=r"^unknown tool 'foo'; available tools: calculator, echo$"):
        registry.get("foo")
    with pytest.raises(UnknownToolError, match="unknown tool 'foo'"):
        registry.specs(["echo", "foo"])
    assert [s["function"]["name"] for s in registry.specs(["calculator", "echo", "calculator"])] == [
        "calculator",
        "echo",
    ]


def test_default_registry_holds_the_builtins() -> None:
    assert default_registry().names() == ["calculator", "current_time", "echo", "random"]
    assert [t.name for t in builtin_tools()] == default_registry().names()


# ---- Argument parsing ----


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("not json", "arguments are not valid JSON: Expecting value at line 1 column 1"),
        ("[1, 2]", "arguments must be a JSON object, not an array"),
        ('"text"', "arguments must be a JSON object, not a string"),
        ('{"query": 123}', "argument 'query': 123 is not of type 'string'"),
        ("{}", "missing required argument 'query'"),
        ("", "missing required argument 'query'"),
        ('{"query": "q", "limt": 5}', "unexpected argument 'limt'"),
        ('{"query": "q", "limit": 2.0}', "argument 'limit': 2.0 is not of type 'integer'"),
        ('{"query": "q", "limit": true}', "argument 'limit': True is not of type 'integer'"),
        ('{"query": "q", "tags": ["a", 1]}', "argument 'tags[1]': 1 is not of type 'string'"),
        ('{"query": "q", "order": "random"}', "argument 'order': 'random' is not one of ['newest', 'oldest']"),
        ('{"query": "q", "context": {}}', "unexpected argument 'context'"),
    ],
)
def test_parse_arguments_rejects_bad_arguments(arguments: str, message: str) -> None:
    registry = ToolRegistry([search])
    with pytest.raises(ToolArgumentError) as raised:
        registry.parse_arguments("search", arguments)
    assert str(raised.value) == message


def test_parse_arguments_reports_every_problem() -> None:
    with pytest.raises(ToolArgumentError) as raised:
        ToolRegistry([search]).parse_arguments("search", '{"qurey": "q", "limit": "5"}')
    assert str(raised.value) == (
        "argument 'limit': '5' is not of type 'integer'; missing required argument 'query'; unexpected argument 'qurey'"
    )


def test_parse_arguments_accepts_valid_arguments() -> None:
    registry = ToolRegistry([search])
    arguments = '{"query": "q", "tags": null, "order": "oldest", "weights": {"a": 1, "b": 0.5}}'
    assert registry.parse_arguments("search", arguments) == json.loads(arguments)
    with pytest.raises(UnknownToolError):
        registry.parse_arguments("nope", "{}")


# ---- Running ----


async def test_run_sync_tool_in_a_thread_with_context() -> None:
    seen: dict[str, object] = {}

    @tool
    def record(text: str, context: ToolContext, note: str | None) -> str:
        """Record."""
        seen.update(thread=threading.current_thread(), context=context, note=note)
        return text.upper()

    result = await ToolRegistry([record]).run("record", {"text": "hi"}, CONTEXT)
    assert result == "HI"
    assert seen["context"] == CONTEXT
    assert seen["note"] is None
    assert seen["thread"] is not threading.main_thread()


async def test_run_async_tool_gets_the_idempotency_key() -> None:
    @tool
    async def charge(amount: int, ctx: ToolContext) -> dict[str, object]:
        """Charge."""
        await asyncio.sleep(0)
        return {"amount": amount, "key": ctx.idempotency_key}

    result = await ToolRegistry([charge]).run("charge", {"amount": 5}, CONTEXT)
    assert json.loads(result) == {"amount": 5, "key": "run-1/call-1"}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain", "plain"),
        (42, "42"),
        (None, "null"),
        ({"a": [1, 2.5]}, '{"a": [1, 2.5]}'),
        (dt.date(2024, 1, 2), '"2024-01-02"'),
    ],
)
async def test_run_stringifies_results(value: object, text: str) -> None:
    returns = Tool(name="returns", description="R.", parameters={"type": "object"}, fn=lambda: value)
    assert await ToolRegistry([returns]).run("returns", {}, CONTEXT) == text


async def test_run_checks_arguments_and_lets_tool_errors_through() -> None:
    registry = default_registry()
    with pytest.raises(ToolArgumentError, match="missing required argument 'text'"):
        await registry.run("echo", {}, CONTEXT)
    with pytest.raises(ZeroDivisionError):
        await registry.run("calculator", {"expression": "1 / 0"}, CONTEXT)
    with pytest.raises(UnknownToolError):
        await registry.run("nope", {}, CONTEXT)


# ---- Built-in tools ----


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("-2 ** 2", -4),
        ("2 ** 3 ** 2", 512),
        ("7 // 2 + 7 % 3", 4),
        ("10 / 4", 2.5),
        ("sqrt(16) + abs(-2)", 6.0),
        ("round(pi, 2)", 3.14),
        ("min(3, 1, 2) + max(4, 5)", 6),
        ("round(e ** 2, 3)", 7.389),
        ("2 ** 1000 // 2 ** 999", 2),
    ],
)
def test_calculator_evaluates(expression: str, value: float) -> None:
    assert calculator.fn(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os')", "function '__import__' is not allowed"),
        ("().__class__", "not allowed"),
        ("(1).real", "attribute access is not allowed"),
        ("open('/etc/passwd')", "function 'open' is not allowed"),
        ("x + 1", "name 'x' is not allowed"),
        ("'a' * 3", "constant 'a' is not allowed"),
        ("2 ^ 3", "use \\*\\* for powers"),
        ("[1, 2]", "List expressions are not allowed"),
        ("lambda: 1", "Lambda expressions are not allowed"),
        ("2 ** 100000", "exponent 100000 is too large"),
        ("9 ** 999 ** 2", "exponent 998001 is too large"),
        ("(10 ** 1000) ** 1000", "too large"),
        ("10.0 ** 999", "too large"),
        ("(-8) ** 0.5", "not a real number"),
        ("sqrt()", "bad arguments to sqrt"),
        ("1 +", "not valid arithmetic"),
        ("1" * 501, "too long"),
    ],
)
def test_calculator_rejects(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calculator.fn(expression)


def test_current_time_in_a_zone() -> None:
    utc = dt.datetime.fromisoformat(current_time.fn())
    assert utc.utcoffset() == dt.timedelta(0)
    assert abs(utc - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=5)
    tokyo = dt.datetime.fromisoformat(current_time.fn("Asia/Tokyo"))
    assert tokyo.utcoffset() == dt.timedelta(hours=9)
    for zone in ("Mars/Olympus", "../etc/passwd", ""):
        with pytest.raises(ValueError, match=f"unknown time zone {zone!r}"):
            current_time.fn(zone)


async def test_echo_and_random_through_the_registry() -> None:
    registry = default_registry()
    assert await registry.run("echo", {"text": "héllo"}, CONTEXT) == "héllo"
    values = {int(await registry.run("random", {"minimum": 3, "maximum": 5}, CONTEXT)) for _ in range(60)}
    assert values == {3, 4, 5}
    assert 0 <= int(await registry.run("random", {}, CONTEXT)) <= 100
    assert random_number.fn(7, 7) == 7
    with pytest.raises(ValueError, match=r"minimum \(5\) is greater than maximum \(1\)"):
        random_number.fn(5, 1)


def test_the_default_registry_adds_the_tools_of_named_modules() -> None:
    registry = default_registry(["tests.worker.extra_tools"])
    assert "shout" in registry.names()
    assert set(registry.names()) >= {"calculator", "current_time", "echo", "random"}


def _mcp_tool(server: str, name: str, schema: dict[str, object] | None = None) -> Tool:
    return Tool(mcp_tool_name(server, name), name, schema or {"type": "object"}, fn=lambda: name)


def test_an_agent_is_offered_the_mcp_tools_its_filters_let_through() -> None:
    registry = default_registry()
    registry.set_mcp_tools("files", [_mcp_tool("files", n) for n in ("read_file", "read_secrets", "write_file")])
    registry.set_mcp_tools("web", [_mcp_tool("web", "fetch")])
    agent = AgentConfig(
        name="a",
        model="m",
        tools=("echo",),
        mcp_servers=(McpServerUse("files", allow=("read_*",), deny=("read_secrets",)), McpServerUse("web")),
    )

    assert registry.agent_tools(agent) == ["echo", "mcp_files_read_file", "mcp_web_fetch"]


def test_a_refresh_replaces_a_servers_tools_but_a_run_keeps_those_it_started_with() -> None:
    registry = default_registry()
    registry.set_mcp_tools("files", [_mcp_tool("files", "read_file")])
    agent = AgentConfig(name="a", model="m", mcp_servers=(McpServerUse("files"),))
    snapshot = {name: registry.get(name).digest() for name in registry.agent_tools(agent)}

    changed: dict[str, object] = {"type": "object", "properties": {"path": {"type": "string"}}}
    registry.set_mcp_tools("files", [_mcp_tool("files", "read_file", changed), _mcp_tool("files", "stat")])

    assert registry.agent_tools(agent) == ["mcp_files_read_file", "mcp_files_stat"]
    assert registry.agent_tools(agent, snapshot) == ["mcp_files_read_file"]
    assert registry.get("mcp_files_read_file").digest() != snapshot["mcp_files_read_file"]
    registry.set_mcp_tools("files", [])
    assert not registry.has("mcp_files_read_file") and "echo" in registry.names()


def test_an_mcp_tool_cannot_take_the_name_of_a_python_tool() -> None:
    registry = default_registry()
    registry.register(Tool("mcp_files_read", "A Python tool.", {"type": "object"}, fn=lambda: ""))
    with pytest.raises(ValueError, match=r"MCP server 'files': tool names \['mcp_files_read'\] are taken"):
        registry.set_mcp_tools("files", [_mcp_tool("files", "read")])
    assert registry.get("mcp_files_read").description == "A Python tool."
