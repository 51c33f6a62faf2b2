"""Error bodies per API family: the default shape, and a registered prefix's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rocmforge.server import error_shapes
from rocmforge.server.error_shapes import ErrorInfo, error_body


@pytest.fixture
def registry() -> Iterator[None]:
    saved = dict(error_shapes._SHAPES)
    yield
    error_shapes._SHAPES.clear()
    error_shapes._SHAPES.update(saved)


def test_default_shape() -> None:
    info = ErrorInfo(400, "invalid_request", "n: too big", param="n", request_id="r1")
    assert error_body("/nowhere/x", info) == {"error": {
        "type": "user", "code": "invalid_request", "message": "n: too big", "param": "n", "request_id": "r1"}}


def test_the_longest_registered_prefix_shapes_the_body(registry: None) -> None:
    error_shapes.register("/test-api/", lambda info: {"error": info.message})
    error_shapes.register("/test-api/v2/", lambda info: {"kind": info.code, "status": info.status})
    info = ErrorInfo(404, "not_found", "no such model")
    assert error_body("/test-api/chat", info) == {"error": "no such model"}
    assert error_body("/test-api/v2/chat", info) == {"kind": "not_found", "status": 404}
    assert error_body("/test-apix", info)["error"]["code"] == "not_found"  # not under the prefix
