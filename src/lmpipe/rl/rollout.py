"""Log-probabilities, entropies and values over the response positions of a sampled batch.

Every pass (old policy, reference, training, proposal) goes through `response_logprobs` with the
same temperature, the same padded width and the same row chunks, so the first training
minibatch reproduces the rollout's log-probs bit for bit (ratio exactly 1, KL exactly 0).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from lmpipe.sampling import Generation, dedupe, positions, run_shared_prompts


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


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
        backbone, sequences[first, :w], attention_mask[first, :w], owner,
        sequences[:, w : w + r - 1], attention_mask[:, w : w + r - 1],
    )  # fmt: skip
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
            None, None, None,
        )  # fmt: skip


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
        hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, tokens.reshape(-1),
        float(temperature), with_entropy,
    )  # fmt: skip
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
    bits, and the KL at π = π₀ was not exactly 0)."""
    hidden = response_states(
        model, gen.sequences[rows], gen.attention_mask[rows], gen.prompt_width, share_prompts
    )
    return head_logprobs(
        hidden, model.get_output_embeddings(), gen.response[rows], temperature, with_entropy
    )


class ValueModel(torch.nn.Module):
    """A transformer backbone with a scalar head: V(prefix) before each response token.

    `pooling` "token" reads the head at the state before each token (the critic of OpenAI's
    and TRL's PPO). "mean" pools the way a mean-pooled reward model scores a response: the
    head's outputs over the response tokens sampled so far, shrunk toward a prior with `n0`
    pseudo-tokens, V_t = scale·(Σ_{s<t} head(h_s) + n0·prior)/(t + n0) + shift. A copied
    mean-pooled reward head read at single positions predicts nothing (its outputs there
    have several times the spread of the scores); pooled, it predicts the score of the
    partial response from step 1. Scale, shift, prior and n0 are learnt with the rest.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: torch.nn.Linear,
        pooling: str = "token",
        *,
        scale: float = 1.0,
        shift: float = 0.0,
        prior: float = 0.0,
        n0: float = 16.0,
    ) -> None:
        super().__init__()
        if pooling not in ("token", "mean"):
            raise ValueError(f"value pooling {pooling!r} is not 'token' or 'mean'")
        self.backbone, self.head, self.pooling = backbone, head, pooling
        if pooling == "mean":
            self.scale = torch.nn.Parameter(torch.tensor(float(scale)))
            self.shift = torch.nn.Parameter(torch.tensor(float(shift)))
            self.prior = torch.nn.Parameter(torch.tensor(float(prior)))
            self.log_n0 = torch.nn.Parameter(torch.tensor(math.log(n0)))

    @classmethod
    def from_reward_model(
        cls, reward_model: PreTrainedModel, gain: float = 1.0, bias: float = 0.0
    ) -> ValueModel:
        """Backbone and head copied from the reward model (the N+ implementation's choice),
        pooled as the reward model pools and scaled by its normalisation (`gain`·raw +
        `bias`), so the first values are the normalised score of each partial response: a
        last-token reward model read at every position, a mean-pooled one averaged over the
        tokens so far with a prior of the normalised mean, 0."""
        backbone = copy.deepcopy(reward_model.base_model)
        src = reward_model.score
        head = torch.nn.Linear(src.in_features, 1, bias=True)
        src_bias = float(src.bias) if src.bias is not None else 0.0
        pooling = getattr(reward_model.config, "lmpipe_reward_pooling", "last")
        with torch.no_grad():
            if pooling == "mean":
                head.weight.copy_(src.weight)
                head.bias.fill_(src_bias)
                prior = -bias / gain if gain else 0.0  # raw score whose normalised value is 0
                model = cls(backbone, head, "mean", scale=gain, shift=bias, prior=prior)
                return disable_dropout(model)
            head.weight.copy_(src.weight * gain)
            head.bias.fill_(bias + gain * src_bias)
        return disable_dropout(cls(backbone, head))

    @classmethod
    def zero_head(cls, causal_lm: PreTrainedModel) -> ValueModel:
        """The policy's backbone (a copy) with a zero-initialised head (OpenAI's choice)."""
        backbone = copy.deepcopy(causal_lm.base_model)
        head = torch.nn.Linear(causal_lm.config.hidden_size, 1)  # gpt2 maps it to n_embd
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        return disable_dropout(cls(backbone, head))

    def forward(
        self, gen: Generation, rows: torch.Tensor | slice, share_prompts: bool = True
    ) -> torch.Tensor:
        """(b, R) values of the states before each response token (a repeated prompt run once,
        as in `response_states`)."""
        hidden = response_states(
            self.backbone, gen.sequences[rows], gen.attention_mask[rows], gen.prompt_width,
            share_prompts,
        )  # fmt: skip
        per_token = self.head(hidden).squeeze(-1).float()
        if self.pooling == "token":
            return per_token
        # state s + 1 has read response token s: V_t pools the states 1..t (t tokens so far)
        seen = torch.cumsum(per_token, dim=1) - per_token[:, :1]
        t = torch.arange(per_token.shape[1], device=per_token.device, dtype=per_token.dtype)
        n0 = self.log_n0.exp()
        return self.scale * (seen + n0 * self.prior) / (t + n0) + self.shift
