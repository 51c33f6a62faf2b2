"""``docs/API.md`` against a live server: every endpoint of ``/openapi.json`` is documented and
nothing else; every error code the code can answer with is in the error table (with its real
HTTP status); and every example marked ``<!-- test -->`` runs (curl through bash, Python through
the interpreter) and answers with the documented response's *shape*: the same keys,
recursively, and the same error ``code``; values (ids, text, timings) may differ."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import httpx
import pytest
from code_facts import error_class_codes, http_error_codes
from doc_blocks import DOCS_DIR, Block, blocks, code_spans, following, read, section, table_rows
from live_server import Server

API_DOC = DOCS_DIR / "API.md"
TEXT = read(API_DOC)
BLOCKS = blocks(TEXT)
EXAMPLES = [b for b in BLOCKS if b.marker_kind == "test"]
CURL_EXAMPLES = [b for b in EXAMPLES if b.lang == "bash"]
PYTHON_EXAMPLES = [b for b in EXAMPLES if b.lang == "python"]
DOCUMENTED_URL = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):8080")
EXACT_KEYS = {"code", "object"}
"""Keys whose values must match too (values elsewhere may differ from run to run)."""
EXAMPLE_TIMEOUT_S = 60


def _example_id(block: Block) -> str:
    return f"line{block.line}"


def _server_for(block: Block, servers: dict[str | None, Server]) -> Server:
    return servers[block.marker_options().get("api-key")]


def _rewrite(code: str, url: str) -> str:
    return DOCUMENTED_URL.sub(url, code)


# --- shapes -----------------------------------------------------------------------------------


def shape_problems(doc: Any, real: Any, path: str = "$") -> list[str]:
    """How ``real`` differs in shape from ``doc``: object keys (recursively), containers vs
    scalars, and the values of ``EXACT_KEYS``. Lists are compared element by element over the
    common length, extra real elements against the last documented one."""
    if isinstance(doc, dict):
        if not isinstance(real, dict):
            return [f"{path}: documented an object, got {json.dumps(real)[:80]}"]
        problems = []
        if set(doc) != set(real):
            problems.append(f"{path}: documented keys {sorted(doc)}, real keys {sorted(real)}")
        for key in sorted(set(doc) & set(real)):
            if key in EXACT_KEYS and isinstance(doc[key], str) and doc[key] != real[key]:
                problems.append(f"{path}.{key}: documented {doc[key]!r}, real {real[key]!r}")
            problems += shape_problems(doc[key], real[key], f"{path}.{key}")
        return problems
    if isinstance(doc, list):
        if not isinstance(real, list):
            return [f"{path}: documented a list, got {json.dumps(real)[:80]}"]
        problems = []
        for i, item in enumerate(real):
            if doc:
                problems += shape_problems(doc[min(i, len(doc) - 1)], item, f"{path}[{i}]")
        return problems
    if isinstance(real, (dict, list)):
        return [f"{path}: documented {json.dumps(doc)}, got a {type(real).__name__}"]
    return []


def sse_events(text: str) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) of a server-sent event stream; ``[DONE]`` stays a string."""
    events = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        name, data = None, []
        for line in chunk.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            payload = "\n".join(data)
            events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return events


def stream_problems(doc_text: str, real_text: str) -> list[str]:
    """Documented vs real event stream: the first and the last events correspond, and every
    event of each side has the shape of some event of the same name on the other side."""
    doc, real = sse_events(doc_text), sse_events(real_text)
    if not doc or not real:
        return [f"empty stream: documented {len(doc)} events, got {len(real)}:\n{real_text}"]
    problems = []
    for label, d, r in (("first", doc[0], real[0]), ("last", doc[-1], real[-1])):
        if d[0] != r[0]:
            problems.append(f"{label} event: documented {d[0]!r}, real {r[0]!r}")
        problems += [f"{label} event: {p}" for p in shape_problems(d[1], r[1])]
        if isinstance(d[1], str) and d[1] != r[1]:
            problems.append(f"{label} event: documented {d[1]!r}, real {r[1]!r}")

    def matches(event: tuple[str | None, Any], others: list[tuple[str | None, Any]]) -> bool:
        return any(o[0] == event[0] and not shape_problems(o[1], event[1]) and not shape_problems(event[1], o[1])
                   for o in others)

    problems += [f"real event not documented: {e}" for e in real if not matches(e, doc)]
    problems += [f"documented event never seen: {e}" for e in doc if not matches(e, real)]
    return problems


# --- the examples -----------------------------------------------------------------------------


def test_examples_are_marked() -> None:
    assert len(CURL_EXAMPLES) >= 15 and PYTHON_EXAMPLES
    for block in CURL_EXAMPLES:
        response = following(BLOCKS, block, TEXT)
        assert response is not None and response.lang in {"json", "text"}, (
            f"API.md line {block.line}: a tested curl example needs its response right after it "
            "(a ```json block, or ```text for a stream)"
        )
        assert "curl" in block.text


@pytest.fixture(scope="module")
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    return path


