"""The types that cross Temporal: cheap for its converter to decode."""

import dataclasses
import typing

from shared import agents, contract

# Types defined further down their module than a field that uses them.
FORWARD_REFERENCES = {("RunInput", "progress"), ("RunProgress", "approvals")}


def test_field_types_are_resolved_where_the_dataclasses_are_defined() -> None:
    # Temporal's converter resolves field types on every payload it decodes; a string annotation is compiled again
    # each time (``from __future__ import annotations`` makes every annotation one).
    checked = 0
    for module in (contract, agents):
        for name, cls in vars(module).items():
            if not (dataclasses.is_dataclass(cls) and isinstance(cls, type) and cls.__module__ == module.__name__):
                continue
            for field in dataclasses.fields(cls):
                checked += 1
                assert isinstance(field.type, str) == ((name, field.name) in FORWARD_REFERENCES), (name, field.name)
            typing.get_type_hints(cls)  # the quoted ones resolve
    assert checked > 50
