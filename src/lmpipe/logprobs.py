"""Log-probabilities and entropies of response tokens, the output head a chunk at a time.

Every pass (old policy, reference, training, proposal, evaluation) goes through
`response_logprobs` with the same temperature, the same padded width and the same row chunks,
so the first training minibatch reproduces the rollout's log-probs bit for bit (ratio exactly 1,
KL exactly 0). Rows that share a prompt run it once (`shared_prompt_states`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from lmpipe.sampling import Generation, dedupe, positions, run_shared_prompts


def prompt_owners(prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first row of each distinct prompt, each row's index among them) for left-padded prompt
    rows, or None when no prompt repeats (nothing to share)."""
    distinct, owner = dedupe(prompts.tolist())
    if len(distinct) == len(owner):
        return None
    first: dict[int, int] = {}
    for row, o in enumerate(owner):
        first.setdefault(o, row)
    dev = prompts.device
    return torch.tensor(list(first.values()), device=dev), torch.tensor(owner, device=dev)


def shared_prompt_states(
    backbone: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    owners: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """(B, R, d) last hidden states at the positions that predict each response token (the
    prompt's last one, then the response's but its last), each distinct prompt run once
    (`lmpipe.sampling.run_shared_prompts`). `backbone` is the transformer without its head."""
    first, owner = owners
    w, r = prompt_width, sequences.shape[1] - prompt_width
    last, hidden = run_shared_prompts(
        backbone,
        sequences[first, :w],
        attention_mask[first, :w],
        owner,
        sequences[:, w : w + r - 1],
        attention_mask[:, w : w + r - 1],
    )
    return torch.cat([last[:, None], hidden], dim=1)


def response_states(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    share_prompts: bool = True,
) -> torch.Tensor:
    """(B, R, d) last hidden states at the positions that predict each response token (the
    output head not applied). With `share_prompts`, rows with the same prompt (k samples of
    it) run it once (`shared_prompt_states`)."""
    owners = prompt_owners(sequences[:, :prompt_width]) if share_prompts else None
    if owners is not None:
        return shared_prompt_states(
            model.base_model, sequences, attention_mask, prompt_width, owners
        )
    hidden = model.base_model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return hidden[:, prompt_width - 1 : -1]


HEAD_CHUNK_ELEMENTS = 1 << 22
"""Logits made at a time by `head_logprobs` on the CPU (16 MB in fp32: they stay in the
cache); 16 times as many on accelerators, where larger products run closer to peak."""

HEAD_KEEP_PROBS_BYTES = 1 << 28
"""On the CPU, a pass with grad whose (positions x vocabulary) probabilities fit in this many
bytes of fp32 keeps them for the backward pass instead of remaking the logits there (one product
with the head fewer: `python bench/rl_passes.py`). Accelerators always remake them: their
memory is the scarcer resource and the product is cheap there."""


def _chunk_logits(h, weight, bias, temperature: float) -> torch.Tensor:
    """fp32 temperature-scaled logits of a chunk of positions (bf16 products under autocast)."""
    z = F.linear(h, weight, bias).float()
    return z if temperature == 1.0 else z / temperature


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(head(h) / T)[y] per position, and the entropy of that distribution, with
    the logits made and dropped a chunk of positions at a time. Autograd's version keeps the
    (N, V) log-softmax for the backward pass and fills an (N, V) zero tensor for the gather's
    gradient; this one keeps h and the N log-partition values and remakes each chunk's logits
    in the backward pass (one more product with the head, against several passes over N x V
    floats), or on the CPU, where they fit in `HEAD_KEEP_PROBS_BYTES`, keeps the N x V
    probabilities instead of remaking them. The chunks' logits are cast to fp32 before any
    softmax, as under bf16 autocast the head's product is bf16; the backward pass runs under
    the forward pass's autocast."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, with_entropy):
        n, v = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        budget = HEAD_CHUNK_ELEMENTS * (1 if dev.type == "cpu" else 16)
        chunk = max(1, budget // v)
        logp = torch.empty(n, device=dev)
        lse = torch.empty(n, device=dev)
        ent = torch.empty(n if with_entropy else 0, device=dev)
        grad = any(ctx.needs_input_grad[:3])
        keep = grad and dev.type == "cpu" and n * v * 4 <= HEAD_KEEP_PROBS_BYTES
        probs = torch.empty(n, v, device=dev) if keep else None
        for s in range(0, n, chunk):
            z = _chunk_logits(hidden[s : s + chunk], weight, bias, temperature)
            top = z.amax(-1, keepdim=True)
            e = (z - top).exp_()  # one exp serves log Z, the entropy and the kept softmax
            total = e.sum(-1)
            lse_c = top.squeeze(-1) + total.log()
            logp[s : s + chunk] = z.gather(-1, tokens[s : s + chunk, None]).squeeze(-1) - lse_c
            lse[s : s + chunk] = lse_c
            if keep:
                torch.div(e, total[:, None], out=probs[s : s + chunk])
            if with_entropy:  # H = log Z - E_p[z]
                ent[s : s + chunk] = lse_c - (e.mul_(z)).sum(-1) / total
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, probs)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.amp = (
            (dev.type, torch.get_autocast_dtype(dev.type))
            if torch.is_autocast_enabled(dev.type)
            else None
        )
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        hidden, weight, bias, tokens, lse, probs = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        d_hidden = torch.empty_like(hidden) if want_h else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        d_bias = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        amp = torch.autocast(ctx.amp[0], dtype=ctx.amp[1]) if ctx.amp else contextlib.nullcontext()
        with amp:
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk]
                g = grad_logp[s : s + chunk, None]
                # d log p_y / dz = onehot(y) - softmax(z), then through z = lin / T
                if probs is not None:
                    dz = probs[s : s + chunk] * -g
                else:
                    z = _chunk_logits(h, weight, bias, t)
                    dz = z.sub_(lse[s : s + chunk, None]).exp_().mul_(-g)
                dz.scatter_add_(-1, tokens[s : s + chunk, None], g)
                if t != 1.0:
                    dz.div_(t)
                if ctx.amp:  # the head's product was bf16: its gradients are too
                    dz = dz.to(ctx.amp[1])
                if want_h:
                    d_hidden[s : s + chunk] = dz @ weight.to(dz.dtype)
                if want_w:
                    d_weight += (dz.t() @ h.to(dz.dtype)).float()
                if want_b:
                    d_bias += dz.float().sum(0)
        return (
            d_hidden,
            None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype),
            None,
            None,
            None,
        )


