"""Random-weight model presets with real Qwen2 shapes.

A preset is a frozen description of a Qwen2 decoder (layer count, widths, KV geometry). It serves
timing runs and tests where no trained weights exist (GPU machines have none). The weights are a
pure function of the preset: every parameter is filled from a counter-based hash (splitmix64) of
``(seed, parameter name, element index)``, computed with integer tensor ops on the target device.
So the same preset gives bit-identical weights in every process and on every device (CPU or CUDA),
without ever materialising a float32 copy of a 7B/14B model on the host, and in seconds on a GPU.

Distribution: weights and biases are uniform with standard deviation ``initializer_range``; norm
weights are ``1 + uniform(std=initializer_range)``, so a runner that forgets a norm weight or a
bias is caught by the tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Mapping

import torch
from accelerate import init_empty_weights
from transformers import Qwen2Config, Qwen2ForCausalLM

logger = logging.getLogger(__name__)

INIT_SCHEME = "splitmix64-uniform-v1"
_CHUNK_ELEMENTS = 1 << 22
_U64 = 1 << 64


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - _U64 if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


@dataclass(frozen=True)
class Preset:
    """Shape of a random-weight Qwen2 decoder; see ``to_config``."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: attention heads must be a multiple of KV heads")

    def to_config(self) -> Qwen2Config:
        """The transformers config of this preset (full attention on every layer)."""
        return Qwen2Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,  # type: ignore[call-arg]  # accepted, not a declared field
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            use_sliding_window=False,
        )


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        p.name: p
        for p in (
            Preset("qwen2.5-0.5b", 24, 896, 14, 2, 64, 4864, 151936, 32768, tie_word_embeddings=True),
            Preset("qwen2.5-7b", 28, 3584, 28, 4, 128, 18944, 152064, 32768),
            Preset("qwen2.5-14b", 48, 5120, 40, 8, 128, 13824, 152064, 32768, rms_norm_eps=1e-5),
            # Qwen2.5-7B's KV geometry (28 layers x 4 KV heads x 128) on a small body: the KV
            # bytes per token of 7B at a fraction of its compute.
            Preset("kvheavy", 28, 512, 4, 4, 128, 1024, 32000, 131072),
            # The same KV geometry with 7B's grouped heads (28 query heads over 4 KV heads): IMPRESS's
            # three probe heads then share one KV head, so its probe copy is 1/4 of a layer's keys, as
            # on the real 7B (on kvheavy, 4 query heads over 4 KV heads, it is 3/4).
            Preset("kvheavy-gqa", 28, 512, 28, 4, 128, 1024, 32000, 131072),
            # Fast tests. A large init range separates logits so top-1 survives float round-off.
            Preset("tiny", 4, 64, 4, 2, 16, 128, 512, 4096, initializer_range=0.2),
        )
    }
)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}") from None


def preset_fingerprint(preset: Preset) -> str:
    """Hex sha256 identifying the exact weights: config JSON, seed and init scheme."""
    doc = {
        "config": preset.to_config().to_dict(),
        "preset": asdict(preset),
        "seed": preset.seed,
        "init": INIT_SCHEME,
    }
    blob = json.dumps(doc, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def build_preset_model(
    preset: Preset, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Qwen2ForCausalLM:
    """Build the preset's model in eval mode with deterministic weights on ``device`` in ``dtype``.

    Parameters are created empty (meta) and filled directly on the device, chunk by chunk, so peak
    host memory stays small whatever the model size. Non-persistent buffers (RoPE ``inv_freq``)
    are computed by transformers in float32 and only moved, never cast.
    """
    config = preset.to_config()
    with init_empty_weights(include_buffers=False):
        model = Qwen2ForCausalLM(config)
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        data = torch.empty(param.shape, dtype=dtype, device=device)
        _fill_param_(data, name, preset)
        setattr(module, attr, torch.nn.Parameter(data, requires_grad=False))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device)  # type: ignore[arg-type]  # (mypy misreads HF .to) moves buffers, casts none
    model.eval()
    logger.info("built preset %s on %s (%s)", preset.name, device, dtype)
    return model


def _fill_param_(data: torch.Tensor, name: str, preset: Preset) -> None:
    """Fill one parameter in place from the hash stream of ``(seed, name)``."""
    std = preset.initializer_range
    offset = 1.0 if "norm" in name.rsplit(".", 1)[0] else 0.0
    digest = hashlib.sha256(f"{preset.seed}:{name}".encode()).digest()
    key = int.from_bytes(digest[:7], "little")  # < 2**56: key + counter cannot overflow int64
    flat = data.view(-1)
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        stop = min(start + _CHUNK_ELEMENTS, flat.numel())
        unit = uniform_stream(key, start, stop - start, flat.device)
        flat[start:stop] = (unit * (std * math.sqrt(3.0)) + offset).to(flat.dtype)


def uniform_stream(key: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """Float32 values uniform in (-1, 1): elements ``start .. start+count-1`` of stream ``key``.

    Element ``i`` comes from splitmix64 of counter ``key + i // 2``: its top 24 bits for even
    ``i``, bits 16..39 for odd ``i``. ``start`` must be even. Pure integer arithmetic plus exact
    conversions, so every device returns identical bits.
    """
    if start % 2:
        raise ValueError("start must be even")
    first = key + start // 2
    z = torch.arange(first, first + (count + 1) // 2, dtype=torch.int64, device=device)
    z.mul_(_GOLDEN)
    z.bitwise_xor_(_shift_right(z, 30)).mul_(_MIX1)
    z.bitwise_xor_(_shift_right(z, 27)).mul_(_MIX2)
    high = _shift_right(z, 40)  # the final splitmix xor-shift leaves the top 24 bits unchanged
    low = (z.bitwise_xor_(_shift_right(z, 31)) >> 16).bitwise_and_(0xFFFFFF)
    bits = torch.stack((high, low), dim=-1).view(-1)[:count].to(torch.float32)  # exact: < 2**24
    return bits.mul_(2).add_(1 - 2**24).div_(2**24)  # exact: odd integers in (-2**24, 2**24)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (z >> bits).bitwise_and_((1 << (64 - bits)) - 1)
