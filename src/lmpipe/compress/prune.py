"""Structured pruning: remove whole MLP neurons and attention heads, rewrite the config.

The result is a genuinely smaller model of the same class: `intermediate_size` (llama) or
`n_inner` (gpt2), the number of (key/value) heads and, for students, the number of layers shrink,
and `from_pretrained` loads it like any other. Every layer keeps the same number of neurons and
heads (transformers configs have one width for all layers); which ones each layer keeps is
chosen by an importance score:

- `taylor` (default): first-order Taylor estimate of the loss change when a unit is removed,
  aggregated as the squared per-sequence sum of activation × gradient over a calibration set,
  i.e. the Fisher information of a mask on that unit (Molchanov et al. 2019; Theis et al. 2018).
  It sees what the data does with a unit, not only its weights.
- `magnitude`: the squared L2 norm of all weights that belong to the unit.

Layers to keep (students) are spread evenly over the teacher's, first and last included.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lmpipe.batches import Batch
from lmpipe.model import attention_for, head_shape


@dataclass
class Importance:
    """Per layer: a score per MLP neuron (L, F) and per key/value head group (L, H_kv)."""

    neurons: torch.Tensor
    heads: torch.Tensor | None  # None for gpt2 (heads are not pruned there)


def _arch(model: PreTrainedModel) -> str:
    kind = model.config.model_type
    if kind not in ("llama", "gpt2"):
        raise ValueError(f"pruning supports llama and gpt2 models, not {kind!r}")
    return kind


def _layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    return list(model.model.layers) if _arch(model) == "llama" else list(model.transformer.h)


def magnitude_importance(model: PreTrainedModel) -> Importance:
    """Squared L2 norm of each neuron's and each key/value group's weights."""
    neurons, heads = [], []
    n_q, n_kv, hd = head_shape(model)
    group = n_q // n_kv
    for layer in _layers(model):
        if _arch(model) == "llama":
            m = layer.mlp
            neurons.append(
                m.gate_proj.weight.pow(2).sum(1)
                + m.up_proj.weight.pow(2).sum(1)
                + m.down_proj.weight.pow(2).sum(0)
            )
            a = layer.self_attn
            q = a.q_proj.weight.pow(2).view(n_kv, group * hd, -1).sum((1, 2))
            o = a.o_proj.weight.pow(2).view(-1, n_kv, group * hd).sum((0, 2))
            k = a.k_proj.weight.pow(2).view(n_kv, hd, -1).sum((1, 2))
            v = a.v_proj.weight.pow(2).view(n_kv, hd, -1).sum((1, 2))
            heads.append(q + o + k + v)
        else:
            m = layer.mlp  # Conv1D: weight is (in, out)
            neurons.append(m.c_fc.weight.pow(2).sum(0) + m.c_proj.weight.pow(2).sum(1))
    return Importance(
        torch.stack(neurons).detach().float().cpu(),
        torch.stack(heads).detach().float().cpu() if heads else None,
    )


def taylor_importance(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    loss_sum: Callable[[torch.nn.Module, Batch], torch.Tensor],
) -> Importance:
    """Σ over calibration sequences of (Σ_t a·∂L/∂a)² for each neuron (input of the MLP's down
    projection) and each key/value group (input of the attention output projection)."""
    arch = _arch(model)
    n_kv = head_shape(model)[1]
    layers = _layers(model)
    d_ff = (
        layers[0].mlp.down_proj.weight.shape[1]
        if arch == "llama"
        else layers[0].mlp.c_fc.weight.shape[1]  # Conv1D weight is (in, out)
    )
    neurons = torch.zeros(len(layers), d_ff, dtype=torch.float64)
    heads = torch.zeros(len(layers), n_kv, dtype=torch.float64) if arch == "llama" else None
    handles = []

    def watch(i: int, kind: str) -> Callable:
        def hook(_module, inputs):
            a = inputs[0]
            if not a.requires_grad:
                return

            def on_grad(g: torch.Tensor) -> None:
                per_seq = (a.detach() * g).float().sum(1)  # (B, width)
                if kind == "mlp":
                    neurons[i] += per_seq.pow(2).sum(0).double().cpu()
                else:
                    per_group = per_seq.view(per_seq.shape[0], n_kv, -1).sum(-1)
                    heads[i] += per_group.pow(2).sum(0).double().cpu()

            a.register_hook(on_grad)

        return hook

    for i, layer in enumerate(layers):
        down = layer.mlp.down_proj if arch == "llama" else layer.mlp.c_proj
        handles.append(down.register_forward_pre_hook(watch(i, "mlp")))
        if arch == "llama":
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(watch(i, "attn")))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for b in batches:
            model.zero_grad(set_to_none=True)
            loss_sum(model, b.to(device)).backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return Importance(neurons.float(), heads.float() if heads is not None else None)


def top_k(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Per row, the indices of the k largest scores, in their original order (ties: lower
    index first), so keeping everything keeps the exact original layout."""
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"cannot keep {k} of {scores.shape[1]} units per layer")
    out = []
    for row in scores:
        order = np.argsort(-row.numpy(), kind="stable")[:k]
        out.append(sorted(order.tolist()))
    return out


