"""Code hygiene of the package, checked on its syntax trees (``ast``), not with grep:

* no bare ``except:`` (it swallows ``KeyboardInterrupt`` and ``SystemExit`` too);
* no ``assert`` statements (they vanish under ``python -O``: validate with typed errors);
* no ``print(...)`` calls outside ``rocmforge/cli`` (library code logs; the CLI prints).

Benchmarks and tests are out of scope.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rocmforge

PACKAGE = Path(rocmforge.__file__).resolve().parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def _violations(path: Path, package: Path = PACKAGE) -> list[str]:
    """``file:line: what`` for each violation in the module at ``path``, in line order."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    may_print = package / "cli" in path.parents
    where = path.relative_to(package.parent)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is None:
            found.append((node.lineno, "bare 'except:'"))
        elif isinstance(node, ast.Assert):
            found.append((node.lineno, "'assert' statement"))
        elif (not may_print and isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "print"):
            found.append((node.lineno, "print() outside the CLI"))
    return [f"{where}:{line}: {what}" for line, what in sorted(found)]


def test_the_package_has_modules_to_check() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in MODULES}
    assert {"engine/scheduler.py", "server/app.py", "cli/main.py"} <= names, names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_module_hygiene(path: Path) -> None:
    assert _violations(path) == []


def test_the_checker_finds_each_violation(tmp_path: Path) -> None:
    """The checker itself: a module with one of each is reported three times (the same code
    under cli/ may print)."""
    source = "try:\n    pass\nexcept:\n    pass\nassert 1\nprint('x')\nlogger.info('print(')\n"
    lib = tmp_path / "rocmforge" / "engine" / "bad.py"
    cli = tmp_path / "rocmforge" / "cli" / "bad.py"
    for path in (lib, cli):
        path.parent.mkdir(parents=True)
        path.write_text(source)
    package = tmp_path / "rocmforge"
    assert _violations(lib, package) == [
        "rocmforge/engine/bad.py:3: bare 'except:'",
        "rocmforge/engine/bad.py:5: 'assert' statement",
        "rocmforge/engine/bad.py:6: print() outside the CLI",
    ]
    assert _violations(cli, package) == [
        "rocmforge/cli/bad.py:3: bare 'except:'",
        "rocmforge/cli/bad.py:5: 'assert' statement",
    ]
