"""Build, save and load causal LMs (transformers classes). No params files, no tracking here:
callers pass a `ModelParams`, a vocabulary and the special token ids."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from lmpipe.config import ModelParams

MANIFEST = "lmpipe.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
INT8_WEIGHTS = "model.safetensors"
"""The weights file of an int8 folder (torchao's flattened tensors; `lmpipe.compress.quantize`)."""


def ff_width(cfg: ModelParams) -> int:
    """MLP width: explicit, or 4·d for gpt2, or ≈ 8/3·d rounded up to 32 for SwiGLU."""
    if cfg.d_ff:
        return cfg.d_ff
    if cfg.arch == "gpt2":
        return 4 * cfg.d_model
    return -(-(8 * cfg.d_model // 3) // 32) * 32


def hf_config(cfg: ModelParams, vocab_size: int, special: dict[str, int]) -> PretrainedConfig:
    ids = {
        "bos_token_id": special["<|bos|>"],
        "eos_token_id": special["<|eos|>"],
        "pad_token_id": special["<|pad|>"],
    }
    if cfg.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=ff_width(cfg),
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
            max_position_embeddings=cfg.context,
            rope_theta=cfg.rope_theta,
            attention_dropout=cfg.dropout,
            tie_word_embeddings=cfg.tie_embeddings,
            initializer_range=cfg.init_std,
            **ids,
        )
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.context,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=ff_width(cfg),
        # exact (erf) GELU, as nanoGPT: on CPU its kernel is about twice as fast as the tanh
        # approximation of the original GPT-2 (bench/train_throughput.py --profile; README,
        # "Measured figures", paragraph "Training throughput")
        activation_function="gelu",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        **ids,
    )


def attention_for(device: str | torch.device | None = None) -> str:
    """The attention kernel for a device: `eager` (matmul, softmax, matmul) on CPU, `sdpa`
    elsewhere. On the CPU at this pipeline's sizes torch's fused SDPA kernel is the slower one
    for what the stages spend their time on: in three runs of `python bench/attention.py`
    (AVX-512 EPYC, 2 cores) eager sampled 0.99-1.19x as fast and trained in bf16 1.02-1.28x
    as fast; fp32 training came out 0.86-1.07x, within the runs' noise. On CUDA SDPA's
    flash/memory-efficient kernels win, and its memory does not grow with the square of the
    context. `LMPIPE_ATTENTION=eager|sdpa` overrides the choice."""
    forced = os.environ.get("LMPIPE_ATTENTION")
    if forced:
        if forced not in ("eager", "sdpa"):
            raise ValueError(f"LMPIPE_ATTENTION={forced!r}: use eager or sdpa")
        return forced
    return "eager" if torch.device(device or "cpu").type == "cpu" else "sdpa"


def set_attention(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Switch a loaded model's attention kernel in place (same weights, same results up to
    float rounding)."""
    inner = getattr(model, "_orig_mod", model)
    if getattr(inner, "config", None) is None:  # not a transformers model: nothing to switch
        return model
    if hasattr(inner, "set_attn_implementation"):
        inner.set_attn_implementation(impl)
    else:  # older transformers read the private config field at every forward
        inner.config._attn_implementation = impl
    return model


def build_model(
    cfg: ModelParams, vocab_size: int, special: dict[str, int], seed: int
) -> PreTrainedModel:
    """A freshly initialised model (CPU attention kernel; `train` switches it for its device);
    same seed → same weights."""
    config = hf_config(cfg, vocab_size, special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_for())
    return model


def context_length(model: torch.nn.Module) -> int:
    c = model.config
    return getattr(c, "max_position_embeddings", None) or c.n_positions


def head_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a llama or gpt2 model."""
    c = model.config
    if c.model_type not in ("llama", "gpt2"):
        raise ValueError(f"lmpipe reads the heads of llama and gpt2 models, not {c.model_type!r}")
    if c.model_type == "gpt2":
        return c.n_head, c.n_head, c.n_embd // c.n_head
    kv = c.num_key_value_heads or c.num_attention_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_attention_heads, kv, hd


def n_params(model: torch.nn.Module, non_embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.get_input_embeddings().weight.numel()
    return n


def save_model(
    model: PreTrainedModel, out: str | Path, tokenizer_dir: str | Path, manifest: dict[str, Any]
) -> None:
    """`save_pretrained` (safetensors) + tokenizer files and chat template + the lmpipe.json
    manifest: `AutoModelForCausalLM`/`AutoTokenizer` load the folder, `apply_chat_template`
    works on it."""
    out = Path(out)
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists():
            shutil.copy2(src, out / name)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{model_dir} is not an lmpipe model folder (no {MANIFEST}); run its stage first"
        )
    return json.loads(path.read_text())


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a saved model (safetensors only; nothing is unpickled), in eval mode. Int8 folders
    made by the compress stage (their manifest has `quantization`) load already quantized."""
    if read_manifest(model_dir).get("quantization"):
        return load_quantized(model_dir, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), attn_implementation=attention_for(device), use_safetensors=True
        )
    except Exception as err:  # safetensors' SafetensorError derives from Exception alone
        if "safetensor" not in f"{type(err).__name__} {err}".lower():
            raise
        raise FileNotFoundError(
            f"{model_dir}/model.safetensors cannot be read ({err}): the file is truncated or "
            "corrupt; rerun the stage that made it (dvc repro -f <stage>) or dvc checkout"
        ) from None
    return model.to(device).eval()


def load_quantized(model_dir: str | Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """An int8 folder made by the compress stage (`lmpipe.compress.quantize`): the model rebuilt
    from config with the stored int8 tensors assigned (CPU inference)."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    if torch.device(device).type != "cpu":
        raise ValueError("the int8 model is for CPU inference; load it with device='cpu'")
    import torchao.quantization  # noqa: F401  (torchao's quantized tensor types, as when quantizing)

    model_dir = Path(model_dir)
    path = model_dir / INT8_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} has no {INT8_WEIGHTS}: rerun the compress stage")
    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_for("cpu"))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        names = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    if "tensor_names" not in metadata:
        raise ValueError(f"{path} holds no torchao metadata: not an int8 lmpipe folder")
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise ValueError(f"{path}: unexpected tensors {sorted(leftover)[:5]}")
    model.requires_grad_(False)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
