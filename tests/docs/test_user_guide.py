"""The troubleshooting examples of ``docs/USER_GUIDE.md`` marked ``<!-- test: exit=N -->``
produce exactly the documented message (stderr) and exit status, and every relative link in
the guides (and the README) leads to a file and heading that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import DOCS_DIR, REPO_ROOT, Block, blocks, following, github_anchor, headings, links, read

GUIDE = DOCS_DIR / "USER_GUIDE.md"
TEXT = read(GUIDE)
BLOCKS = blocks(TEXT)
CLI_EXAMPLES = [b for b in BLOCKS if b.marker_kind == "test" and "exit" in b.marker_options()]


def _env(models_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROCMFORGE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["ROCMFORGE_MODELS"] = str(models_dir)  # an empty models directory unless the example sets its own
    return env


def test_troubleshooting_has_tested_examples() -> None:
    assert len(CLI_EXAMPLES) >= 5
    for block in CLI_EXAMPLES:
        assert following(BLOCKS, block, TEXT) is not None, f"USER_GUIDE.md line {block.line}: no message block"


@pytest.mark.parametrize("block", CLI_EXAMPLES, ids=lambda b: f"line{b.line}")
def test_troubleshooting_example(block: Block, tmp_path: Path) -> None:
    expected = following(BLOCKS, block, TEXT)
    assert expected is not None and expected.lang == "text"
    models = tmp_path / "models"
    models.mkdir()
    result = subprocess.run(["bash", "-c", "set -uo pipefail\n" + block.text], check=False, capture_output=True,
                            text=True, timeout=120, cwd=tmp_path, env=_env(models))
    assert result.stderr.strip() == expected.text.strip(), (
        f"USER_GUIDE.md line {block.line}: the real message is\n{result.stderr}")
    assert result.returncode == int(block.marker_options()["exit"]), result.stderr


DOCUMENTS = sorted(DOCS_DIR.glob("*.md")) + [REPO_ROOT / "README.md"]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    for target in links(read(path)):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        assert destination.exists(), f"{path.name}: link to a missing file {target}"
        if anchor:
            assert destination.suffix == ".md", f"{path.name}: anchor into a non-Markdown file {target}"
            anchors = {github_anchor(title) for _, title in headings(read(destination))}
            assert anchor in anchors, f"{path.name}: no heading for #{anchor} in {destination.name}"


def test_readme_links_every_guide() -> None:
    readme_links = set(links(read(REPO_ROOT / "README.md")))
    for guide in ("USER_GUIDE.md", "CLI_REFERENCE.md", "API.md", "DEPLOYMENT.md", "ARCHITECTURE.md"):
        assert f"docs/{guide}" in readme_links, guide

