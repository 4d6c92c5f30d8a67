"""Agent definitions: the configuration file that the server and the worker both read."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml


class AgentConfigError(ValueError):
    """The agents file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class AgentConfig:
    """One agent: what it is told, which model it calls and how that model samples."""

    name: str
    model: str
    system_prompt: str = ""
    description: str = ""
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    def fingerprint(self) -> str:
        """A short hash of the whole definition, to notice a server and a worker that disagree."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


_FIELDS = {f.name for f in fields(AgentConfig)} - {"name"}


def load_agents(path: str | Path) -> dict[str, AgentConfig]:
    """Reads the agents file; every problem raises AgentConfigError naming where it is."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AgentConfigError(f"agents file {path} does not exist (set AGENTRUN_AGENTS_FILE)") from None
    except yaml.YAMLError as err:
        raise AgentConfigError(f"agents file {path} is not valid YAML: {err}") from None
    agents = (document or {}).get("agents") if isinstance(document, dict) else None
    if not isinstance(agents, dict) or not agents:
        raise AgentConfigError(f"agents file {path} must have a non-empty 'agents' mapping")
    loaded = {}
    for name, spec in agents.items():
        if not isinstance(spec, dict):
            raise AgentConfigError(f"{path}: agent {name!r} must be a mapping")
        unknown = set(spec) - _FIELDS
        if unknown:
            raise AgentConfigError(f"{path}: agent {name!r} has unknown keys {sorted(unknown)}")
        if not isinstance(spec.get("model"), str) or not spec["model"]:
            raise AgentConfigError(f"{path}: agent {name!r} needs a 'model' name")
        # YAML reads "0" as an int; Temporal's converter gives back a float. Normalize
        # so that the server's and the worker's fingerprints agree.
        for key in ("temperature", "top_p"):
            if isinstance(spec.get(key), int):
                spec[key] = float(spec[key])
        try:
            loaded[str(name)] = AgentConfig(name=str(name), **spec)
        except TypeError as err:
            raise AgentConfigError(f"{path}: agent {name!r}: {err}") from None
    return loaded
