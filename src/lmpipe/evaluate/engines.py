"""One interface over every model the pipeline makes: PyTorch folders and ONNX bundles.

An engine samples responses (temperature 1, no top-k/top-p, so that log-probabilities and KLs are
those of the model itself), scores given token sequences (log-probabilities of responses, NLL of
text windows) and times generation. Everything crosses the interface as numpy arrays and token
lists, so the metrics are computed by the same code for both kinds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.evaluate.metrics import nll_of_targets
from lmpipe.onnx.runtime import left_pad


@dataclass
class Samples:
    responses: list[list[int]]  # token ids, EOS excluded
    ended: np.ndarray  # bool: the response ended with EOS within the limit
    seconds: float


def folder_mb(path: str | Path, pattern: str = "*") -> float:
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file()) / 1e6


class Engine:
    """What evaluation needs of a model. Subclasses give `logits` and `generate`."""

    name: str
    kind: str  # "torch" or "onnx"
    size_mb: float
    context: int  # longest sequence the model takes

    def __init__(self, eos: int, pad: int, stops: Sequence[int] = ()) -> None:
        """`eos`: the token that closes an answer (the template's end-of-turn), scored with it;
        `stops`: every token that ends generation (default: `eos`)."""
        self.eos, self.pad = eos, pad
        self.stops = tuple(stops) or (eos,)

    # -- to implement
    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Full-sequence logits (B, T, V) for left-padded ids, no cache."""
        raise NotImplementedError

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int
    ) -> tuple[list[list[int]], list[bool]]:
        """Sampled responses (EOS excluded) and whether each ended with EOS."""
        raise NotImplementedError

    def time_generation(self, prompt: Sequence[int], batch: int, new_tokens: int) -> float:
        """Seconds to generate exactly `new_tokens` tokens per row (EOS never chosen)."""
        raise NotImplementedError

    # -- shared
    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        seed: int,
        batch_size: int = 128,
    ) -> Samples:
        """n samples per prompt, prompt-major."""
        rows = [p for p in prompts for _ in range(n)]
        t0 = time.perf_counter()
        responses: list[list[int]] = []
        ended: list[bool] = []
        for k, start in enumerate(range(0, len(rows), batch_size)):
            r, e = self.generate(rows[start : start + batch_size], max_new_tokens, seed + k)
            responses += r
            ended += e
        return Samples(responses, np.array(ended, dtype=bool), time.perf_counter() - t0)

    def response_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        ended: Sequence[bool],
        batch_size: int = 32,
    ) -> np.ndarray:
        """Σ log p(response token | prefix) per sequence, the EOS token included where the
        response ended with one."""
        out = []
        for start in range(0, len(prompts), batch_size):
            seqs, spans = [], []
            for p, r, e in zip(
                prompts[start : start + batch_size],
                responses[start : start + batch_size],
                ended[start : start + batch_size],
                strict=True,
            ):
                tail = [*r, self.eos] if e else list(r)
                seqs.append([*p, *tail])
                spans.append(len(tail))
            ids, mask = left_pad(seqs, self.pad)
            targets = np.full_like(ids, -1)
            for i, k in enumerate(spans):
                if k:
                    targets[i, -k - 1 : -1] = ids[i, -k:]  # logits at t predict token t + 1
            logits = self.logits(ids, mask)
            for i in range(len(seqs)):
                nll, _ = nll_of_targets(logits[i], targets[i])
                out.append(-nll)
        return np.array(out)

    def nll(self, windows: np.ndarray, batch_size: int = 16) -> tuple[float, int]:
        """Σ next-token NLL over text windows (B, T+1) and the number of tokens."""
        total, count = 0.0, 0
        for start in range(0, len(windows), batch_size):
            w = windows[start : start + batch_size]
            logits = self.logits(w[:, :-1], np.ones_like(w[:, :-1]))
            s, c = nll_of_targets(logits, w[:, 1:])
            total, count = total + s, count + c
        return total, count

    def speed(
        self, prompt: Sequence[int], batch: int, new_tokens: int, repeats: int = 3
    ) -> dict[str, float]:
        """Median of `repeats` timed runs after a warm-up: tokens/s and ms per token."""
        self.time_generation(prompt, batch, new_tokens)
        sec = statistics.median(
            self.time_generation(prompt, batch, new_tokens) for _ in range(repeats)
        )
        return {"tokens_per_sec": batch * new_tokens / sec, "ms_per_token": 1000 * sec / new_tokens}


