"""A tool module for the registry test, as a deployment would write one."""

from worker.tools import tool


@tool
def shout(text: str) -> str:
    """Returns the text in capitals."""
    return text.upper()