@pytest.mark.parametrize("block", CURL_EXAMPLES, ids=_example_id)
def test_curl_example(block: Block, curl: str, docs_servers: dict[str | None, Server]) -> None:
    server = _server_for(block, docs_servers)
    script = "set -euo pipefail\n" + _rewrite(block.text, server.url)
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run(["bash", "-c", script], check=False, capture_output=True, text=True,
                                timeout=EXAMPLE_TIMEOUT_S, cwd=cwd)
    assert result.returncode == 0, f"API.md line {block.line} failed:\n{result.stderr}"
    response = following(BLOCKS, block, TEXT)
    assert response is not None
    if response.lang == "json":
        try:
            real = json.loads(result.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"API.md line {block.line}: the answer is not JSON:\n{result.stdout}")
        problems = shape_problems(json.loads(response.text), real)
    else:
        problems = stream_problems(response.text, result.stdout)
    assert not problems, f"API.md line {block.line}: the real answer differs:\n" + "\n".join(problems) + (
        f"\nreal answer:\n{result.stdout}")


@pytest.mark.parametrize("block", PYTHON_EXAMPLES, ids=_example_id)
def test_python_example(block: Block, docs_servers: dict[str | None, Server]) -> None:
    if "from openai import" in block.text:
        pytest.importorskip("openai")
    server = _server_for(block, docs_servers)
    with tempfile.TemporaryDirectory() as cwd:
        code = _rewrite(block.text, server.url)
        result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                                timeout=EXAMPLE_TIMEOUT_S, cwd=cwd)
    assert result.returncode == 0, f"API.md line {block.line} failed:\n{result.stderr}"
    assert result.stdout.strip(), f"API.md line {block.line} printed nothing"


def test_shape_comparison_catches_differences() -> None:
    """The comparison itself: a renamed or missing key, a list for an object, another error code."""
    doc = {"a": 1, "b": {"c": [{"d": 1}]}, "error": {"code": "x"}}
    assert not shape_problems(doc, {"a": "other", "b": {"c": [{"d": 2}, {"d": 3}]}, "error": {"code": "x"}})
    assert shape_problems(doc, {"a": 1, "b": {"c": [{"e": 1}]}, "error": {"code": "x"}})
    assert shape_problems(doc, {"a": 1, "b": {"c": [{"d": 1}]}, "error": {"code": "y"}})
    assert shape_problems(doc, {"a": 1, "b": [], "error": {"code": "x"}})
    assert shape_problems(doc, {"a": 1, "error": {"code": "x"}})
    stream = 'event: delta\ndata: {"d": "a"}\n\nevent: done\ndata: {"r": 1}\n'
    assert not stream_problems(stream, stream.replace('"a"', '"b"'))
    assert stream_problems(stream, 'event: delta\ndata: {"d": "a"}\n')
    assert stream_problems(stream, stream.replace('"r"', '"s"'))


# --- endpoints and error codes ----------------------------------------------------------------


def test_every_endpoint_is_documented(docs_server: Server) -> None:
    schema = httpx.get(f"{docs_server.url}/openapi.json", timeout=30).json()
    live = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    documented = {(m.group(1), m.group(2)) for m in re.finditer(r"^### (GET|POST|PUT|PATCH|DELETE) (/\S*)$", TEXT,
                                                                  flags=re.MULTILINE)}
    assert documented == live, (
        f"undocumented: {sorted(live - documented)}; documented but not served: {sorted(documented - live)}")
    table = {span for cells in table_rows(section(TEXT, "Endpoints")) for span in code_spans(cells[0])}
    for method, path in live:
        assert f"{method} {path}" in table, f"{method} {path} is missing from the endpoint table"


def test_documentation_pages_are_served(docs_server: Server) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert f"`GET {path}`" in TEXT
        assert httpx.get(f"{docs_server.url}{path}", timeout=30).status_code == 200, path


def _error_table() -> dict[str, str]:
    """Code -> the HTTP column, from the table in "Errors"."""
    rows = table_rows(section(TEXT, "Errors"))
    assert rows[0][:2] == ["HTTP", "`code`"], rows[0]
    table: dict[str, str] = {}
    for cells in rows[1:]:
        for code in code_spans(cells[1]):
            assert code not in table, f"{code} listed twice"
            table[code] = cells[0]
    return table


def test_every_error_code_is_documented() -> None:
    documented, real = set(_error_table()), http_error_codes()
    assert {"invalid_request", "invalid_json", "invalid_api_key", "payload_too_large", "not_found",
            "method_not_allowed", "internal_error", "server_draining", "generation_failed"} <= real
    assert documented == real, (
        f"undocumented codes: {sorted(real - documented)}; documented codes nothing raises: "
        f"{sorted(documented - real)}")


def test_documented_statuses_are_the_real_ones() -> None:
    from rocmforge import errors

    statuses = {cls.code: cls.http_status for cls in vars(errors).values()
                if isinstance(cls, type) and issubclass(cls, errors.RocmForgeError)}
    table = _error_table()
    for code in error_class_codes():
        assert table[code] == str(statuses[code]), f"{code}: documented HTTP {table[code]}, real {statuses[code]}"
