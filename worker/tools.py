"""Python tools an agent's model can call, as OpenAI Chat Completions function tools.

A tool is a typed function; its JSON schema comes from the type hints and its description from the docstring.
Adding one takes a few lines::

    from typing import Annotated

    from worker.tools import ToolContext, default_registry, tool

    @tool(requires_approval=True)
    async def send_email(to: Annotated[str, "Recipient address"], body: str, context: ToolContext) -> str:
        \"\"\"Send an email on the user's behalf.\"\"\"
        await mailer.send(to, body, dedupe_key=context.idempotency_key)
        return "sent"

The worker loads the module named in ``AGENTRUN_TOOL_MODULES`` (comma-separated)
and registers every ``Tool`` defined at its top level beside the built-ins; an
agent then lists ``send_email`` under its ``tools``.

Each call runs as its own activity, so a tool may run more than once for one call: a tool with side effects
should ask for a ``ToolContext`` and use its ``idempotency_key``. This module stays free of Temporal so tools
can be written and tested as plain Python.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import datetime as dt
import hashlib
import importlib
import inspect
import json
import math
import random
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, overload
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError

from shared.agents import AgentConfig


@dataclass(frozen=True)
class ToolContext:
    """Who is calling: the same ``idempotency_key`` is handed to every retry of one call."""

    run_id: str
    call_id: str
    idempotency_key: str


class ToolError(Exception):
    """A problem with a tool call, worded so it can be shown to the model."""


class UnknownToolError(ToolError):
    pass


class ToolArgumentError(ToolError):
    pass


class ToolUnavailableError(ToolError):
    """The service behind a tool cannot be reached now (an MCP server that is down, say): another attempt of the
    call may succeed, so the activity fails and Temporal retries it; the last attempt tells the model."""


def mcp_tool_name(server: str, tool: str) -> str:
    """The name under which the model sees the tool ``tool`` of the MCP server ``server``."""
    return f"mcp_{server}_{tool}"


# JSON Schema counts 3.0 as an integer; a Python function annotated ``int`` should never receive a float.
_Validator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)

# What OpenAI accepts as a function name.
_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    requires_approval: bool = False
    # The parameter of ``fn`` that receives the ToolContext, if any.
    _context_param: str | None = field(default=None, init=False, repr=False, compare=False)
    # Parameters of ``fn`` typed ``X | None`` without a default: the schema makes them optional, so a call
    # that leaves them out must still bind them.
    _none_params: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    _validator: Any = field(default=None, init=False, repr=False, compare=False)
    # Every model round checks the run's tools against their digests: worked out once, with the validator.
    _digest: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME_PATTERN.match(self.name):
            raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")
        try:
            _Validator.check_schema(self.parameters)
        except SchemaError as e:
            raise ValueError(f"tool {self.name!r}: parameters are not a valid JSON schema: {e.message}") from e
        context_param = None
        none_params = []
        for param in _parameters(self.fn):
            if param.annotation is ToolContext:
                context_param = param.name
            elif param.default is inspect.Parameter.empty and _is_nullable(param.annotation):
                none_params.append(param.name)
        object.__setattr__(self, "_context_param", context_param)
        object.__setattr__(self, "_none_params", tuple(none_params))
        object.__setattr__(self, "_validator", _Validator(self.parameters))
        canonical = json.dumps(self.parameters, sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "_digest", hashlib.sha256(canonical.encode()).hexdigest()[:16])

    def spec(self) -> dict[str, Any]:
        """The OpenAI tool definition."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                # A copy, so a caller that edits the request cannot change the tool.
                "parameters": copy.deepcopy(self.parameters),
            },
        }

    def digest(self) -> str:
        """A short hash of the arguments schema: a run started with one version refuses to run another."""
        return self._digest

    def validate(self, arguments: dict[str, Any]) -> None:
        """Raises ToolArgumentError describing every problem at once, so the model can fix them in one retry."""
        problems = [_describe_error(e) for e in self._validator.iter_errors(arguments)]
        if problems:
            raise ToolArgumentError("; ".join(sorted(set(problems))))


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    fn: None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
    requires_approval: bool = False,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
    requires_approval: bool = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Turns a function into a Tool; usable bare (``@tool``) or with options (``@tool(requires_approval=True)``)."""

    def wrap(fn: Callable[..., Any]) -> Tool:
        tool_name = name or fn.__name__
        text = description or _first_paragraph(inspect.getdoc(fn))
        if not text:
            raise TypeError(f"tool {tool_name!r} needs a description: give it a docstring or pass description=")
        return Tool(
            name=tool_name,
            description=text,
            parameters=parameters if parameters is not None else schema_from_signature(fn),
            fn=fn,
            requires_approval=requires_approval,
        )

    return wrap if fn is None else wrap(fn)


def schema_from_signature(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of ``fn``'s arguments, derived from its type hints."""
    label = getattr(fn, "__name__", repr(fn))
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in _parameters(fn):
        if param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL, param.VAR_KEYWORD):
            # Arguments arrive by name from a JSON object, so only named parameters can receive them.
            raise TypeError(f"parameter {param.name!r} of {label}: tools take keyword-compatible parameters only")
        if param.annotation is inspect.Parameter.empty:
            raise TypeError(f"parameter {param.name!r} of {label} needs a type annotation")
        if param.annotation is ToolContext:
            continue
        try:
            schema = _schema(param.annotation)
        except TypeError as e:
            raise TypeError(f"parameter {param.name!r} of {label}: {e}") from None
        if param.default is not inspect.Parameter.empty:
            try:
                json.dumps(param.default)
            except (TypeError, ValueError):
                raise TypeError(f"parameter {param.name!r} of {label}: default {param.default!r} is not JSON") from None
            schema["default"] = param.default
        elif _is_nullable(param.annotation):
            schema["default"] = None
        else:
            required.append(param.name)
        properties[param.name] = schema
    result: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        result["required"] = required
    result["additionalProperties"] = False
    return result


