"""How an error from a library becomes part of one line for the user."""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (load_state_dict's lists every missing key, torch's
    load errors add paragraphs of advice), or its type when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
