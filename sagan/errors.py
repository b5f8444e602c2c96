"""One-line errors: what the library raises for bad input or state says in one line which file
or field is at fault (ConfigError, DataError, CheckpointError, ...). `one_line` fits a
third-party exception's message into such a line."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 200, with_type: bool = False) -> str:
    """`exc`'s message on one line (whitespace runs, newlines included, become one space), cut to
    `limit` characters; the type name when the message is empty, prefixed when `with_type`."""
    text = " ".join(str(exc).split())
    if with_type or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