class ToolRegistry:
    """The tools known by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        # The names of the tools that each MCP server offers, as last listed.
        self._mcp: dict[str, list[str]] = {}
        for t in tools:
            self.register(t)

    def register(self, tool: Tool) -> Tool:
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def set_mcp_tools(self, server: str, tools: Iterable[Tool]) -> None:
        """Makes ``tools`` (named with mcp_tool_name) the whole of what ``server`` offers: its tools as listed at
        the worker's start, and again at each refresh."""
        tools = list(tools)
        old = set(self._mcp.get(server, ()))
        clash = [t.name for t in tools if t.name in self._tools and t.name not in old]
        if clash:
            raise ValueError(f"MCP server {server!r}: tool names {clash} are taken by Python tools")
        for name in old:
            del self._tools[name]
        self._tools.update((t.name, t) for t in tools)
        self._mcp[server] = [t.name for t in tools]

    def agent_tools(self, agent: AgentConfig, snapshot: Mapping[str, str] | None = None) -> list[str]:
        """The tools the agent's model is offered: the ones it names, and the tools of its MCP servers that its
        filters let through.

        A run keeps the MCP tools it started with: once its first round recorded ``snapshot`` (name to schema
        digest), its MCP tools are those, whatever a refresh listed since; a tool a server adds is for new runs.
        """
        names = list(agent.tools)
        for use in agent.mcp_servers:
            prefix = mcp_tool_name(use.server, "")
            if snapshot:
                names += [name for name in snapshot if name.startswith(prefix)]
            else:
                names += [name for name in self._mcp.get(use.server, ()) if use.admits(name.removeprefix(prefix))]
        return names

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            available = ", ".join(sorted(self._tools)) or "none"
            raise UnknownToolError(f"unknown tool {name!r}; available tools: {available}") from None

    def has(self, name: str) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self, names: Iterable[str]) -> list[dict[str, Any]]:
        if isinstance(names, str):
            # A bare string is iterable too, and would be read letter by letter.
            raise TypeError("specs() takes a collection of tool names, not a single name")
        # OpenAI rejects a request that defines one function twice.
        return [self.get(name).spec() for name in dict.fromkeys(names)]

    def parse_arguments(self, name: str, arguments_json: str) -> dict[str, Any]:
        """The arguments of a call from the model, checked against the tool's schema."""
        tool = self.get(name)
        # Models send an empty string rather than "{}" for a call without arguments.
        if not arguments_json.strip():
            arguments_json = "{}"
        try:
            arguments = json.loads(arguments_json)
        except json.JSONDecodeError as e:
            raise ToolArgumentError(
                f"arguments are not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        if not isinstance(arguments, dict):
            raise ToolArgumentError(f"arguments must be a JSON object, not {_json_type(arguments)}")
        tool.validate(arguments)
        return arguments

    async def run(self, name: str, arguments: dict[str, Any], context: ToolContext) -> str:
        """Calls the tool and returns its result as text; the tool's own exceptions propagate unchanged."""
        tool = self.get(name)
        # Checked again because arguments may come from somewhere other than parse_arguments.
        tool.validate(arguments)
        kwargs = {param: None for param in tool._none_params} | arguments
        if tool._context_param is not None:
            kwargs[tool._context_param] = context
        if inspect.iscoroutinefunction(tool.fn):
            result = await tool.fn(**kwargs)
        else:
            # A blocking tool must not stall the event loop the activity worker shares.
            result = await asyncio.to_thread(tool.fn, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        return result if isinstance(result, str) else json.dumps(result, default=str)


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    try:
        # eval_str resolves annotations written as strings (``from __future__ import annotations``).
        return list(inspect.signature(fn, eval_str=True).parameters.values())
    except NameError as e:
        raise TypeError(f"cannot resolve the type hints of {getattr(fn, '__name__', fn)!r}: {e}") from None
    except ValueError:
        return []  # some builtins have no signature; they can only be described by an explicit schema


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _is_nullable(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


_SIMPLE_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and annotation in _SIMPLE_TYPES:
        return {"type": _SIMPLE_TYPES[annotation]}
    if origin is Annotated:
        schema = _schema(args[0])
        descriptions = [meta for meta in args[1:] if isinstance(meta, str)]
        if descriptions:
            schema["description"] = " ".join(descriptions)
        return schema
    if annotation is list or origin is list:
        return {"type": "array", "items": _schema(args[0])} if args else {"type": "array"}
    if annotation is dict or origin is dict:
        if not args:
            return {"type": "object"}
        if args[0] is not str:
            raise TypeError(f"{annotation!r} is not supported: JSON object keys are strings")
        return {"type": "object", "additionalProperties": _schema(args[1])}
    if origin is Literal:
        return _enum_schema(annotation, args)
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(others) != 1 or len(others) == len(args):
            raise TypeError(f"{annotation!r} is not supported: only a single type or 'X | None' is")
        return _nullable(_schema(others[0]))
    raise TypeError(f"{annotation!r} is not a supported tool argument type")


def _enum_schema(annotation: Any, values: tuple[Any, ...]) -> dict[str, Any]:
    kinds = set()
    for value in values:
        if value is None:
            kinds.add("null")
        elif type(value) in _SIMPLE_TYPES:
            kinds.add(_SIMPLE_TYPES[type(value)])
        else:
            raise TypeError(f"{annotation!r} is not supported: literal {value!r} is not a JSON value")
    if kinds == {"integer", "number"}:
        kinds = {"number"}
    schema: dict[str, Any] = {"enum": list(values)}
    if len(kinds - {"null"}) == 1:
        schema["type"] = sorted(kinds, key=lambda kind: kind == "null") if "null" in kinds else kinds.pop()
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "enum" in schema:
        if None not in schema["enum"]:
            schema["enum"].append(None)
        if "type" not in schema:
            return schema
    if isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
        return schema
    if isinstance(schema.get("type"), list):
        if "null" not in schema["type"]:
            schema["type"].append("null")
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _describe_error(error: ValidationError) -> str:
    where = _path(error.absolute_path)
    schema = typing.cast(dict[str, Any], error.schema)
    if error.validator == "required" and isinstance(error.instance, dict):
        # jsonschema reports each missing name separately but without naming it; list them all and let the
        # caller drop the repeats.
        missing = [name for name in typing.cast(list[str], error.validator_value) if name not in error.instance]
        return "; ".join(f"missing required argument {_path([*error.absolute_path, name])!r}" for name in missing)
    if error.validator == "additionalProperties" and error.validator_value is False:
        declared = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        extra = [
            key
            for key in typing.cast(dict[str, Any], error.instance)
            if key not in declared and not any(re.search(pattern, key) for pattern in patterns)
        ]
        return "; ".join(f"unexpected argument {_path([*error.absolute_path, key])!r}" for key in extra)
    return f"argument {where!r}: {error.message}" if where else f"arguments: {error.message}"


def _path(parts: Iterable[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


# ---- Built-in tools ----

_MAX_EXPRESSION_LENGTH = 500
_MAX_EXPONENT = 1000
# Beyond ~1200 digits a result is of no use to a model, and far larger ones take real time to compute.
_MAX_INT_BITS = 4096

_BINARY_OPERATORS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: _power(a, b),
}
_UNARY_OPERATORS: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.USub: lambda a: -a,
    ast.UAdd: lambda a: +a,
}
# Named so a model that writes '^' for a power learns what to write instead.
_FORBIDDEN_OPERATORS: dict[type[ast.AST], str] = {
    ast.BitXor: "'^' is not allowed; use ** for powers",
    ast.BitAnd: "'&' is not allowed",
    ast.BitOr: "'|' is not allowed",
    ast.LShift: "'<<' is not allowed",
    ast.RShift: "'>>' is not allowed",
    ast.MatMult: "'@' is not allowed",
    ast.Invert: "'~' is not allowed",
    ast.Not: "'not' is not allowed",
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "log": math.log,
    "log10": math.log10,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _power(base: Any, exponent: Any) -> Any:
    if abs(exponent) > _MAX_EXPONENT:
        raise ValueError(f"exponent {exponent} is too large (at most {_MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exponent, int) and base.bit_length() * exponent > _MAX_INT_BITS:
        raise ValueError("result is too large")
    return base**exponent


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ValueError(f"the constant {node.value!r} is not allowed; only numbers are")
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in _CONSTANTS:
            raise ValueError(f"the name {node.id!r} is not allowed; known constants: {', '.join(_CONSTANTS)}")
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        op_type = type(node.op)
        if op_type in _FORBIDDEN_OPERATORS:
            raise ValueError(f"the operator {_FORBIDDEN_OPERATORS[op_type]}")
        if isinstance(node, ast.BinOp):
            result = _BINARY_OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
        else:
            result = _UNARY_OPERATORS[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise ValueError("only calls of named functions are allowed, such as sqrt(2)")
        if node.func.id not in _FUNCTIONS:
            raise ValueError(f"the function {node.func.id!r} is not allowed; known functions: {', '.join(_FUNCTIONS)}")
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
            raise ValueError(f"{node.func.id}() takes plain positional arguments only")
        try:
            result = _FUNCTIONS[node.func.id](*(_evaluate(arg) for arg in node.args))
        except TypeError as e:
            raise ValueError(f"bad arguments to {node.func.id}(): {e}") from None
    elif isinstance(node, ast.Attribute):
        raise ValueError("attribute access is not allowed")
    else:
        raise ValueError(f"{type(node).__name__} expressions are not allowed; only arithmetic is")
    if isinstance(result, complex):
        raise ValueError("the result is not a real number")
    if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS:
        raise ValueError("result is too large")
    return typing.cast(int | float, result)


@tool
def calculator(
    expression: Annotated[str, "An arithmetic expression, e.g. '2 * (3 + 4) ** 2' or 'sqrt(2) / 2'"],
) -> float:
    """Evaluate an arithmetic expression exactly as written. Supports numbers, + - * / // % ** and parentheses,
    the functions sqrt, abs, round, min, max, floor, ceil, exp, log, log10, sin, cos, tan (radians), and the
    constants pi, e and tau."""
    if len(expression) > _MAX_EXPRESSION_LENGTH:
        raise ValueError(f"the expression is too long (at most {_MAX_EXPRESSION_LENGTH} characters)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"the expression is not valid arithmetic: {e.msg}") from None
    try:
        return _evaluate(tree)
    except OverflowError:
        raise ValueError("result is too large") from None


@tool
def current_time(timezone: Annotated[str, "IANA time zone name, e.g. 'Europe/Paris'"] = "UTC") -> str:
    """Get the current date and time, as ISO 8601, in a time zone."""
    zone: dt.tzinfo
    if timezone == "UTC":
        zone = dt.UTC  # needs no time zone database on the host
    else:
        try:
            zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r}; use an IANA name such as 'Europe/Paris'") from None
    return dt.datetime.now(zone).isoformat(timespec="seconds")


@tool
def echo(text: Annotated[str, "The text to return"]) -> str:
    """Return the given text unchanged."""
    return text


@tool(name="random")
def random_number(
    minimum: Annotated[int, "Smallest possible value"] = 0,
    maximum: Annotated[int, "Largest possible value"] = 100,
) -> int:
    """Pick a random integer between minimum and maximum, both included."""
    if minimum > maximum:
        raise ValueError(f"minimum ({minimum}) is greater than maximum ({maximum})")
    return random.randint(minimum, maximum)


def builtin_tools() -> list[Tool]:
    return [calculator, current_time, echo, random_number]


def default_registry(modules: Iterable[str] = ()) -> ToolRegistry:
    """The built-in tools and every Tool defined at the top level of ``modules``."""
    registry = ToolRegistry(builtin_tools())
    for name in modules:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, Tool) and value not in builtin_tools():
                registry.register(value)
    return registry
