"""PPO's critic: how noisy one step's explained variance is, and how high any critic's can be.

    python bench/critic_ev.py [--params params.yaml] [--steps 40] [--at 1 10 20 30 40 | --every 10]
                              [--episodes 512] [--positions 256] [--json PATH]

Builds the rl stage's PPO trainer from its own functions (`stages/rl.py`) on the committed SFT
and reward models, trains the stage's run step by step, and before the update of each step in
`--at` (the policy and critic as that step's rollout sees them) measures on `--episodes` fresh
episodes of the training prompts, drawn as the stage draws them but from the bench's own random
streams, so the training run is the stage's (its logged metrics are checked against
`--stage-csv`):

- `ev_gae`: the critic's explained variance against the GAE λ-returns, as `PPO.update` logs it
  (`rl/explained_variance`), on all the episodes; `ev_gae_sd_step` (and `ev_gae_mean_step`):
  its SD (mean) over disjoint sub-batches of one training step's episodes, the noise of the
  logged figure; `ev_gae_se`: the bootstrap SE (episodes resampled) of `ev_gae` itself;
- `ev_mc`: the same against Monte Carlo returns G_t = score − β·Σ_{s≥t} k1_s (λ = 1);
- `ceiling_mc`: the highest explained variance any critic reaches against those returns,
  1 − E[Var(G_t | s_t)]/Var(G_t) (V(s) = E[G | s] leaves the rest), token-weighted as the
  explained variance is: from `--positions` response positions drawn uniformly over the
  episodes' tokens, two continuations of each prefix by the policy (the stage's sampler, the
  remaining token budget, its stop tokens and missing-EOS penalty), each scored as training
  scores a response; `ceiling_mc_se` bootstraps the positions.

The GAE returns mix in the critic's own values, so a critic can explain more of them than of
the Monte Carlo returns: `ceiling_mc` bounds `ev_mc`, not `ev_gae`. Needs models/sft,
models/reward and data/prepared (after `dvc repro` or `dvc pull`); PPO only, without
`rl.ppo.whiten_rewards` (the returns here are the unwhitened ones).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from _results import add_json_arg, write
from lmpipe.chat import load_template
from lmpipe.config import load_params
from lmpipe.dist import setup
from lmpipe.gold import make_gold
from lmpipe.logprobs import response_logprobs
from lmpipe.model import context_length, load_model, read_manifest
from lmpipe.rl import core
from lmpipe.rl.learner import Rollout, split_rows
from lmpipe.rl.loop import RLTrainer
from lmpipe.sampling import generate, pack
from lmpipe.scoring import score_generation
from lmpipe.streams import stream_keys

ROOT = Path(__file__).resolve().parents[1]

MEASURE_STREAM = 0xC217C
"""Tags the bench's random streams: training draws from stream_keys(seed, step, prompt, sample),
these from stream_keys(seed, MEASURE_STREAM, step, kind, row), which no training row shares."""

LOGGED = ("rl/explained_variance", "rl/score", "rl/kl", "rl/value_loss", "rl/entropy")
"""The training run's per-step metrics kept in the JSON and compared with the stage's CSV."""


# --------------------------------------------------------------------------- the estimators


def mc_ceiling(g_a: Sequence[float], g_b: Sequence[float]) -> tuple[float, float, float]:
    """(ceiling, E[Var(G|s)], Var(G)) from M pairs of returns (g_a[i], g_b[i]) drawn
    independently from the same state s_i, the states drawn from the distribution the
    explained variance weighs.

    E[Var(G|s)] = E[(G_a − G_b)²]/2; Var(G) = Var((G_a + G_b)/2) + E[Var(G|s)]/2, both
    unbiased (the plain variance of all 2M returns is biased low by the pairs' covariance);
    the ceiling 1 − E[Var(G|s)]/Var(G) = Var(E[G|s])/Var(G) is what V(s) = E[G|s] explains.
    """
    a, b = np.asarray(g_a, dtype=np.float64), np.asarray(g_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"mc_ceiling needs two equal 1-d arrays of >= 2 returns ({a.shape})")
    within = float(np.mean((a - b) ** 2) / 2)
    total = float(np.var((a + b) / 2, ddof=1) + within / 2)
    return (1.0 - within / total if total > 0 else float("nan")), within, total


def bootstrap_se(
    g_a: Sequence[float], g_b: Sequence[float], draws: int = 1000, seed: int = 0
) -> float:
    """Bootstrap standard error of `mc_ceiling` over the pairs (the states) resampled."""
    a, b = np.asarray(g_a, dtype=np.float64), np.asarray(g_b, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(a), (draws, len(a)))
    ra, rb = a[idx], b[idx]  # (draws, M)
    within = np.mean((ra - rb) ** 2, axis=1) / 2
    total = np.var((ra + rb) / 2, axis=1, ddof=1) + within / 2
    ok = total > 0
    return float(np.std(1 - within[ok] / total[ok], ddof=1))


def ev_bootstrap_se(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, draws: int = 500, seed: int = 0
) -> float:
    """Bootstrap standard error of `core.explained_variance` over the episodes (rows)
    resampled: the noise of the EV measured on all of them, where `sub_batch_ev`'s SD is that of
    one training step's share."""
    gen = torch.Generator().manual_seed(seed)
    n = len(mask)
    evs = []
    for _ in range(draws):
        idx = torch.randint(0, n, (n,), generator=gen).to(mask.device)
        evs.append(core.explained_variance(values[idx], returns[idx], mask[idx]))
    return float(np.nanstd(evs, ddof=1))


def mc_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, R) G_t = Σ_{s≥t} γ^(s−t)·r_s: GAE with λ = 1 about zero values (they telescope)."""
    return core.gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[1]


def sub_batch_ev(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, size: int
) -> list[float]:
    """The explained variance of each disjoint block of `size` consecutive rows."""
    return [
        core.explained_variance(values[i : i + size], returns[i : i + size], mask[i : i + size])
        for i in range(0, len(mask) - size + 1, size)
    ]


# --------------------------------------------------------------------------- the trainer


def load_stage() -> ModuleType:
    """stages/rl.py as a module: its functions build the trainer here as they do there."""
    spec = importlib.util.spec_from_file_location("rl_stage", ROOT / "stages" / "rl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_trainer(args: argparse.Namespace) -> RLTrainer:
    """The trainer `stages/rl.py` builds from the same params, models and prompts."""
    rl = load_stage()
    params = load_params(args.params, ["rl"])
    cfg = params.rl
    if cfg.algo != "ppo" or cfg.ppo.whiten_rewards:
        raise SystemExit(
            f"critic_ev: rl.algo is {cfg.algo!r}, rl.ppo.whiten_rewards "
            f"{cfg.ppo.whiten_rewards}: it measures PPO's critic on unwhitened returns"
        )
    _, device = setup(cfg.device)
    pref = read_manifest(args.reward)["params"]["preference"]  # as the stage: the RM's gold
    gold = make_gold(pref["gold"], keywords=pref.get("keywords", ()))
    template = load_template(args.data)
    policy = load_model(args.sft, device)
    ref, rm = rl.frozen_models(args, cfg, device)
    train_text, train_ids = rl.fitting_prompts(
        args.data / "prompts" / "rl.jsonl", template, cfg, context_length(policy), 10**9
    )
    score_fn, gold_fn = rl.scorers(rm, gold, template, train_text)
    return RLTrainer(
        policy,
        ref,
        cfg,
        train_ids,
        score_fn,
        eos_id=template.stop_ids,
        pad_id=template.pad_id,
        seed=params.seed,
        value_model=rl.value_model(cfg, rm, policy, device),
        gold_fn=gold_fn,
    )


def random_state(trainer: RLTrainer) -> tuple:
    """Every random state training draws from besides its counter-based sampling streams."""
    return (
        repr(trainer.order_rng.bit_generator.state),
        trainer.algo.perm_gen.get_state().numpy().tobytes(),
        torch.random.get_rng_state().numpy().tobytes(),
    )


# --------------------------------------------------------------------------- measuring


@torch.no_grad()
def sample(
    trainer: RLTrainer,
    prompts: list[list[int]],
    prefixes: list[list[int]],
    keys: torch.Tensor,
    batch: int,
) -> tuple[list[list[int]], list[bool]]:
    """(responses, ended): each prompt's prefix continued by the policy with the stage's sampler
    within the rest of `rl.max_new_tokens` (a `generate` call per budget, so the stop rules and
    the missing-EOS limit are the stage's), on the rows' own streams `keys`."""
    cfg = trainer.cfg
    out: list = [None] * len(prompts)
    budgets = [cfg.max_new_tokens - len(p) for p in prefixes]
    for budget in sorted(set(budgets)):
        rows = [i for i, b in enumerate(budgets) if b == budget]
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            with trainer.learner.amp():  # the precision the rollout samples in
                gen = generate(
                    trainer.algo.sampler,
                    [[*prompts[i], *prefixes[i]] for i in chunk],
                    max_new_tokens=budget,
                    eos_id=trainer.eos_id,
                    pad_id=trainer.pad_id,
                    temperature=cfg.temperature,
                    row_keys=keys[chunk],
                )
            lengths, ended = gen.lengths.tolist(), gen.ended.tolist()
            for i, r, n, e in zip(chunk, gen.response.tolist(), lengths, ended, strict=True):
                out[i] = ([*prefixes[i], *r[:n]], e)
    responses, ended = zip(*out, strict=True)
    return list(responses), list(ended)


@torch.no_grad()
def scored(
    trainer: RLTrainer, prompts: list[list[int]], responses: list[list[int]], ended: list[bool]
) -> Rollout:
    """The responses packed, scored and passed through the policy, reference and critic as
    `RLTrainer.rollout` does (rows in order, the stage's minibatch chunks)."""
    cfg = trainer.cfg
    gen = pack(prompts, responses, ended, trainer.pad_id, trainer.device)
    scores, proxy = score_generation(gen, prompts, trainer.score_fn, cfg.missing_eos_penalty)
    chunks = split_rows(torch.arange(len(prompts)), cfg.minibatch_size)
    # the rollout's own passes (private, but running exactly them is the point)
    logp, ent, ref_logp, values = trainer._passes(gen, trainer.algo.sampler, chunks)
    index = torch.arange(len(prompts))
    return Rollout(
        gen,
        index,
        scores.to(trainer.device),
        proxy,
        logp,
        ref_logp,
        ent,
        values,
        chunks,
        None,
        0.0,
        trainer.step,
    )


@torch.no_grad()
def continued(
    trainer: RLTrainer, prompts: list[list[int]], responses: list[list[int]], ended: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, k1, mask) of responses as training scores and penalises them: only the
    policy's and the reference's passes of the rollout (no critic, no entropies)."""
    cfg, learner = trainer.cfg, trainer.learner
    gen = pack(prompts, responses, ended, trainer.pad_id, trainer.device)
    scores, _ = score_generation(gen, prompts, trainer.score_fn, cfg.missing_eos_penalty)
    k1 = torch.zeros(gen.response.shape, device=trainer.device)
    with learner.amp():
        for rows in split_rows(torch.arange(len(prompts)), cfg.minibatch_size):
            logp = response_logprobs(trainer.policy, gen, rows, cfg.temperature, False)[0]
            k1[rows] = logp - response_logprobs(trainer.ref, gen, rows, cfg.temperature, False)[0]
    return scores.to(trainer.device), k1 * gen.response_mask, gen.response_mask


def measure(trainer: RLTrainer, args: argparse.Namespace, step: int) -> dict:
    """The figures of the critic as it is before `step`'s update (see the module docstring)."""
    t0 = time.perf_counter()
    cfg, k = trainer.cfg, trainer.cfg.samples_per_prompt
    per_step = cfg.prompts_per_step * k
    rng = np.random.default_rng([args.seed, step])
    n_prompts = args.episodes // k
    picked = rng.choice(len(trainer.prompts), n_prompts, replace=n_prompts > len(trainer.prompts))
    prompts = [trainer.prompts[i] for i in picked for _ in range(k)]
    keys = stream_keys(args.seed, MEASURE_STREAM, step, 0, torch.arange(len(prompts)))
    responses, ended = sample(trainer, prompts, [[] for _ in prompts], keys, args.batch)
    ro = scored(trainer, prompts, responses, ended)

    # as PPO.update: returns from the penalised rewards and the rollout's values
    beta = trainer.kl_ctl.beta
    _, rewards = trainer.algo.penalty(ro, beta)
    _, returns = trainer.algo.advantages(ro, rewards)
    mask = ro.mask
    per_batch = sub_batch_ev(ro.values, returns, mask, per_step)
    g_mc = mc_returns(rewards, mask, cfg.ppo.gamma)

    # continuation pairs from uniformly drawn response positions (state s_t: tokens before t)
    where = mask.nonzero().tolist()
    draw = rng.choice(len(where), args.positions, replace=args.positions > len(where))
    chosen = [where[j] for j in draw]
    c_prompts = [prompts[i] for i, _ in chosen for _ in range(2)]
    c_prefix = [responses[i][:t] for i, t in chosen for _ in range(2)]
    c_keys = stream_keys(args.seed, MEASURE_STREAM, step, 1, torch.arange(len(c_prompts)))
    c_resp, c_ended = sample(trainer, c_prompts, c_prefix, c_keys, args.batch)
    c_scores, c_k1, c_mask = continued(trainer, c_prompts, c_resp, c_ended)
    g = mc_returns(core.token_rewards(c_scores, c_k1, c_mask, beta), c_mask, cfg.ppo.gamma)
    t = torch.tensor([t for _, t in chosen for _ in range(2)], device=g.device)
    g_at = g[torch.arange(len(t), device=g.device), t].view(-1, 2).cpu().numpy()
    ceiling, within, total = mc_ceiling(g_at[:, 0], g_at[:, 1])
    return {
        "step": step,
        "ev_gae": core.explained_variance(ro.values, returns, mask),
        "ev_gae_se": ev_bootstrap_se(ro.values, returns, mask, seed=args.seed + step),
        "ev_gae_sd_step": float(np.std(per_batch, ddof=1)),
        "ev_gae_mean_step": float(np.mean(per_batch)),
        "ev_mc": core.explained_variance(ro.values, g_mc, mask),
        "ceiling_mc": ceiling,
        "ceiling_mc_se": bootstrap_se(g_at[:, 0], g_at[:, 1], seed=args.seed + step),
        "var_within": within,
        "var_returns": total,
        "var_returns_batch": float(core.masked_var(g_mc, mask)),
        "score": float(ro.scores.mean()),
        "response_len": float(mask.sum(-1).float().mean()),
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- the run


def stage_diff(path: Path, history: list[dict]) -> tuple[dict[str, float], int] | None:
    """(largest |bench − stage| per LOGGED metric, the last step through which every one agrees
    to 1e-4) over the steps both logged, at the CSV's 6 significant digits
    (`write_history_csv`); None without the stage's CSV."""
    if not path.is_file():
        return None
    with path.open() as f:
        stage = {int(r["step"]): r for r in csv.DictReader(f)}
    both = [h for h in history if h["step"] in stage]
    gaps = [
        {key: abs(float(f"{h[key]:.6g}") - float(stage[h["step"]][key])) for key in LOGGED}
        for h in both
    ]
    same = 0
    for h, gap in zip(both, gaps, strict=True):
        if max(gap.values()) >= 1e-4:
            break
        same = h["step"]
    return {key: max((g[key] for g in gaps), default=float("nan")) for key in LOGGED}, same


def steps_to_measure(at: list[int] | None, steps: int, every: int = 10) -> list[int]:
    """`at`, or step 1 and every `every`-th step from step 10 on."""
    if at is None:
        return sorted({1, *range(10, steps + 1, every)} & set(range(1, steps + 1)))
    past = [s for s in at if not 1 <= s <= steps]
    if past:
        raise SystemExit(f"critic_ev: --at {past} outside steps 1..{steps} (--steps)")
    return sorted(set(at))


def with_text(row: dict) -> dict:
    """The row with the EV and the ceiling, each with its SE, as one table cell."""
    return {
        **row,
        "ev_gae_text": f"{row['ev_gae']:.3f} ± {row['ev_gae_se']:.3f}",
        "ceiling": f"{row['ceiling_mc']:.3f} ± {row['ceiling_mc_se']:.3f}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--sft", type=Path, default=Path("models/sft"))
    ap.add_argument("--reward", type=Path, default=Path("models/reward"))
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument(
        "--stage-csv",
        type=Path,
        default=Path("reports/plots/rl.csv"),
        help="the stage's per-step metrics, which the bench's training run should reproduce",
    )
    ap.add_argument("--steps", type=int, default=None, help="train this many of rl.steps")
    ap.add_argument("--at", type=int, nargs="*", default=None, help="default: 1, 10, 20, ...")
    ap.add_argument(
        "--every", type=int, default=10, help="without --at: step 1 and every N-th from step 10"
    )
    ap.add_argument("--episodes", type=int, default=512, help="fresh episodes per measurement")
    ap.add_argument("--positions", type=int, default=256, help="prefixes continued twice")
    ap.add_argument("--batch", type=int, default=128, help="rows sampled at once")
    ap.add_argument("--seed", type=int, default=0, help="the measurements' random streams")
    add_json_arg(ap)
    args = ap.parse_args()

    t0 = time.perf_counter()
    trainer = build_trainer(args)
    cfg = trainer.cfg
    steps = cfg.steps if args.steps is None else min(args.steps, cfg.steps)
    if args.every < 1:
        raise SystemExit(f"critic_ev: --every {args.every}: at least 1")
    at = steps_to_measure(args.at, steps, args.every)
    per_step = cfg.prompts_per_step * cfg.samples_per_prompt
    if args.episodes % per_step or args.episodes < 2 * per_step:
        raise SystemExit(
            f"critic_ev: --episodes {args.episodes}: a multiple of one step's {per_step} "
            "episodes, at least two of them (the SD over sub-batches)"
        )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'bf16' if trainer.bf16 else 'fp32'}; {len(trainer.prompts)} prompts; training "
        f"{steps} of {cfg.steps} steps, measuring before steps {at}",
        flush=True,
    )
    history, rows, measuring = [], [], 0.0
    while trainer.step < steps:
        step = trainer.step + 1
        if step in at:
            before = random_state(trainer)
            row = measure(trainer, args, step)
            if random_state(trainer) != before:  # would make the run another one
                raise RuntimeError("measuring drew from one of the training run's generators")
            measuring += row["seconds"]
            rows.append(row)
        m = trainer.train_step()
        history.append({"step": trainer.step, **{key: m[key] for key in LOGGED}})
        if step in at:
            row["logged_ev"] = m["rl/explained_variance"]
            print(
                f"step {step}: logged EV {row['logged_ev']:.3f}; on {args.episodes} episodes: "
                f"EV {row['ev_gae']:.3f} ± {row['ev_gae_se']:.3f} "
                f"(SD {row['ev_gae_sd_step']:.3f} on {per_step}), "
                f"EV vs MC returns {row['ev_mc']:.3f}, ceiling {row['ceiling_mc']:.3f} ± "
                f"{row['ceiling_mc_se']:.3f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    seconds = time.perf_counter() - t0
    compared = stage_diff(args.stage_csv, history)
    diff, same = compared if compared is not None else (None, None)
    print(
        "\n| step | logged EV | EV (GAE) ± SE | SD on one step | EV (MC) | ceiling (MC) ± SE |\n"
        "|---:|---:|---|---:|---:|---|"
    )
    for r in rows:
        print(
            f"| {r['step']} | {r['logged_ev']:.3f} | {r['ev_gae']:.3f} ± {r['ev_gae_se']:.3f} | "
            f"{r['ev_gae_sd_step']:.3f} | {r['ev_mc']:.3f} | "
            f"{r['ceiling_mc']:.3f} ± {r['ceiling_mc_se']:.3f} |"
        )
    threads = torch.get_num_threads()
    if diff is None:
        match = "no stage CSV to compare the bench's training run with"
    elif same == steps:
        match = f"the bench's training run is the stage's logged run (`{args.stage_csv}`)"
    else:  # floating-point order (another thread count, another CPU) can flip a sampled token
        match = (
            f"the bench's training run is the stage's logged run (`{args.stage_csv}`) through "
            f"step {same}, then another draw of it (torch threads here: {threads})"
        )
    print(f"\n{match}; {seconds:.0f} s in all, {measuring:.0f} s of it measuring")
    # the SD of one step's EV pooled over the measured steps: its noise on more sub-batches
    pooled_sd = float(np.sqrt(np.mean([r["ev_gae_sd_step"] ** 2 for r in rows]))) if rows else None
    logged = [h["rl/explained_variance"] for h in history if h["step"] >= 10]
    caption = (
        f"{args.episodes} fresh episodes per measurement ({per_step} a training step), "
        f"{args.positions} prefixes continued twice; β {trainer.kl_ctl.beta:g}, γ "
        f"{cfg.ppo.gamma:g}, λ {cfg.ppo.lam:g}; {steps} training steps, {seconds / 60:.0f} min "
        f"in all; {match}."
    )
    if pooled_sd is not None:
        caption += f" SD of one step's EV, pooled over the measured steps: {pooled_sd:.3f}."
    late = [r for r in rows if r["step"] >= 10]
    if late:
        low = min(late, key=lambda r: r["ev_gae"])
        caption += (
            f" EV (GAE) on the {args.episodes} episodes from step 10 ({len(late)} steps "
            f"measured): lowest {low['ev_gae']:.3f} ± {low['ev_gae_se']:.3f} (step "
            f"{low['step']}), median {np.median([r['ev_gae'] for r in late]):.3f}; "
            f"{sum(r['ev_gae'] >= 0.5 for r in late)} of {len(late)} at 0.5 or above."
        )
    if logged:
        caption += (
            f" The bench run's logged EV from step 10: median {np.median(logged):.3f}, lowest "
            f"{min(logged):.3f}."
        )
    write(
        args.json,
        {
            "steps": steps,
            "episodes": args.episodes,
            "step_episodes": per_step,
            "positions": args.positions,
            "beta": trainer.kl_ctl.beta,
            "gamma": cfg.ppo.gamma,
            "lam": cfg.ppo.lam,
            "seconds": seconds,
            "measuring_seconds": measuring,
            "threads": threads,
            "stage_max_abs_diff": diff,
            "stage_same_through": same,
            "ev_gae_sd_step_pooled": pooled_sd,
            "history": history,
            "rows": [with_text(r) for r in rows],
            "caption": caption,
        },
    )


if __name__ == "__main__":
    main()
