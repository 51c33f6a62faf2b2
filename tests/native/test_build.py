"""Building and loading the extension from its cache (rocmforge.native.build)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rocmforge import native

pytestmark = pytest.mark.skipif(native.ops() is None, reason=f"native kernels unavailable: {native.unavailable_reason()}")


def test_a_killed_builds_lock_file_does_not_block_loading() -> None:
    """torch's build lock is a plain file, left behind when a build is killed; loading must
    not wait on it forever."""
    stale = native.cache_dir() / native._build_key() / "lock"
    stale.touch()
    done = subprocess.run([sys.executable, "-c", "from rocmforge import native; native.build()"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale.exists()