class TorchEngine(Engine):
    kind = "torch"

    def __init__(
        self,
        name: str,
        folder: str | Path,
        eos: int,
        pad: int,
        device: str = "cpu",
        stops: Sequence[int] = (),
        model: Any = None,
    ):
        """The model saved in `folder`, or `model` when it is already loaded (its size is still
        that of the folder's weights)."""
        from lmpipe.model import context_length, load_model

        super().__init__(eos, pad, stops)
        self.name, self.folder = name, Path(folder)
        self.model = (model if model is not None else load_model(folder, device)).eval()
        self.context = context_length(self.model)
        self.device = str(device)
        self.size_mb = folder_mb(folder, "*.safetensors")

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        from lmpipe.sampling import positions

        with torch.no_grad():
            t_ids = torch.as_tensor(ids, device=self.device)
            t_mask = torch.as_tensor(mask, device=self.device)
            out = self.model(
                input_ids=t_ids,
                attention_mask=t_mask,
                position_ids=positions(t_mask),
                use_cache=False,
            )
        return out.logits.float().cpu().numpy()

    def response_logprobs(self, prompts, responses, ended, batch_size: int = 128) -> np.ndarray:
        """`Engine.response_logprobs` (same figures, tested) without the full-vocabulary logits
        of every position in numpy: the samples of a prompt share its pass and only the
        positions that predict a response token go through the head
        (`lmpipe.logprobs.response_logprobs`)."""
        import torch

        from lmpipe.logprobs import response_logprobs
        from lmpipe.sampling import pack

        out: list[float] = []
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            rows = zip(responses[start:end], ended[start:end], strict=True)
            tails = [[*r, self.eos] if e else list(r) for r, e in rows]
            gen = pack(prompts[start:end], tails, ended[start:end], self.pad, self.device)
            with torch.no_grad():
                logp, _ = response_logprobs(self.model, gen, slice(None), 1.0, False)
            out += (logp.double() * gen.response_mask).sum(-1).cpu().tolist()
        return np.array(out)

    def nll(self, windows: np.ndarray, batch_size: int = 16) -> tuple[float, int]:
        """`Engine.nll` in torch (the log-softmax never leaves the device)."""
        import torch
        import torch.nn.functional as F

        total = 0.0
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                w = torch.as_tensor(windows[start : start + batch_size], device=self.device)
                logits = self.model(input_ids=w[:, :-1], use_cache=False).logits.float()
                ce = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="none")
                total += float(ce.double().sum())
        return total, int(windows[:, 1:].size)

    def generate(self, prompts, max_new_tokens, seed):
        import torch

        from lmpipe.sampling import generate

        gen = torch.Generator(device=self.device).manual_seed(seed)
        g = generate(
            self.model,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=self.stops,
            pad_id=self.pad,
            temperature=1.0,
            generator=gen,
        )
        lengths = g.lengths.cpu().tolist()
        ended = g.ended.cpu().tolist()
        resp = g.response.cpu()
        return [
            resp[i, : n - int(e)].tolist()
            for i, (n, e) in enumerate(zip(lengths, ended, strict=True))
        ], ended

    def time_generation(self, prompt, batch, new_tokens):
        import torch

        from lmpipe.sampling import generate

        gen = torch.Generator(device=self.device).manual_seed(0)
        if self.device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(
            self.model,
            [list(prompt)] * batch,
            max_new_tokens=new_tokens,
            eos_id=-1,
            pad_id=self.pad,
            generator=gen,
        )
        if self.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


class OnnxEngine(Engine):
    kind = "onnx"

    def __init__(self, name: str, folder: str | Path, precision: str = "fp32"):
        from lmpipe.onnx.runtime import OnnxLM

        self.lm = OnnxLM(folder, precision=precision)
        sp = self.lm.special
        stops = self.lm.meta.get("stop_ids") or [sp["eos"]]
        super().__init__(sp.get("end_of_turn", sp["eos"]), sp["pad"], stops)
        self.name, self.folder = name, Path(folder)
        self.size_mb = folder_mb(folder, self.lm.meta["files"][precision])
        self.context = int(self.lm.meta["context"])

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        logits, _ = self.lm.forward(ids, mask, pos, self.lm.empty_cache(len(ids)))
        return logits

    def generate(self, prompts, max_new_tokens, seed):
        out = self.lm.generate_ids(
            prompts, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed
        )
        return out.tokens, [r == "stop" for r in out.finish_reason]

    def time_generation(self, prompt, batch, new_tokens):
        forward: Callable = self.lm.forward
        stops = list(self.stops)

        def no_eos(*a):
            logits, past = forward(*a)
            logits[..., stops] = -np.inf
            return logits, past

        self.lm.forward = no_eos
        try:
            t0 = time.perf_counter()
            self.lm.generate_ids([list(prompt)] * batch, max_new_tokens=new_tokens, temperature=0)
            return time.perf_counter() - t0
        finally:
            self.lm.forward = forward
