"""Log-probabilities, entropies and values over the response positions of a sampled batch.

Every pass (old policy, reference, training, proposal) goes through `response_logits` with the
same temperature, the same padded width and the same row chunks, so the first training
minibatch reproduces the rollout's log-probs bit for bit (ratio exactly 1, KL exactly 0).
"""

from __future__ import annotations

import copy

import torch
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


def response_logits(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float,
    share_prompts: bool = True,
) -> torch.Tensor:
    """(B, R, V) temperature-scaled logits that predict each response token. Only the positions
    that predict a response token go through the output head (`logits_to_keep`). With
    `share_prompts`, rows with the same prompt (k samples of it) run it once
    (`shared_prompt_states`)."""
    r = sequences.shape[1] - prompt_width
    owners = prompt_owners(sequences[:, :prompt_width]) if share_prompts else None
    if owners is not None:
        # the head runs once on all rows' states: (B, R, d) like the plain pass, so its
        # product takes the same kernel (a (1, 1, d) input took another, whose rounding
        # differed with the weights' requires_grad: policy and reference then disagreed)
        hidden = shared_prompt_states(
            model.base_model, sequences, attention_mask, prompt_width, owners
        )
        logits = model.get_output_embeddings()(hidden).float()
    else:
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
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies or None), each (b, R), for the chosen rows of a generation; one
    log-softmax serves both."""
    logits = response_logits(
        model, gen.sequences[rows], gen.attention_mask[rows], gen.prompt_width, temperature,
        share_prompts,
    )  # fmt: skip
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

    def forward(
        self, gen: Generation, rows: torch.Tensor | slice, share_prompts: bool = True
    ) -> torch.Tensor:
        """(b, R) values of the states before each response token (a repeated prompt run once,
        as in `response_logits`)."""
        seqs, mask, w = gen.sequences[rows], gen.attention_mask[rows], gen.prompt_width
        owners = prompt_owners(seqs[:, :w]) if share_prompts else None
        if owners is not None:
            hidden = shared_prompt_states(self.backbone, seqs, mask, w, owners)
        else:
            hidden = self.backbone(
                input_ids=seqs, attention_mask=mask, position_ids=positions(mask), use_cache=False
            ).last_hidden_state[:, w - 1 : -1]
        return self.head(hidden).squeeze(-1).float()
