"""Values over the response positions of a sampled batch (the PPO critic), and dropout off
for the RL passes. The log-probabilities of those positions are `lmpipe.logprobs`'s."""

from __future__ import annotations

import copy
import math

import torch
from transformers import PreTrainedModel

from lmpipe.logprobs import response_states
from lmpipe.sampling import Generation


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


class ValueModel(torch.nn.Module):
    """A transformer backbone with a scalar head: V(prefix) before each response token.

    `pooling` "token" reads the head at the state before each token (the critic of OpenAI's
    and TRL's PPO). "mean" pools the way a mean-pooled reward model scores a response: the
    head's outputs over the response tokens sampled so far, shrunk toward a prior with `n0`
    pseudo-tokens, V_t = scale·(Σ_{s<t} head(h_s) + n0·prior)/(t + n0) + shift. A copied
    mean-pooled reward head read at single positions predicts nothing (its outputs there
    have several times the spread of the scores); pooled, it predicts the score of the
    partial response from step 1. "sum" does the same for a sum-pooled reward model: the
    sum so far plus the rest's expected sum, which starts at the prior (the mean raw score)
    and fades as tokens come, V_t = scale·(Σ_{s<t} head(h_s) + prior·n0/(t + n0)) + shift.
    Scale, shift, prior and n0 are learnt with the rest.
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
        if pooling not in ("token", "mean", "sum"):
            raise ValueError(f"value pooling {pooling!r} is not 'token', 'mean' or 'sum'")
        self.backbone, self.head, self.pooling = backbone, head, pooling
        if pooling != "token":
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
        tokens so far with a prior of the normalised mean, 0 (a sum-pooled one summed, plus
        a fading prior of the rest)."""
        backbone = copy.deepcopy(reward_model.base_model)
        src = reward_model.score
        head = torch.nn.Linear(src.in_features, 1, bias=True)
        src_bias = float(src.bias) if src.bias is not None else 0.0
        pooling = getattr(reward_model.config, "lmpipe_reward_pooling", "last")
        with torch.no_grad():
            if pooling in ("mean", "sum"):
                head.weight.copy_(src.weight)
                head.bias.fill_(src_bias)
                prior = -bias / gain if gain else 0.0  # raw score whose normalised value is 0
                model = cls(backbone, head, pooling, scale=gain, shift=bias, prior=prior)
                return disable_dropout(model)
            head.weight.copy_(src.weight * gain)
            head.bias.fill_(bias + gain * src_bias)
        return disable_dropout(cls(backbone, head))

    @classmethod
    def zero_head(cls, causal_lm: PreTrainedModel) -> ValueModel:
        """The policy's backbone (a copy) with a zero-initialised head (OpenAI's choice)."""
        backbone = copy.deepcopy(causal_lm.base_model)
        like = next(causal_lm.parameters())  # the head lives where the policy does
        head = torch.nn.Linear(  # gpt2 maps hidden_size to n_embd
            causal_lm.config.hidden_size, 1, device=like.device, dtype=like.dtype
        )
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        return disable_dropout(cls(backbone, head))

    def forward(
        self, gen: Generation, rows: torch.Tensor | slice, share_prompts: bool = True
    ) -> torch.Tensor:
        """(b, R) values of the states before each response token (a repeated prompt run once,
        as in `response_states`)."""
        hidden = response_states(
            self.backbone,
            gen.sequences[rows],
            gen.attention_mask[rows],
            gen.prompt_width,
            share_prompts,
        )
        per_token = self.head(hidden).squeeze(-1).float()
        if self.pooling == "token":
            return per_token
        # state s + 1 has read response token s: V_t pools the states 1..t (t tokens so far)
        seen = torch.cumsum(per_token, dim=1) - per_token[:, :1]
        t = torch.arange(per_token.shape[1], device=per_token.device, dtype=per_token.dtype)
        n0 = self.log_n0.exp()
        if self.pooling == "sum":
            return self.scale * (seen + self.prior * n0 / (t + n0)) + self.shift
        return self.scale * (seen + n0 * self.prior) / (t + n0) + self.shift
