"""The agents file's MCP servers and the agents' use of them: what loads, and errors that name the place."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.agents import (
    MAX_MCP_CALL_SECONDS,
    MAX_MCP_CONNECT_SECONDS,
    AgentConfigError,
    McpServerUse,
    load_agents,
    load_mcp_servers,
    resolve_env,
)
from worker.workflows import TOOL_TIMEOUT

FILE = """
mcp_servers:
  files:
    command: npx
    args: [-y, server-filesystem, /srv, 8080]
    env: {LOG_LEVEL: info, API_KEY: "${FILES_KEY}"}
  search:
    url: https://search.example.com/mcp
    headers: {X-Team: support}
    bearer_token_env: SEARCH_TOKEN
    call_timeout_seconds: 120
    refresh_seconds: 0
agents:
  researcher:
    model: m
    mcp_servers:
      search:
      files: {allow: ["read_*", list_directory], deny: [read_secrets]}
  plain:
    model: m
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agents.yaml"
    path.write_text(text)
    return path


def test_servers_and_their_use_load(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)

    servers = load_mcp_servers(path)
    agents = load_agents(path)

    files, search = servers["files"], servers["search"]
    assert (files.transport, files.command, files.args) == ("stdio", "npx", ("-y", "server-filesystem", "/srv", "8080"))
    assert files.env == {"LOG_LEVEL": "info", "API_KEY": "${FILES_KEY}"}
    assert (search.transport, search.url, search.headers) == ("http", search.url, {"X-Team": "support"})
    assert (search.bearer_token_env, search.call_timeout_seconds, search.refresh_seconds) == ("SEARCH_TOKEN", 120, 0)
    assert (files.connect_timeout_seconds, files.call_timeout_seconds, files.refresh_seconds) == (10, 60, 300)
    assert agents["researcher"].mcp_servers == (
        McpServerUse("search"),
        McpServerUse("files", allow=("read_*", "list_directory"), deny=("read_secrets",)),
    )
    assert agents["plain"].mcp_servers == ()


def test_filters_allow_by_name_or_pattern_and_deny_wins() -> None:
    use = McpServerUse("files", allow=("read_*", "list_directory"), deny=("read_secrets",))
    assert [use.admits(t) for t in ("read_file", "list_directory", "read_secrets", "write_file")] == [
        True,
        True,
        False,
        False,
    ]
    everything_but = McpServerUse("files", deny=("write_*",))
    assert everything_but.admits("read_file") and not everything_but.admits("write_file")


@pytest.mark.parametrize(
    ("servers", "agent", "problem"),
    [
        ("{}", "{nope: {}}", "agent 'a': mcp_servers: 'nope' is not defined in the file's mcp_servers (defined: none)"),
        ("{s: {command: x}}", "[s]", "agent 'a': 'mcp_servers' must be a mapping of server names"),
        ("{s: {command: x}}", "{s: {allow: [a], only: [b]}}", "agent 'a': mcp_servers: 's' must map to {allow"),
        ("{s: {command: x}}", "{s: {deny: read_*}}", "agent 'a': 'mcp_servers.s.deny' must be a list"),
        ("{s: {command: x, url: 'http://h'}}", "{}", "mcp_servers: 's': needs either 'command' (stdio) or 'url'"),
        ("{s: {args: [a]}}", "{}", "mcp_servers: 's': needs either 'command'"),
        ("{my_server: {command: x}}", "{}", "mcp_servers: 'my_server': the name must be 1-32 letters, digits or '-'"),
        ("{s: {command: x, colour: red}}", "{}", "mcp_servers: 's': has unknown keys ['colour']"),
        ("{s: {command: x, headers: {A: b}}}", "{}", "mcp_servers: 's': headers do not apply to a stdio server"),
        ("{s: {url: 'http://h', env: {A: b}}}", "{}", "mcp_servers: 's': env do not apply to a HTTP server"),
        ("{s: {url: 'ftp://h'}}", "{}", "mcp_servers: 's': 'url' must start with http:// or https://"),
        ("{s: {url: 'http://h', bearer_token_env: 'sk-123'}}", "{}", "'bearer_token_env' must be the name of an"),
        ("{s: {url: 'http://h', headers: {Authorization: Bearer sk}}}", "{}", "the Authorization header must not"),
        ("{s: {command: x, args: a}}", "{}", "mcp_servers: 's': 'args' must be a list of strings"),
        ("{s: {command: x, call_timeout_seconds: 600}}", "{}", "'call_timeout_seconds' must be positive and at"),
        ("{s: {command: x, connect_timeout_seconds: 0}}", "{}", "'connect_timeout_seconds' must be positive"),
        ("{s: {command: x, refresh_seconds: -1}}", "{}", "'refresh_seconds' must be 0 (never) or positive"),
        ("{s: {command: x, refresh_seconds: soon}}", "{}", "'refresh_seconds' must be a number of seconds"),
        ("[s]", "{}", "'mcp_servers' must be a mapping of server names"),
    ],
)
def test_malformed_mcp_settings_are_reported_with_their_place(
    tmp_path: Path, servers: str, agent: str, problem: str
) -> None:
    path = write(tmp_path, f"mcp_servers: {servers}\nagents:\n  a: {{model: m, mcp_servers: {agent}}}\n")
    with pytest.raises(AgentConfigError, match=re.escape(problem)) as raised:
        load_agents(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_an_authorization_header_may_come_from_the_environment(tmp_path: Path) -> None:
    servers = "{s: {url: 'http://h', headers: {Authorization: 'Token ${T}'}}}"
    path = write(tmp_path, f"mcp_servers: {servers}\nagents: {{a: {{model: m}}}}")
    assert load_mcp_servers(path)["s"].headers == {"Authorization": "Token ${T}"}


def test_environment_references_resolve_or_name_the_missing_variable() -> None:
    assert resolve_env("Token ${A}-${B_2}", "headers.X", {"A": "x", "B_2": "y"}) == "Token x-y"
    assert resolve_env("no reference $A", "env.A", {}) == "no reference $A"
    unset = "headers.X names ${B}, which is not set in the worker's environment"
    with pytest.raises(ValueError, match=re.escape(unset)):
        resolve_env("${A}${B}", "headers.X", {"A": "x"})


def test_a_call_and_its_connect_fit_in_the_tool_activitys_timeout() -> None:
    assert MAX_MCP_CALL_SECONDS + MAX_MCP_CONNECT_SECONDS < TOOL_TIMEOUT.total_seconds()
