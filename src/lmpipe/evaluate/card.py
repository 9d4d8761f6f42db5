"""The evaluation every model gets, PyTorch folder or ONNX bundle: the same prompts, seed and
text windows, scored by the same judge. Used by the evaluate stage (the report card) and by the
compress stage (its variants next to the teacher).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.data.stats import words
from lmpipe.data.tokenizer import read_tokens
from lmpipe.evaluate import metrics as M
from lmpipe.evaluate.engines import Engine, OnnxEngine, TorchEngine
from lmpipe.gold import gold_of
from lmpipe.io import read_json, read_jsonl
from lmpipe.model import read_manifest
from lmpipe.reward.model import RewardModel
from lmpipe.stats import best_of_n, best_of_n_kl_bound

log = logging.getLogger("evaluate")
PYTORCH_STAGES = ("pretrain", "sft", "rl")


@dataclass
class Judge:
    """Scores responses as RL is rewarded: `gold` (the stand-in human), `proxy` (the normalised
    reward model, on responses that ended with the end-of-turn token) and `rl_score` (the proxy,
    or `penalty` for a response cut at the token budget)."""

    gold_fn: Callable[[list[str], list[str]], Sequence[float]]
    score_ids: Callable[[list[list[int]]], np.ndarray]  # the reward model on whole sequences
    decode: Callable[[Sequence[int]], str]  # the assistant text of a response
    eos: int
    penalty: float

    def gold(self, prompt_texts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.asarray(self.gold_fn(list(prompt_texts), list(responses)), dtype=float)

    def proxy(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], ended
    ) -> np.ndarray:
        """The reward model's score of each ended response; NaN where it did not end."""
        out = np.full(len(responses), np.nan)
        rows = np.flatnonzero(ended)
        if len(rows):
            out[rows] = self.score_ids([[*prompts[i], *responses[i], self.eos] for i in rows])
        return out

    def rl_score(self, proxy: np.ndarray, ended: np.ndarray) -> np.ndarray:
        return np.where(ended, proxy, self.penalty)


def judge_of(reward: Path, rl: Path, template: Any, device: str) -> tuple[Judge, float]:
    """The pipeline's judge: the reward model's gold scorer and normalised score (folder
    `reward`) and the RL stage's missing-EOS penalty; and the RL stage's β (folder `rl`)."""
    rl_params = read_manifest(rl)["params"]["rl"]
    rm = RewardModel.load(reward, device)
    penalty = rl_params.get("missing_eos_penalty", -1.0)
    judge = Judge(
        gold_of(read_manifest(reward)),
        rm.score_ids,
        template.decode,
        template.end_of_turn_id,
        penalty,
    )
    return judge, float(rl_params["kl_coef"])


@dataclass
class PromptSet:
    """Held-out prompts as texts and token ids, and each repeated for its n samples."""

    texts: list[str]
    ids: list[list[int]]
    n: int
    rep_texts: list[str] = field(init=False)
    rep_ids: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.rep_texts = [t for t in self.texts for _ in range(self.n)]
        self.rep_ids = [p for p in self.ids for _ in range(self.n)]


def prompt_set(
    template: Any, data: Path, context: int, max_new_tokens: int, limit: int, n: int, stage: str
) -> PromptSet:
    """The first `limit` held-out prompts that leave room for `max_new_tokens` in `context`,
    with `n` samples each; none fitting is an error naming `stage`'s max_new_tokens."""
    rows = read_jsonl(data / "prompts" / "eval.jsonl")
    texts, ids = template.fitting_prompts(
        [r["prompt"] for r in rows], context, max_new_tokens, limit
    )
    if not ids:
        raise ValueError(
            f"no eval prompt fits the context of {context} tokens with "
            f"{stage}.max_new_tokens {max_new_tokens}; lower it"
        )
    return PromptSet(texts, ids, n)


def all_flags(models: Path, curves: Mapping[str, Any], variants: Mapping[str, Any]) -> list[str]:
    """The report card's flags: the RL run's curves and the models' rows, and what makes the
    alignment meaningless (the reward model's and RL stage's own reports)."""
    flags = M.flags(curves.get("rl", {}), variants) + M.alignment_flags(
        read_manifest(models / "reward")["metrics"],
        read_manifest(models / "rl")["metrics"],
        curves.get("reward", {}),
    )
    for f in flags:
        log.warning("flag: %s", f)
    return flags


