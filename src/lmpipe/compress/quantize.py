"""Int8 weight-only quantization for CPU inference, with torchao.

Every linear layer (the output head included) and, optionally, the input embedding get int8
weights with one scale per output row; activations stay in floating point. A tied output head
is untied first so each copy gets its own int8 tensor. The folder stores torchao's tensors in
safetensors (torchao's flattening: int8 data and scales as plain tensors, their layout as JSON
metadata), so loading rebuilds the quantized tensors directly: nothing is re-quantized and
nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from lmpipe.model import INT8_WEIGHTS, MANIFEST, TOKENIZER_FILES


def _torchao():
    import torchao.quantization as q  # lazy: a heavy import only this module needs
    from torchao.quantization.granularity import PerAxis

    return q, PerAxis


def quantize_int8(model: PreTrainedModel, embeddings: bool = True) -> PreTrainedModel:
    """A quantized copy of `model` (the original is untouched)."""
    q, per_axis = _torchao()
    model = copy.deepcopy(model).cpu().eval()
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
    model.requires_grad_(False)
    q.quantize_(model, q.Int8WeightOnlyConfig())
    if embeddings:
        q.quantize_(
            model,
            q.IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=per_axis(0)),
            filter_fn=lambda m, _fqn: isinstance(m, torch.nn.Embedding),
        )
    return model


def describe(embeddings: bool) -> dict[str, Any]:
    """The manifest's `quantization` entry."""
    import torchao

    return {
        "method": "torchao int8 weight-only, per output row",
        "linear": "Int8WeightOnlyConfig",
        "embedding": "IntxWeightOnlyConfig(int8, PerAxis(0))" if embeddings else "fp32",
        "torchao": torchao.__version__,
        "weights": INT8_WEIGHTS,
    }


def save_quantized(
    model: PreTrainedModel, out: str | Path, tokenizer_dir: str | Path, manifest: dict[str, Any]
) -> None:
    """config.json + the int8 weights + tokenizer files + lmpipe.json (as `save_model`)."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(out))
    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / INT8_WEIGHTS), metadata)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy2(Path(tokenizer_dir) / name, out / name)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def weight_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files of a model folder (what size on disk compares)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
