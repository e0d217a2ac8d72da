"""What the sweep says to a person: secrets taken out, errors cut to one readable line."""

from __future__ import annotations

import re

__all__ = ["UsageError", "one_line", "redact"]

# "scheme://user:password@host" anywhere in a text: the password is replaced, the user kept.
_CREDENTIALS = re.compile(r"(//[^:/@\s]*):[^@/\s]*@")


class UsageError(Exception):
    """Bad usage or an unusable environment: a command prints the message and exits 2."""


def redact(text: str) -> str:
    """``text`` (a URL, or a message that contains URLs) with every URL's password replaced by ``***``."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def one_line(exc: BaseException | None, *, limit: int = 200) -> str:
    """The first line of an exception's message (its type when it has none), redacted and cut."""
    if exc is None:
        return "unknown error"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = redact(text.strip().splitlines()[0]) if text.strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
