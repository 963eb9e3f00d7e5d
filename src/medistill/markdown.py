"""Values from configs and metadata shown in Markdown (dataset cards, reports) as plain text.

Anything a user or a received file controls is escaped so it cannot add links, images, HTML,
table cells or lines to the document it is shown in.
"""

from __future__ import annotations

import re
from typing import Any

_SPECIAL = re.compile(r"([\\`*_\[\]<>!|~&$])")  # what can start emphasis, code, links, images, HTML, cells or math


def cell(value: Any) -> str:
    """`value` as text for one Markdown table cell or line: one line, Markdown and HTML characters escaped."""
    text = " ".join(str(value).split())
    return _SPECIAL.sub(r"\\\1", text)


__all__ = ["cell"]
