"""Reading the Markdown guides the way the docs tests need: fenced blocks with the HTML
comment that marks them, sections by heading, table rows, links and GitHub anchors.

In: a Markdown file. Out: :class:`Block` objects (language, text, line, marker, heading) and
plain strings. Nothing here starts processes or reads anything but the file it is given.

Marker convention (the comment on the last non-blank line before a fence)::

    <!-- test -->                 run this example (docs/API.md)
    <!-- test: api-key=KEY -->    run it against a server started with --api-key KEY
    <!-- test: exit=N -->         run this CLI example, expect exit status N (USER_GUIDE.md)
    <!-- help: COMMAND -->        this block is `rocmforge COMMAND --help` verbatim
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS_DIR = REPO_ROOT / "docs"
DEPLOY_DIR = REPO_ROOT / "deploy"

_FENCE = re.compile(r"^```([\w+-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True, slots=True)
class Block:
    lang: str
    text: str
    line: int
    """1-based line of the opening fence."""
    marker: str | None
    """The text of the ``<!-- ... -->`` comment right before the fence, if any."""
    heading: str
    """The closest heading above the block."""

    def marker_options(self) -> dict[str, str]:
        """``"test: api-key=K, exit=2"`` -> ``{"api-key": "K", "exit": "2"}``."""
        _, _, options = (self.marker or "").partition(":")
        pairs = (part.strip().partition("=") for part in options.split(",") if part.strip())
        return {key.strip(): value.strip() for key, _, value in pairs}

    @property
    def marker_kind(self) -> str | None:
        return self.marker.partition(":")[0].strip() if self.marker else None


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def blocks(text: str) -> list[Block]:
    """Every fenced code block of a Markdown text, in order."""
    found: list[Block] = []
    lines = text.splitlines()
    heading = ""
    last_nonblank = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        match = _FENCE.match(line)
        if match:
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            marker = _MARKER.match(last_nonblank.strip())
            marker_text = marker.group(1) if marker else None
            found.append(Block(match.group(1), "\n".join(body), start + 1, marker_text, heading))
            last_nonblank = ""
            i += 1
            continue
        heading_match = _HEADING.match(line)
        if heading_match:
            heading = heading_match.group(2)
        if line.strip():
            last_nonblank = line
        i += 1
    return found


def following(all_blocks: list[Block], block: Block, text: str) -> Block | None:
    """The block right after ``block`` when only blank lines separate them."""
    index = all_blocks.index(block)
    if index + 1 >= len(all_blocks):
        return None
    nxt = all_blocks[index + 1]
    lines = text.splitlines()
    end = block.line + block.text.count("\n") + 1  # 0-based index of the closing fence
    between = lines[end + 1 : nxt.line - 1]
    return nxt if all(not line.strip() for line in between) else None


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every heading outside code blocks."""
    result: list[tuple[int, str]] = []
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = _HEADING.match(line)
        if match and not in_code:
            result.append((len(match.group(1)), match.group(2)))
    return result


def section(text: str, title: str) -> str:
    """The text under the heading ``title`` up to the next heading of the same or a higher
    level (the heading line excluded); raises if the heading is missing."""
    lines = text.splitlines()
    in_code = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = _HEADING.match(line)
        if match and not in_code and match.group(2) == title:
            level = len(match.group(1))
            body: list[str] = []
            code = False
            for other in lines[i + 1 :]:
                if other.startswith("```"):
                    code = not code
                nested = _HEADING.match(other)
                if nested and not code and len(nested.group(1)) <= level:
                    break
                body.append(other)
            return "\n".join(body)
    raise AssertionError(f"no heading {title!r}")


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row (separator rows excluded), outside code blocks."""
    rows: list[list[str]] = []
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        stripped = line.strip()
        if in_code or not stripped.startswith("|"):
            continue
        cells = [cell.strip() for cell in stripped.strip("|").split("|")]
        if all(re.fullmatch(r":?-{3,}:?", cell) for cell in cells):
            continue
        rows.append(cells)
    return rows


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def links(text: str) -> list[str]:
    """Link targets outside code blocks."""
    targets: list[str] = []
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            targets.extend(_LINK.findall(line))
    return targets


def github_anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    slug = title.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")