def head_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs of `tokens`, entropies or None) under softmax(head(hidden) / temperature),
    each of `tokens`' shape; `hidden` is (..., d). On an accelerator it never holds more than
    one chunk of the logits (`_HeadLogprobs`): a (B, R, V) tensor in fp32 is what limits the
    batch there with a large vocabulary. On the CPU a pass with grad may keep the (B, R, V)
    probabilities for its backward pass, up to `HEAD_KEEP_PROBS_BYTES`."""
    shape = tokens.shape
    logp, ent = _HeadLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        head.bias,
        tokens.reshape(-1),
        float(temperature),
        with_entropy,
    )
    return logp.view(shape), (ent.view(shape) if with_entropy else None)


def response_logprobs(
    model: torch.nn.Module,
    gen: Generation,
    rows: torch.Tensor | slice,
    temperature: float,
    with_entropy: bool = True,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies or None), each (b, R), for the chosen rows of a generation, under
    the temperature-scaled distribution the sampler drew from. Every model's pass takes the
    same chunks of positions through `head_logprobs`, so policy and reference take the same
    kernels (a shape-dependent kernel choice once made their log-probs differ in the last
    bits, and the KL at π = π₀ was not exactly 0). A model placed on another device than the
    generation (`rl.reference_device`) runs there, in the caller's autocast precision, and
    its results come back to the generation's device."""
    here, there = gen.sequences.device, model.get_output_embeddings().weight.device
    if there != here:
        return _elsewhere(model, gen, rows, there, temperature, with_entropy, share_prompts)
    hidden = response_states(
        model, gen.sequences[rows], gen.attention_mask[rows], gen.prompt_width, share_prompts
    )
    return head_logprobs(
        hidden, model.get_output_embeddings(), gen.response[rows], temperature, with_entropy
    )


def _elsewhere(
    model: torch.nn.Module,
    gen: Generation,
    rows: torch.Tensor | slice,
    there: torch.device,
    temperature: float,
    with_entropy: bool,
    share_prompts: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    here = gen.sequences.device
    moved = Generation(
        gen.sequences[rows].to(there),
        gen.attention_mask[rows].to(there),
        gen.prompt_width,
        gen.response[rows].to(there),
        gen.response_mask[rows].to(there),
        gen.ended[rows].to(there),
    )
    amp = (
        torch.autocast(there.type, dtype=torch.get_autocast_dtype(here.type))
        if torch.is_autocast_enabled(here.type)
        else contextlib.nullcontext()
    )
    with amp:
        lp, ent = response_logprobs(
            model, moved, slice(None), temperature, with_entropy, share_prompts
        )
    return lp.to(here), (ent.to(here) if ent is not None else None)
