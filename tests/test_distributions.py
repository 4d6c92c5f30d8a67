"""Layering and packaging: each service loads only what it needs, and the client distribution stands alone."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import Stack

ROOT = Path(__file__).parent.parent
CLIENT_DISTRIBUTION = ROOT / "clients" / "python"


def modules_loaded_by(*imports: str) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``imports``."""
    code = f"import json, sys\nimport {', '.join(imports)}\nprint(json.dumps(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(output))


def under(modules: set[str], *packages: str) -> set[str]:
    return {m for m in modules if m.split(".")[0] in packages or m in packages}


def test_the_server_loads_neither_the_worker_nor_the_model_client() -> None:
    loaded = modules_loaded_by("agent_service.server")

    assert under(loaded, "worker", "openai") == set()
    assert "shared.contract" in loaded  # what it does depend on


def test_the_client_package_loads_neither_service() -> None:
    loaded = modules_loaded_by("agentrun", "agentrun.client", "agentrun.cli")

    assert under(loaded, "agent_service", "worker", "shared", "devstack", "temporalio", "redis", "openai") == set()


def test_the_worker_uses_only_the_generated_stubs_of_the_client_package() -> None:
    loaded = modules_loaded_by("worker.worker", "worker.workflows")
    assert under(loaded, "agentrun") <= {
        "agentrun",
        "agentrun.v1",
        *{m for m in loaded if m.startswith("agentrun.v1.")},
    }
    # Also what is imported only inside functions.
    for path in [*(ROOT / "worker").rglob("*.py"), *(ROOT / "shared").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("agentrun"):
                assert node.module == "agentrun.v1", f"{path.relative_to(ROOT)} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("agentrun.", "agent_service")), path


@pytest.mark.timeout(600)
async def test_the_client_distribution_installs_alone_and_streams_a_run(stack: Stack, tmp_path: Path) -> None:
    environment = tmp_path / "client-only"
    await asyncio.to_thread(venv.create, environment, with_pip=True)
    python = environment / "bin" / "python"
    install = await asyncio.create_subprocess_exec(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        str(CLIENT_DISTRIBUTION),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await install.communicate()
    assert install.returncode == 0, output.decode()
    key = stack.model.script({"text": "Hello from the client distribution."})
    script = f"""
import asyncio, importlib.util
from agentrun.client import AgentRunClient

async def main():
    async with AgentRunClient({stack.address!r}) as client:
        completed = await client.run("assistant", {key!r})
    print(completed.output)
    missing = [name for name in ("temporalio", "redis", "openai", "agent_service", "worker", "shared")
               if importlib.util.find_spec(name) is None]
    print(",".join(missing))

asyncio.run(main())
"""
    # Run from the temporary directory, so that the repository's packages are not on the path.
    run = await asyncio.create_subprocess_exec(
        python, "-c", script, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await run.communicate()

    assert run.returncode == 0, output.decode()
    answer, missing = output.decode().splitlines()
    assert answer == "Hello from the client distribution."
    assert missing == "temporalio,redis,openai,agent_service,worker,shared"