def find_models(models: Path) -> tuple[dict[str, Path], list[Path]]:
    """The PyTorch model folders (pretrain, sft, rl, each compressed variant) and the ONNX
    bundles under `models/`; a missing stage output fails with what to run."""
    folders = {name: models / name for name in PYTORCH_STAGES}
    for variant in sorted(p.name for p in (models / "compressed").glob("*") if p.is_dir()):
        folders[variant] = models / "compressed" / variant
    missing = [str(p) for p in [*folders.values(), models / "reward"] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing models: {', '.join(missing)}; run `dvc repro` first")
    bundles = sorted(p for p in (models / "onnx").glob("*") if (p / "bundle.json").exists())
    return folders, bundles


def load_engines(
    folders: Mapping[str, Path], bundles: Sequence[Path], template: Any, device: str
) -> list[Engine]:
    """One engine per PyTorch folder and per ONNX model file of each bundle (fp32, int8)."""
    eos, pad = template.end_of_turn_id, template.pad_id
    engines: list[Engine] = [
        TorchEngine(n, f, eos, pad, device, template.stop_ids) for n, f in folders.items()
    ]
    for b in bundles:
        files = read_json(b / "bundle.json")["files"]
        for precision in ("fp32", "int8"):
            if files.get(precision) and (b / files[precision]).exists():
                suffix = "" if precision == "fp32" else f"-{precision}"
                engines.append(OnnxEngine(f"onnx-{b.name}{suffix}", b, precision))
    return engines


def test_windows(data: Path, context: int, ppl_context: int | None, count: int) -> np.ndarray:
    """`count` evenly spread windows (count, W + 1) of the test split, W the context or
    `ppl_context` if smaller."""
    meta = read_json(data / "meta.json")
    test = np.asarray(read_tokens(data / "test.bin", meta["dtype"]), dtype=np.int64)
    win = min(context, ppl_context) if ppl_context else context
    starts = np.linspace(0, len(test) - win - 1, count).astype(np.int64)
    return np.stack([test[s : s + win + 1] for s in starts])


@dataclass
class Scored:
    """One model's samples of a prompt set, decoded and judged."""

    responses: list[list[int]]
    ended: np.ndarray
    texts: list[str]
    gold: np.ndarray
    proxy: np.ndarray


def sample_and_judge(
    engine: Engine, prompts: PromptSet, judge: Judge, max_new_tokens: int, seed: int
) -> Scored:
    """`prompts.n` samples a prompt at temperature 1, decoded and scored."""
    s = engine.sample(prompts.ids, prompts.n, max_new_tokens, seed)
    texts = [judge.decode(r) for r in s.responses]
    gold = judge.gold(prompts.rep_texts, texts)
    proxy = judge.proxy(prompts.rep_ids, s.responses, s.ended)
    return Scored(s.responses, s.ended, texts, gold, proxy)


def sample_summary(s: Scored) -> dict[str, float]:
    """Mean gold (with its standard error), mean proxy of the ended responses, EOS rate and
    distinct-2 of one model's samples."""
    n = len(s.gold)
    return {
        "gold_reward": float(s.gold.mean()),
        "gold_reward_se": float(s.gold.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        "proxy_reward": float(np.nanmean(s.proxy)) if np.isfinite(s.proxy).any() else None,
        "eos_rate": float(s.ended.mean()),
        "distinct_2": M.distinct_ngram_ratio(s.texts, 2),
    }


def evaluate_model(
    e: Engine,
    sft: Engine,
    prompts: PromptSet,
    judge: Judge,
    windows: np.ndarray,
    cfg: Any,
    seed: int,
    beta: float,
) -> tuple[dict[str, Any], Scored, np.ndarray, np.ndarray]:
    """A model's row of the report card (`cfg`: the evaluate params), its judged samples and
    their log-probabilities under it and under SFT."""
    t0 = time.perf_counter()
    s = sample_and_judge(e, prompts, judge, cfg.max_new_tokens, seed)
    logp = e.response_logprobs(prompts.rep_ids, s.responses, s.ended)
    ref = logp if e is sft else sft.response_logprobs(prompts.rep_ids, s.responses, s.ended)
    nll, count = e.nll(windows)
    speed_b = e.speed(prompts.ids[0], cfg.speed_batch, cfg.speed_new_tokens, cfg.speed_repeats)
    speed_1 = e.speed(prompts.ids[0], 1, cfg.speed_new_tokens, cfg.speed_repeats)
    rl_score = judge.rl_score(s.proxy, s.ended)
    kl = logp - ref
    row = {
        "kind": e.kind,
        "ppl": float(np.exp(nll / count)),
        **{k: v for k, v in sample_summary(s).items() if k not in ("eos_rate", "distinct_2")},
        "rl_score": float(rl_score.mean()),
        "kl_to_sft": float(np.mean(kl)),
        "kl_to_sft_se": float(np.std(kl, ddof=1) / np.sqrt(len(logp))),
        "objective_j": float(rl_score.mean() - beta * np.mean(kl)),
        "distinct_1": M.distinct_ngram_ratio(s.texts, 1),
        "distinct_2": M.distinct_ngram_ratio(s.texts, 2),
        "self_bleu": M.self_bleu(s.texts, cfg.self_bleu_texts),
        "response_tokens": float(np.mean([len(r) for r in s.responses])),
        "response_words": float(np.mean([len(words(t)) for t in s.texts])),
        "eos_rate": float(s.ended.mean()),
        "tokens_per_sec": speed_b["tokens_per_sec"],
        "latency_ms_per_token": speed_1["ms_per_token"],
        "size_mb": e.size_mb,
        "eval_seconds": time.perf_counter() - t0,
    }
    log.info(
        "%-18s ppl %6.2f  gold %.3f  proxy %5.2f  KL %5.2f  d2 %.3f  EOS %.2f  "
        "%6.0f tok/s  %5.2f ms/tok  %6.2f MB  (%.0f s)",
        e.name,
        row["ppl"],
        row["gold_reward"],
        row["proxy_reward"] or np.nan,
        row["kl_to_sft"],
        row["distinct_2"],
        row["eos_rate"],
        row["tokens_per_sec"],
        row["latency_ms_per_token"],
        row["size_mb"],
        row["eval_seconds"],
    )
    return row, s, logp, ref


def evaluate_all(
    engines: Sequence[Engine],
    prompts: PromptSet,
    judge: Judge,
    windows: np.ndarray,
    cfg: Any,
    seed: int,
    beta: float,
) -> tuple[dict[str, dict[str, Any]], dict[str, Scored], list[dict[str, Any]]]:
    """`evaluate_model` for every engine (KL measured against the one named sft): the report
    card's rows, the judged samples and the `samples.jsonl` rows."""
    sft = next(e for e in engines if e.name == "sft")
    variants: dict[str, dict[str, Any]] = {}
    scored: dict[str, Scored] = {}
    rows: list[dict[str, Any]] = []
    for e in engines:
        variants[e.name], scored[e.name], logp, ref = evaluate_model(
            e, sft, prompts, judge, windows, cfg, seed, beta
        )
        rows += sample_rows(e.name, prompts, scored[e.name], logp, ref)
    return variants, scored, rows


def sample_rows(name: str, prompts: PromptSet, s: Scored, logp, ref) -> list[dict[str, Any]]:
    """`reports/samples.jsonl` rows: every generation with its scores and log-probabilities."""
    return [
        {
            "model": name,
            "prompt_index": i // prompts.n,
            "prompt": prompts.rep_texts[i],
            "response": s.texts[i],
            "tokens": len(s.responses[i]),
            "ended": bool(s.ended[i]),
            "gold": float(s.gold[i]),
            "proxy": None if np.isnan(s.proxy[i]) else float(s.proxy[i]),
            "logp": float(logp[i]),
            "logp_sft": float(ref[i]),
        }
        for i in range(len(s.responses))
    ]


def best_of_n_table(
    sft: Engine,
    prompts: PromptSet,
    judge: Judge,
    ns: Sequence[int],
    max_new_tokens: int,
    seed: int,
    beta: float,
) -> list[dict[str, float]]:
    """Best-of-n from SFT ranked by the RL reward, for each n: expected gold and proxy of the
    kept sample (every n-subset of max(ns) samples), its KL bound and J's lower bound."""
    t0 = time.perf_counter()
    big = max(ns)
    s = sample_and_judge(
        sft, PromptSet(prompts.texts, prompts.ids, big), judge, max_new_tokens, seed
    )
    select = judge.rl_score(s.proxy, s.ended).reshape(len(prompts.ids), big)
    gold = s.gold.reshape(len(prompts.ids), big)
    best = []
    for k in ns:
        got = best_of_n(select, {"gold": gold, "proxy": select}, k)
        kl_bound = best_of_n_kl_bound(k)
        best.append(
            {
                "n": k,
                "kl_bound": kl_bound,
                "gold": got["gold"],
                "proxy": got["proxy"],
                "objective_j_lower": got["proxy"] - beta * kl_bound,
            }
        )
    log.info(
        "best-of-n from SFT (%d samples per prompt, %.0f s): %s",
        big,
        time.perf_counter() - t0,
        ", ".join(f"n={b['n']} gold {b['gold']:.3f}" for b in best),
    )
    return best
