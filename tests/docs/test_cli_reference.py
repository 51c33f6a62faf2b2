"""``docs/CLI_REFERENCE.md`` against the real command line: every command and option that
``--help`` shows is documented (in its command's section), nothing is documented that does
not exist, the help texts quoted are the real ones, and the exit-code table is
``cli/main.py``'s."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from doc_blocks import DOCS_DIR, REPO_ROOT, blocks, read, section, table_rows

CLI_DOC = DOCS_DIR / "CLI_REFERENCE.md"
CLI_MAIN = REPO_ROOT / "src" / "rocmforge" / "cli" / "main.py"
ROOT = ""
"""The key of the top-level ``rocmforge --help``."""
_OPTION_LINE = re.compile(r"^  (-[\w-]+(?:,\s*-[\w-]+)*(?:\s*/\s*--[\w-]+)?)")
_LONG_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_SHORT_OPTION = re.compile(r"(?<![\w-])-[a-zA-Z](?![\w-])")


def _help(command: str) -> str:
    """``rocmforge [command] --help`` as a user sees it (80 columns, no ROCMFORGE_* settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROCMFORGE_")}
    env["COLUMNS"] = "80"
    args = [sys.executable, "-m", "rocmforge.cli", *([command] if command else []), "--help"]
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60, env=env,
                            cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr
    return result.stdout.replace("python -m rocmforge.cli", "rocmforge")


def _section_lines(help_text: str, title: str) -> list[str]:
    lines = help_text.splitlines()
    try:
        start = lines.index(f"{title}:") + 1
    except ValueError:
        return []
    body = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break
        body.append(line)
    return body


def _commands(root_help: str) -> list[str]:
    return [m.group(1) for line in _section_lines(root_help, "Commands") if (m := re.match(r"^  ([\w-]+)\s", line))]


def _options(help_text: str) -> set[str]:
    """Every long and short option in the ``Options:`` section (``--stream / --no-stream`` is two)."""
    found: set[str] = set()
    for line in _section_lines(help_text, "Options"):
        match = _OPTION_LINE.match(line)
        if match:
            found.update(re.findall(r"-{1,2}[\w-]+", match.group(1)))
    return found


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """Command ('' for the top level) -> its help text."""
    root = _help(ROOT)
    commands = _commands(root)
    assert commands, root
    with ThreadPoolExecutor(max_workers=4) as pool:
        texts = dict(zip(commands, pool.map(_help, commands), strict=True))
    return {ROOT: root, **texts}


@pytest.fixture(scope="module")
def doc() -> str:
    return read(CLI_DOC)


def _command_section(doc: str, command: str) -> str:
    return section(doc, "Global options" if command == ROOT else f"`rocmforge {command}`")


def test_every_command_has_a_section(helps: dict[str, str], doc: str) -> None:
    for command in helps:
        assert _command_section(doc, command).strip(), command


def _mentioned_commands(doc: str, valued_globals: set[str]) -> set[str]:
    """Commands of the ``rocmforge ...`` command lines in code blocks and code spans."""
    texts = [b.text for b in blocks(doc) if b.lang in {"bash", "text"}] + re.findall(r"`([^`\n]+)`", doc)
    found: set[str] = set()
    for text in texts:
        for line in text.splitlines():
            words = line.split()
            for i, word in enumerate(words):
                if word != "rocmforge":
                    continue
                j = i + 1
                while j < len(words) and words[j].startswith("-"):
                    j += 2 if words[j] in valued_globals else 1
                if j < len(words) and re.fullmatch(r"[a-z][a-z-]*", words[j]):
                    found.add(words[j])
    return found


def test_every_documented_command_exists(helps: dict[str, str], doc: str) -> None:
    documented = re.findall(r"^## `rocmforge ([\w-]+)`", doc, flags=re.MULTILINE)
    assert set(documented) == set(helps) - {ROOT}
    valued = {m.group(1) for m in re.finditer(r"^  (--[\w-]+) <", helps[ROOT], flags=re.MULTILINE)}
    mentioned = _mentioned_commands(doc, valued)
    assert mentioned, "no command lines found"
    assert not mentioned - set(helps), f"documented commands that do not exist: {sorted(mentioned - set(helps))}"


def test_every_option_is_documented_in_its_section(helps: dict[str, str], doc: str) -> None:
    for command, text in helps.items():
        options = _options(text)
        assert "--help" in options, (command, text)
        body = _command_section(doc, command)
        missing = sorted(o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", body))
        assert not missing, f"`rocmforge {command}`: options missing from its section: {missing}"


def test_every_documented_option_exists(helps: dict[str, str], doc: str) -> None:
    real = set().union(*(_options(text) for text in helps.values()))
    long_documented = set(_LONG_OPTION.findall(doc))
    assert long_documented, "no options found in the document"
    assert not long_documented - real, f"documented but not in any --help: {sorted(long_documented - real)}"
    # Short options: only where the document shows a command line or an option list.
    short_documented = {opt for b in blocks(doc) for opt in _SHORT_OPTION.findall(b.text)
                        if b.lang in {"bash", "text"} and "rocmforge" in b.text}
    short_real = {o for o in real if not o.startswith("--")}
    assert not short_documented - short_real - {"-c", "-f"}, sorted(short_documented - short_real)


def test_quoted_help_texts_are_the_real_ones(helps: dict[str, str], doc: str) -> None:
    quoted = {b.marker.partition(":")[2].strip(): b.text for b in blocks(doc) if b.marker_kind == "help"}
    expected = {("rocmforge" if command == ROOT else command): text for command, text in helps.items()}
    assert set(quoted) == set(expected), "one `<!-- help: COMMAND -->` block per command"
    for command, text in expected.items():
        normalized = "\n".join(line.rstrip() for line in text.strip("\n").splitlines())
        assert quoted[command].strip("\n") == normalized, (
            f"the help of `{command}` changed; paste this into docs/CLI_REFERENCE.md:\n{normalized}"
        )


def _exit_constants() -> dict[str, int]:
    """``EXIT_* = ...`` assignments of cli/main.py (tuple assignments included)."""
    tree = ast.parse(CLI_MAIN.read_text(encoding="utf-8"))
    constants: dict[str, int] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for name, value in zip(names, values, strict=False):
                if isinstance(name, ast.Name) and name.id.startswith("EXIT_") and isinstance(value, ast.Constant):
                    constants[name.id] = value.value
    return constants


def test_exit_codes_match_the_cli(doc: str) -> None:
    constants = _exit_constants()
    assert constants, "no EXIT_* constants in cli/main.py"
    rows = table_rows(section(doc, "Exit codes and error messages"))
    documented = {}
    for cells in rows[1:]:
        names = re.findall(r"`(EXIT_\w+)`", cells[1])
        assert cells[0].isdigit() and len(names) == 1, cells
        documented[names[0]] = int(cells[0])
    assert documented == constants


def test_every_setting_is_in_the_configuration_table(doc: str) -> None:
    from code_facts import settings_variables

    rows = table_rows(section(doc, "Configuration and environment variables"))
    documented = {span for cells in rows[1:] for span in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])}
    assert documented == settings_variables()
