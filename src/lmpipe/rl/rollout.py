"""Log-probabilities, entropies and values over the response positions of a sampled batch.

Every pass (old policy, reference, training, proposal) goes through `response_logits` with the
same temperature, the same padded width and the same row chunks, so the first training
minibatch reproduces the rollout's log-probs bit for bit (ratio exactly 1, KL exactly 0).
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from lmpipe.sampling import Generation, positions


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def response_logits(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float,
) -> torch.Tensor:
    """(B, R, V) temperature-scaled logits that predict each response token. Only the positions
    that predict a response token go through the output head (`logits_to_keep`)."""
    r = sequences.shape[1] - prompt_width
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        use_cache=False,
        logits_to_keep=r + 1,
    )
    logits = out.logits[:, :-1].float()
    return logits if temperature == 1.0 else logits / temperature


def pick(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logp[..., token] per position."""
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position."""
    return pick(torch.log_softmax(logits, dim=-1), tokens)


@torch.no_grad()
def entropy(logp: torch.Tensor) -> torch.Tensor:
    """H = −Σ p·log p from log-probabilities (a log-softmax output)."""
    return -(logp.exp() * logp).sum(-1)


def response_logprobs(
    model: torch.nn.Module,
    gen: Generation,
    rows: torch.Tensor | slice,
    temperature: float,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies or None), each (b, R), for the chosen rows of a generation; one
    log-softmax serves both."""
    logits = response_logits(
        model, gen.sequences[rows], gen.attention_mask[rows], gen.prompt_width, temperature
    )
    logp = torch.log_softmax(logits, dim=-1)
    ent = entropy(logp.detach()) if with_entropy else None
    return pick(logp, gen.response[rows]), ent


class ValueModel(torch.nn.Module):
    """A transformer backbone with a scalar head read at every position: V(prefix)."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    @classmethod
    def from_reward_model(cls, reward_model: PreTrainedModel) -> ValueModel:
        """Backbone and head copied from the reward model (the N+ implementation's choice)."""
        backbone = copy.deepcopy(reward_model.base_model)
        src = reward_model.score
        head = torch.nn.Linear(src.in_features, 1, bias=True)
        with torch.no_grad():
            head.weight.copy_(src.weight)
            head.bias.zero_()
        return disable_dropout(cls(backbone, head))

    @classmethod
    def zero_head(cls, causal_lm: PreTrainedModel) -> ValueModel:
        """The policy's backbone (a copy) with a zero-initialised head (OpenAI's choice)."""
        backbone = copy.deepcopy(causal_lm.base_model)
        head = torch.nn.Linear(causal_lm.config.hidden_size, 1)  # gpt2 maps it to n_embd
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        return disable_dropout(cls(backbone, head))

    def forward(self, gen: Generation, rows: torch.Tensor | slice) -> torch.Tensor:
        """(b, R) values of the states before each response token."""
        mask = gen.attention_mask[rows]
        hidden = self.backbone(
            input_ids=gen.sequences[rows],
            attention_mask=mask,
            position_ids=positions(mask),
            use_cache=False,
        ).last_hidden_state
        return self.head(hidden[:, gen.prompt_width - 1 : -1]).squeeze(-1).float()