def spread_layers(n_from: int, n_keep: int) -> list[int]:
    """n_keep of n_from layer indices, evenly spread, first and last included."""
    if not 1 <= n_keep <= n_from:
        raise ValueError(f"cannot keep {n_keep} of {n_from} layers")
    if n_keep == 1:
        return [n_from - 1]
    return sorted({round(x) for x in np.linspace(0, n_from - 1, n_keep)})


_LAYER = re.compile(r"^(model\.layers|transformer\.h)\.(\d+)\.(.*)$")


def shrink(
    model: PreTrainedModel,
    keep_neurons: Sequence[Sequence[int]],
    keep_groups: Sequence[Sequence[int]] | None = None,
    layers: Sequence[int] | None = None,
) -> PreTrainedModel:
    """A new, smaller model of the same class with the given layers (all by default), and in each
    the given MLP neurons and key/value head groups (each with its query heads)."""
    arch = _arch(model)
    src_layers = list(range(len(_layers(model)))) if layers is None else list(layers)
    n_q, n_kv, hd = head_shape(model)
    group = n_q // n_kv
    n_keep = len(keep_neurons[src_layers[0]])
    g_keep = len(keep_groups[src_layers[0]]) if keep_groups is not None else n_kv
    if any(len(keep_neurons[i]) != n_keep for i in src_layers) or (
        keep_groups is not None and any(len(keep_groups[i]) != g_keep for i in src_layers)
    ):
        raise ValueError("every layer must keep the same number of neurons and heads")
    if arch == "gpt2" and g_keep != n_kv:
        raise ValueError(
            "attention heads of gpt2 models cannot be pruned (head width is tied "
            "to n_embd); prune MLP neurons only"
        )

    config = copy.deepcopy(model.config)
    if arch == "llama":
        config.intermediate_size = n_keep
        config.num_key_value_heads = g_keep
        config.num_attention_heads = g_keep * group
        config.head_dim = hd
        config.num_hidden_layers = len(src_layers)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in src_layers]
    else:
        config.n_inner = n_keep
        config.n_layer = len(src_layers)

    def rows(idx: Sequence[int], width: int) -> torch.Tensor:
        return torch.tensor([u * width + j for u in idx for j in range(width)], dtype=torch.long)

    source = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        m = _LAYER.match(key)
        if m is None:
            new[key] = value.clone()
            continue
        old_i = int(m.group(2))
        if old_i not in src_layers:
            continue
        i_new, name = src_layers.index(old_i), m.group(3)
        n_idx = torch.tensor(list(keep_neurons[old_i]), dtype=torch.long)
        g_idx = list(keep_groups[old_i]) if keep_groups is not None else list(range(n_kv))
        q_heads = [g * group + j for g in g_idx for j in range(group)]
        if name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.c_fc.bias"):
            value = value[n_idx]
        elif name == "mlp.down_proj.weight" or name == "mlp.c_fc.weight":
            value = value[:, n_idx]
        elif name == "mlp.c_proj.weight":
            value = value[n_idx]
        elif name in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            value = value[rows(q_heads, hd)]
        elif name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            value = value[rows(g_idx, hd)]
        elif name == "self_attn.o_proj.weight":
            value = value[:, rows(q_heads, hd)]
        new[f"{m.group(1)}.{i_new}.{name}"] = value.clone()

    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        small = AutoModelForCausalLM.from_config(config, attn_implementation=attention_for(device))
    small.load_state_dict(new, strict=True)
    return small.to(device).train(model.training)


def prune(
    model: PreTrainedModel, importance: Importance, mlp_fraction: float, head_fraction: float
) -> PreTrainedModel:
    """Remove `mlp_fraction` of every layer's neurons and `head_fraction` of its key/value head
    groups (rounded down, at least one of each kept), the least important first."""
    n_ff = importance.neurons.shape[1]
    keep_n = top_k(importance.neurons, max(1, n_ff - int(mlp_fraction * n_ff)))
    keep_g = None
    if head_fraction > 0:
        if importance.heads is None:
            raise ValueError("attention heads of gpt2 models cannot be pruned; set head fraction 0")
        n_g = importance.heads.shape[1]
        keep_g = top_k(importance.heads, max(1, n_g - int(head_fraction * n_g)))
    return shrink(model, keep_n, keep_g)
