"""Text that a user or a received file controls, made safe to show: on a terminal, in Markdown, in HTML.

`printable` is the one function that keeps control characters out of what medistill shows: every
C0 control (newline and tab included), DEL, every C1 control, the Unicode line and paragraph
separators and the bidirectional overrides become visible escapes (`\\n`, `\\x1b`, `\\u202e`), so a
file name cannot add a line, move the cursor, recolour or retitle a terminal, or reorder what is
shown. Plain spaces are kept. `cell` builds on it for Markdown: one line, and the characters that
could add links, images, HTML, table cells or math escaped. `PrintableStream` guards a whole output
stream (the command line wraps stdout and stderr in it): control characters other than the newline
that ends a line never reach the terminal, whoever wrote them.
"""

from __future__ import annotations

import io
import re
from typing import Any, TextIO

_SPECIAL = re.compile(r"([\\`*_\[\]<>!|~&$])")  # what can start emphasis, code, links, images, HTML, cells or math
# C0 controls, DEL, C1 controls, line/paragraph separators, bidirectional embeddings, overrides and isolates
_OTHER_CONTROLS = "\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROLS = re.compile(f"[\x00-\x1f{_OTHER_CONTROLS}]")
_CONTROLS_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f{_OTHER_CONTROLS}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: Any) -> str:
    """`value` as one line of text with every control character shown as a visible escape (`\\n`, `\\x1b`)."""
    return _CONTROLS.sub(_escape, str(value))


def cell(value: Any) -> str:
    """`value` as text for one Markdown table cell or line: one line, control characters shown as escapes,
    runs of spaces collapsed, Markdown and HTML characters escaped."""
    text = " ".join(printable(value).split())
    return _SPECIAL.sub(r"\\\1", text)


class PrintableStream(io.TextIOBase):
    """A text stream that passes text on to `stream` with every control character but the newline escaped.

    It says it is not a terminal, so that libraries writing to it (rich) send plain text and no escape
    sequences of their own; `unguarded(stream)` gives the stream underneath, for a progress display that
    writes only text it has passed through `printable` itself.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.unguarded = stream

    def write(self, text: str) -> int:
        self.unguarded.write(_CONTROLS_BUT_NEWLINE.sub(_escape, text))
        return len(text)

    def flush(self) -> None:
        self.unguarded.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.unguarded.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.unguarded, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return getattr(self.unguarded, "errors", None) or "strict"


def unguarded(stream: TextIO) -> TextIO:
    """The stream a `PrintableStream` passes text on to (any other stream as it is)."""
    return stream.unguarded if isinstance(stream, PrintableStream) else stream


__all__ = ["PrintableStream", "cell", "printable", "unguarded"]
