"""Every benchmark section of BENCHMARKS.md: runs the bench scripts and renders the document.

    python bench/all.py --run [--only NAME ...] [--cheap]   # bench/results/NAME.json
    python bench/all.py --write BENCHMARKS.md               # render from bench/results only
    python bench/all.py --check BENCHMARKS.md               # exit 1 if it differs
    python bench/all.py --list

Each section is one command (its script with `--json`); its results file keeps that command,
the machine and the date, so rerunning one section leaves the others as they were. `cheap`
sections take minutes; `expensive` ones a pipeline run or more (tens of minutes); `gpu` ones need
CUDA and run only when named in `--only` (`python bench/gpu_figures.py` runs them all).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

Column = tuple[str, str | int, str]  # header, key in a row (or index), format spec ("" = str)


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    argv: list[str]  # the script and its arguments, from the repository root
    cost: str  # "cheap" (minutes), "expensive" (tens of minutes and more) or "gpu" (CUDA only)
    what: str  # one sentence: what the figures measure
    columns: list[Column]
    caption: Callable[[dict], str] = lambda f: f.get("caption", "")
    needs: str = ""  # what must exist before it runs
    tables: list[str] = field(default_factory=lambda: ["rows"])


FIGURE = [("figure", 0, ""), ("value", 1, "")]
# bench/beta_sweep.py's table: RL against best-of-n interpolated at RL's KL
SWEEP: list[Column] = [
    ("β", "beta", ""),
    ("RL reward", "score", ""),
    ("best-of-n reward at RL's KL", "bon_score", ""),
    ("gold", "gold", ""),
    ("best-of-n gold at RL's KL", "bon_gold", ""),
    ("gold − best-of-n (in SEs paired by eval prompt)", "gold_gap", ""),
    ("KL", "kl", ""),
    ("J", "j", ""),
    ("best-of-n's best J bound", "bon_j", ""),
    ("KL(π‖π*)", "posterior_kl", ""),
]
SAMPLERS = [
    ("sampler", "sampler", ""),
    ("tokens/s", "tokens_per_sec", ",.0f"),
    ("vs lmpipe's", "vs_lmpipe", ".2f"),
    ("compile s", "compile_s", ".0f"),
]


def sampling_caption(f: dict) -> str:
    """Batch, tokens, device and dtype, lmpipe / transformers, and engines that were skipped."""
    text = f"Batch {f['batch']}, {f['new_tokens']} new tokens"
    if "device" in f:
        text += f", {f['model']} on {f['device']} in {f['dtype']}"
    if "lmpipe_over_transformers" in f:
        text += f"; lmpipe / transformers: **{f['lmpipe_over_transformers']:.2f}x**"
    text += "."
    for name, why in f.get("skipped", {}).items():
        text += f" Skipped {name}: {why}."
    return text


MODELS = "the pipeline's outputs (`dvc repro` or `dvc pull`)"
# the rl stage at β 0.5 on two seeds, two runs at once: the head of the β-0.5 sections' commands
BETA_05 = ["bench/beta_sweep.py", "--betas", "0.5", "--seeds", "2", "--jobs", "2"]
BETA_02 = ["bench/beta_sweep.py", "--betas", "0.2", "--seeds", "3", "--jobs", "2"]
# a comparison of settings at one β: a row per setting, without the β and gold-gap columns
VARIANT_COLUMNS: list[Column] = [
    ("settings", "variant", ""),
    *(c for c in SWEEP if c[1] not in ("beta", "gold_gap")),
]

SECTIONS = [
    Section(
        "pipeline",
        "The default pipeline, stage by stage (builtin stories, CPU)",
        ["bench/pipeline_report.py"],
        "cheap",
        "Each stage's quality figure against its goal or baseline, and its training time and "
        "speed, read from the committed `reports/*.json` of `make repro` on params.yaml.",
        [("stage", 0, ""), ("figure", 1, ""), ("value", 2, "")],
    ),
    Section(
        "rl_report",
        "The default pipeline: reward model, RL and its critic",
        ["bench/rl_report.py"],
        "cheap",
        "Whether RL got close to its target: the reward model against its bag-of-words "
        "baseline, RL's gains and KL, the objective J against best-of-n's lower bound, and the "
        "critic, read from the committed `reports/reward.json`, `rl.json` and `plots/rl.csv` "
        "(32 held-out eval prompts; best-of-n from the 64 π₀ samples a prompt that estimate "
        "log Z, ranked by the RL reward).",
        FIGURE,
    ),
    Section(
        "rl_budget",
        "RL at 3x the default budget against best-of-n",
        ["bench/beta_sweep.py", "--betas", "0.2", "--seeds", "1", "--set", "rl.steps=120"],
        "expensive",
        "The rl stage alone on the committed SFT and reward models with 120 steps instead of "
        "40, against best-of-n from π₀ on the same 32 eval prompts (64 samples a prompt, so "
        "n ≤ 32 and its KL bound ≤ 2.50 nats).",
        [
            ("β", "beta", ""),
            ("RL reward", "score", ""),
            ("gold", "gold", ""),
            ("best-of-n gold at RL's KL", "bon_gold", ""),
            ("KL", "kl", ""),
            ("J", "j", ""),
            ("best-of-n's best J bound", "bon_j", ""),
            ("KL(π‖π*)", "posterior_kl", ""),
        ],
        needs=MODELS,
    ),
    Section(
        "beta_sweep",
        "RL against best-of-n across β",
        [
            "bench/beta_sweep.py",
            "--betas",
            "0.05",
            "0.1",
            "0.2",
            "0.5",
            "--seeds",
            "3",
            "--jobs",
            "2",
        ],
        "expensive",
        "The rl stage alone at each β on the committed SFT and reward models (mean ± SE over "
        "seeds), against best-of-n from π₀ interpolated at RL's KL on the same eval prompts; "
        "where RL's KL is beyond best-of-32's bound the best-of-n columns are best-of-32's.",
        SWEEP,
        needs=MODELS,
    ),
    Section(
        "rl_batch",
        "RL at β 0.5: batch, steps and learning rate",
        [
            *BETA_05,
            "--variant",
            "4x episodes, half the lr:rl.prompts_per_step=64,rl.steps=80,rl.lr=5e-5",
            "--variant",
            "2x batch:rl.prompts_per_step=64",
            "--variant",
            "2x batch, half the steps:rl.prompts_per_step=64,rl.steps=20",
            "--variant",
            "default:",
        ],
        "expensive",
        "The rl stage at β 0.5, where RL is furthest from best-of-n, with more episodes a step, "
        "more steps or a lower rate (mean ± SE over seeds), on the SFT and reward models of "
        "`dvc repro reward` on the machine below, against best-of-n from π₀ interpolated at "
        "RL's KL on the same eval prompts.",
        VARIANT_COLUMNS,
        needs=MODELS,
    ),
    Section(
        "rl_batch_8x",
        "RL at β 0.5 with 8× the episodes",
        [
            *BETA_05,
            "--variant",
            "8x episodes, half the lr:rl.prompts_per_step=128,rl.steps=80,rl.lr=5e-5",
        ],
        "expensive",
        "The rl stage at β 0.5 with twice the episodes of the largest budget in the section "
        "above (128 prompts a step, 80 steps, half the rate), on the same models, prompts and "
        "seeds: whether more episodes alone bring RL to best-of-n.",
        VARIANT_COLUMNS,
        needs=MODELS,
    ),
    Section(
        "rl_schedule",
        "RL at β 0.2: the learning-rate schedule",
        [
            *BETA_02,
            *("--variant", "linear (default):", "--variant", "constant:rl.lr_schedule=constant"),
            "--variant",
            "constant, half the lr:rl.lr_schedule=constant,rl.lr=5e-5",
        ],
        "expensive",
        "The rl stage at the default β on the committed SFT and reward models with the default "
        "linear decay of the rate to 0 and with a constant rate (mean ± SE over seeds): whether "
        "the schedule, not the objective, is what stops the default run; best-of-n from π₀ "
        "interpolated at RL's KL on the same eval prompts (beyond best-of-32's bound, "
        "best-of-32's figures).",
        VARIANT_COLUMNS,
        needs=MODELS,
    ),
    Section(
        "rl_epochs",
        "RL at β 0.2: PPO epochs",
        [
            *BETA_02,
            *("--variant", "epochs 2 (default):", "--variant", "epochs 1:rl.ppo.epochs=1"),
            *("--variant", "epochs 4:rl.ppo.epochs=4"),
            *("--variant", "epochs 4, 30 steps:rl.ppo.epochs=4,rl.steps=30"),
        ],
        "expensive",
        "The rl stage at the default β on the committed SFT and reward models with 1, 2 (the "
        "default) and 4 PPO passes over each rollout batch, and 4 passes over 30 steps, about "
        "the default's training time (mean ± SE over seeds): whether reusing each batch more "
        "buys J, at the default's episodes and within its time.",
        VARIANT_COLUMNS,
        needs=MODELS,
    ),
    Section(
        "rloo_k",
        "RLOO: samples per prompt at a fixed budget",
        ["bench/rloo_k.py", "--ks", "2", "4", "--seeds", "2", "--jobs", "2"],
        "expensive",
        "The rl stage with `rl.algo: rloo` on the committed SFT and reward models, k samples "
        "for each of 64/k prompts a step (the same episodes a step), against best-of-n's best "
        "J bound on the same eval prompts.",
        [
            ("k", "k", ""),
            ("prompts a step", "prompts", ""),
            ("RL reward", "score", ""),
            ("gold", "gold", ""),
            ("KL", "kl", ""),
            ("J", "j", ""),
            ("best-of-n's best J bound", "bon_j", ""),
        ],
        needs=MODELS,
    ),
    Section(
        "critic_ev",
        "PPO's critic: the noise and the ceiling of its explained variance",
        ["bench/critic_ev.py", "--every", "1"],
        "expensive",
        "The default PPO run retrained in one process on the SFT and reward models of `make "
        "repro` on the machine below (checked against that run's logged metrics) and, before "
        "the listed steps' updates, fresh episodes of the training prompts: the critic's "
        "explained variance against the GAE returns as `rl/explained_variance` logs it, its SD "
        "over disjoint batches of one step's size (the noise of the logged figure), against "
        "Monte Carlo returns, and the most any critic explains of those, 1 − "
        "E[Var(G|s)]/Var(G), from pairs of continuations of random prefixes (± bootstrap SE).",
        [
            ("step", "step", "d"),
            ("logged EV (the step's batch)", "logged_ev", ".3f"),
            ("EV (GAE) ± SE", "ev_gae_text", ""),
            ("its SD on one step's episodes", "ev_gae_sd_step", ".3f"),
            ("EV (Monte Carlo)", "ev_mc", ".3f"),
            ("ceiling (Monte Carlo) ± SE", "ceiling", ""),
        ],
        needs=MODELS,
    ),
    Section(
        "real_text",
        "The default pipeline on real text (Shakespeare, CPU)",
        ["bench/real_text.py"],
        "expensive",
        "`dvc repro` on ../shared/corpora/tinyshakespeare.txt with `data.source: text` and "
        "every other param at its default: whether the reward model and RL carry over to text "
        "the pipeline did not make.",
        FIGURE,
        needs="../shared/corpora/tinyshakespeare.txt",
    ),
    Section(
        "smollm2_rl",
        "RL on a real pretrained model (SmolLM2-135M-Instruct, CPU)",
        ["bench/smollm2_rl.py", "--steps", "16", "--prompts-per-step", "8"],
        "expensive",
        "`dvc repro rl` on params/smollm2-cpu.yaml (VADER gold) with a longer RL run than the "
        "test's: gold, proxy and KL to SFT per step (16 rollouts a step, so every figure is "
        "noisy).",
        [
            ("step", "step", ""),
            ("gold", "gold", ".3f"),
            ("proxy", "proxy", ".3f"),
            ("KL (nats)", "kl", ".3f"),
        ],
        needs="network access once (the GGUF base model)",
    ),
    Section(
        "train_throughput",
        "Training throughput",
        ["bench/train_throughput.py"],
        "cheap",
        "Tokens/s of lmpipe's training loop (AdamW, schedule, clipping, loss) on random tokens "
        "per model shape, fp32 against bf16 autocast alternated in one process (medians).",
        [
            ("shape", "shape", ""),
            ("precision", "precision", ""),
            ("params (M)", "params_m", ".2f"),
            ("tokens/s", "tokens_per_sec", ",.0f"),
            ("vs first precision", "vs_first", ".2f"),
            ("MFU", "mfu", ".1%"),
            ("ours / nanoGPT", "nanogpt_ratio", ".2f"),
        ],
    ),
    Section(
        "sampling_throughput",
        "Sampling throughput",
        ["bench/sampling_throughput.py"],
        "cheap",
        "lmpipe's sampler against transformers' `model.generate` (dynamic cache, static cache, "
        "static cache + `torch.compile`) and against itself with a compiled decode step, on the "
        "same random model of the default shape and the same prompts, ancestral sampling, "
        "alternated in one process; compile time apart from the steady state.",
        SAMPLERS,
        caption=sampling_caption,
    ),
    Section(
        "sampling_reward_workload",
        "Sampling the reward stage's workload",
        ["bench/sampling_throughput.py", "--model", "models/sft", "--k", "12", "--batch", "768"],
        "cheap",
        "The trained SFT model sampling 12 responses for each of 64 RL prompts until EOS: "
        "lmpipe's sampler against itself without its two savings (one prefill per distinct "
        "prompt; finished rows leave the batch) and with bf16 weights.",
        [
            ("sampler", "sampler", ""),
            ("tokens/s", "tokens_per_sec", ",.0f"),
            ("speedup", "speedup", ".2f"),
        ],
        caption=lambda f: "",
        needs=MODELS,
    ),
    Section(
        "attention",
        "Attention kernel",
        ["bench/attention.py"],
        "cheap",
        "Eager attention (matmul, softmax, matmul) against torch's fused SDPA on the default "
        "shape, for sampling with the KV cache and training steps with and without padding; "
        "`lmpipe.model.attention_for` picks the kernel per device from these.",
        [
            ("case", "case", ""),
            ("sdpa tokens/s", "sdpa", ",.0f"),
            ("eager tokens/s", "eager", ",.0f"),
            ("eager / sdpa", "eager_over_sdpa", ".2f"),
        ],
    ),
    Section(
        "losses",
        "Losses over the vocabulary",
        ["bench/losses.py"],
        "cheap",
        "lmpipe's chunked cross-entropy (pretrain, SFT) and distillation KL (compress) against "
        "the same losses written with autograd, alone and in a training step of the default "
        "shapes (forward, backward and AdamW), alternated in one process.",
        [
            ("case", "case", ""),
            ("autograd ms", "autograd_ms", ".1f"),
            ("lmpipe ms", "lmpipe_ms", ".1f"),
            ("speedup", "speedup", ".2f"),
        ],
        caption=lambda f: f"Logits and autocast in {f['precision']}.",
    ),
    Section(
        "tokenizer",
        "Tokenizer",
        ["bench/tokenizer_throughput.py"],
        "cheap",
        "BPE training and encoding throughput on the builtin corpus: batched encoding (what "
        "the prepare stage uses) against one document at a time, in one process.",
        [("figure", 0, ""), ("value", 1, "")],
        caption=lambda f: (
            f"{f['corpus']}: {f['documents']:,} documents, {f['mb']:.2f} MB, vocab {f['vocab']}."
        ),
        tables=["table"],
    ),
    Section(
        "rl_throughput",
        "RL throughput",
        ["bench/rl_throughput.py", "--steps", "4"],
        "cheap",
        "Episodes/s of lmpipe's RL loop per algorithm (tiny Llama policy and reward model, "
        "64 prompts × 2 samples, 32 new tokens, fp32) and, where `trl` is installed, TRL's "
        "RLOOTrainer on the same models with its steps alternated with lmpipe's RLOO.",
        [
            ("loop", "loop", ""),
            ("episodes/s", "episodes_per_sec", ".1f"),
            ("generation share", "generate_share", ".0%"),
        ],
    ),
    Section(
        "rl_passes",
        "Parts of the RL step",
        ["bench/rl_passes.py"],
        "cheap",
        "The output head's log-probs from a full log-softmax against `head_logprobs` (with and "
        "without grad), and the rollout sampler in fp32 against bf16 autocast, alternated in "
        "one process (medians).",
        [
            ("part", "part", ""),
            ("variant", "variant", ""),
            ("ms", "ms", ".1f"),
            ("speedup", "speedup", ".2f"),
        ],
    ),
    Section(
        "rl_scaling",
        "RL data-parallel scaling (CPU)",
        ["bench/rl_scaling.py", "--steps", "3", "--rounds", "2", "--prompts", "32"],
        "cheap",
        "Episodes/s of PPO on 1 and 2 processes sharing this machine's cores (cores/N threads "
        "each): whether splitting RL's sampling and passes between processes beats splitting "
        "them between threads, not how N GPUs scale (`--device cuda --nproc 1 N` on N GPUs).",
        [
            ("processes", "processes", "d"),
            ("episodes/s", "episodes_per_sec", ".1f"),
            ("speedup", "speedup", ".2f"),
            ("generate share", "generate_share", ".2f"),
        ],
    ),
    Section(
        "quantize_cpu",
        "Int8 on this CPU (PyTorch)",
        ["bench/quantize_cpu.py"],
        "cheap",
        "The RL policy's sampling speed with the KV cache (EOS ignored), largest logit "
        "difference to fp32 and weight bytes: torchao int8 weight-only (what the compress stage "
        "saves) against fp32 and the alternatives, in one process.",
        [
            ("model", "model", ""),
            ("b1 tokens/s", "b1", ",.0f"),
            ("b1 vs fp32", "b1_ratio", ".2f"),
            ("b8 tokens/s", "b8", ",.0f"),
            ("b8 vs fp32", "b8_ratio", ".2f"),
            ("max abs Δlogit", "max_dlogit", ".3f"),
            ("weights MB", "weights_mb", ".1f"),
        ],
        needs=MODELS,
    ),
    Section(
        "prune_importance",
        "Which units to prune",
        ["bench/prune_importance.py"],
        "cheap",
        "The RL policy pruned without recovery by each importance score: val perplexity and "
        "per-token KL to the unpruned model on the compress stage's val windows.",
        [
            ("MLP pruned", "mlp", ".2f"),
            ("heads pruned", "heads", ".2f"),
            ("taylor ppl", "taylor_ppl", ".2f"),
            ("taylor KL", "taylor_kl", ".3f"),
            ("magnitude ppl", "magnitude_ppl", ".2f"),
            ("magnitude KL", "magnitude_kl", ".3f"),
            ("random ppl", "random_ppl", ".2f"),
            ("random KL", "random_kl", ".3f"),
        ],
        caption=lambda f: f"Unpruned val ppl {f['base_ppl']:.2f}.",
        needs=MODELS,
    ),
    Section(
        "onnx_generation",
        "Generation speed: PyTorch against ONNX",
        ["bench/onnx_generation.py"],
        "cheap",
        "Greedy generation of 64 tokens a row (EOS masked in every engine) by transformers' "
        "`generate`, lmpipe's sampler and the exported ONNX bundle in fp32 and int8, in one "
        "process (median of 5).",
        [
            ("batch", "batch", "d"),
            ("engine", "engine", ""),
            ("tokens/s", "tokens_per_sec", ",.0f"),
            ("ms/token", "ms_per_token", ".2f"),
            ("vs transformers", "vs_transformers", ".2f"),
        ],
        needs=MODELS,
    ),
    Section(
        "onnx_fp16",
        "ONNX fp16 against fp32",
        ["bench/onnx_fp16.py"],
        "cheap",
        "The fp16 ONNX model (meant for the CUDA provider) against fp32 on the provider here: "
        "size, greedy tokens/s and parity with PyTorch.",
        [
            ("precision", "precision", ""),
            ("MB", "mb", ".2f"),
            ("provider", "provider", ""),
            ("b1 tokens/s", "b1", ",.0f"),
            ("b8 tokens/s", "b8", ",.0f"),
            ("max abs Δlogit", "max_dlogit", ".2e"),
            ("greedy match", "greedy_match", ".3f"),
        ],
        needs=MODELS,
    ),
    Section(
        "serve_load",
        "Server load",
        ["bench/serve_load.py", "--random-bundle", "--part", "throughput"],
        "cheap",
        "`lmpipe serve` on a random bundle of the default shape, closed-loop clients asking "
        "for 32 tokens at temperature 1: one request at a time on the model against batching "
        "the requests that wait (hostile traffic: docs/serving.md).",
        [
            ("server", "server", ""),
            ("clients", "clients", "d"),
            ("req/s", "rps", ".1f"),
            ("tokens/s", "tps", ",.0f"),
            ("p50 ms", "p50_ms", ".1f"),
            ("p95 ms", "p95_ms", ".1f"),
            ("req/s vs one at a time", "vs_one", ".2f"),
        ],
    ),
    Section(
        "reward_variants",
        "Reward-model variants",
        [
            "bench/reward_variants.py",
            *("--lr", "5e-4", "1e-3", "2e-3"),
            *("--weight-decay", "0", "0.1", "1"),
        ],
        "expensive",
        "The reward model retrained on the last reward run's pairs with its training settings "
        "changed (here `reward.lr` and `reward.weight_decay` around the defaults 1e-3 and 0.1), "
        "scored as the stage scores it, against the bag-of-words baseline on the same pairs "
        "(paired gap ± SE by prompt): whether the gap is a matter of tuning.",
        [
            ("lr", "lr", ""),
            ("weight decay", "weight_decay", ""),
            ("kept step", "kept_step", ""),
            ("val accuracy", "val_accuracy", ""),
            ("gold-order accuracy", "gold_order_accuracy", ""),
            ("gap to bag-of-words", "gap", ""),
        ],
        needs=MODELS,
    ),
    Section(
        "reward_passes",
        "Reward model: passes over the train pairs",
        ["bench/reward_variants.py", "--steps", "300", "600", "900"],
        "expensive",
        "The reward model retrained with the stage's params on the last reward run's pairs for "
        "one to three times the default steps, keeping the step of lowest val loss as the stage "
        "does, scored as the stage scores it, against the bag-of-words baseline on the same pairs "
        "(paired gap ± SE by prompt): whether a longer run closes the gap, and after how many "
        "passes over the train prompts the model starts to over-fit them.",
        [
            ("steps", "steps", ""),
            ("kept step", "kept_step", ""),
            ("passes over the train prompts", "passes", ""),
            ("val accuracy", "val_accuracy", ""),
            ("gold-order accuracy", "gold_order_accuracy", ""),
            ("gap to bag-of-words", "gap", ""),
        ],
        needs=MODELS,
    ),
    Section(
        "reward_seeds",
        "Reward model against its baseline across training seeds",
        ["bench/reward_variants.py", "--seeds", "5"],
        "expensive",
        "The reward model retrained with the stage's params on the last reward run's pairs from "
        "five seeds (the head's initialisation and the batches' order), scored as the stage "
        "scores it, against the bag-of-words baseline on the same pairs (paired gap ± SE by "
        "prompt): how much of the gap is the seed.",
        [
            ("seed", "seed", ""),
            ("kept step", "kept_step", ""),
            ("val accuracy", "val_accuracy", ""),
            ("gold-order accuracy", "gold_order_accuracy", ""),
            ("bag-of-words", "baseline", ""),
            ("gap to bag-of-words", "gap", ""),
        ],
        needs=MODELS,
    ),
    Section(
        "reward_residual",
        "Reward model on the residual of bag-of-words",
        ["bench/reward_residual.py"],
        "expensive",
        "Whether the reward model learns anything that bag-of-words misses, on the last reward "
        "run's pairs: the model as the stage trains it, and the same model trained with each "
        "response's bag-of-words score as a fixed offset (cross-fitted over folds of train "
        "prompts), so that it learns only the words' residual; gold-order accuracy ± SE by "
        "prompt of the stacked score and of the residual alone, and the paired gap to "
        "bag-of-words.",
        [
            ("model", "model", ""),
            ("gold-order accuracy", "gold_order", ""),
            ("gap to bag-of-words", "gap", ""),
            ("val accuracy", "val_accuracy", ""),
            ("kept step", "kept_step", ""),
        ],
        needs=MODELS,
    ),
    Section(
        "reward_data",
        "Reward model against its baseline as the preference prompts grow",
        ["bench/reward_data.py", "--prompts", "1000", "2000"],
        "expensive",
        "The reward stage with its default params on the SFT model and prepared data of the last "
        "`dvc repro`, its prompts extended from the training documents as `data.rl_prompts_min` "
        "extends them, k = 12 samples each; gold-order accuracy (± SE by prompt) against the "
        "bag-of-words and bag-of-tokens baselines fitted to the same pairs.",
        [
            ("prompts", "prompts", ""),
            ("train / val pairs", "pairs", ""),
            ("gold-order accuracy", "gold_order", ""),
            ("bag of words", "bow", ".3f"),
            ("bag of tokens", "tokens", ".3f"),
            ("gap to bag of words (paired)", "gap", ""),
            ("val accuracy", "val_accuracy", ""),
            ("sampling / training s", "seconds", ""),
        ],
        needs=MODELS,
    ),
    Section(
        "reward_backbone",
        "Reward model on a pretrained backbone (SmolLM2-135M-Instruct)",
        ["bench/reward_backbone.py", "--steps", "900", "--batch-size", "2", "--lr", "5e-5"],
        "expensive",
        "Whether the reward model's gap to bag-of-words is its backbone's: the default pairs of "
        "the last `dvc repro reward` scored by the stage's reward model (the from-scratch SFT "
        "backbone, all train pairs), by a reward model trained with the stage's functions on "
        "SmolLM2-135M-Instruct (through prepare and pretrain as `base.model`) for two passes "
        "over the train prompts, and by bag-of-words fitted to all train pairs and to the "
        "prompts the reward model drew; "
        "gold-order accuracy ± SE by prompt, and the gap to the stage's bag-of-words paired on "
        "the same val pairs.",
        [
            ("model", "model", ""),
            ("train prompts drawn", "train_prompts_seen", ""),
            ("gold-order accuracy", "gold_order", ""),
            ("gap to bag of words (paired)", "gap", ""),
            ("calibration error", "calibration_error_gold", ""),
        ],
        caption=lambda f: (
            f"Pairs: {f['pairs']} train / val ({f['gold_order_pairs']:,} val pairs whose gold "
            f"scores differ by ≥ 0.1 count for gold order). The reward model on "
            f"{f.get('backbone', 'SmolLM2-135M-Instruct')}: lr {f['lr']:g}, {f['steps']} steps × "
            f"{f['batch_size']} prompts (all their pairs), trained in "
            f"{f['train_seconds'] / 60:.0f} min"
            + (f", weights of step {f['kept_step']} kept" if "kept_step" in f else "")
            + "; calibration error is against gold."
        ),
        needs=MODELS,
    ),
]
GPU = "a CUDA GPU and a CUDA build of torch"
SECTIONS += [
    Section(
        "sampling_gpu",
        "Sampling throughput on a GPU",
        [
            "bench/sampling_throughput.py",
            *("--device", "cuda", "--dtype", "bf16", "--shape", "gpu-125m"),
            *("--batch", "512", "--new-tokens", "96", "--warmup", "2"),
        ],
        "gpu",
        "The sampling comparison above on a random model of params/gpu-125m.yaml's shape in "
        "bf16 weights, at its RL rollout's size (128 prompts × 4 samples, 96 new tokens); "
        "transformers' compiled engine uses CUDA graphs (`reduce-overhead`).",
        SAMPLERS,
        caption=sampling_caption,
        needs=GPU,
    ),
    Section(
        "rl_gpu",
        "RL throughput on a GPU",
        [
            "bench/rl_scaling.py",
            *("--device", "cuda", "--nproc", "1", "--precision", "bf16"),
            *("--prompts", "64", "--steps", "4", "--rounds", "1"),
        ],
        "gpu",
        "Episodes/s of PPO on one GPU in bf16 autocast, the RL throughput section's models and "
        "settings (64 prompts × 2 samples, 32 new tokens), and the sampler's share of a step.",
        [
            ("processes", "processes", "d"),
            ("episodes/s", "episodes_per_sec", ".1f"),
            ("generate share", "generate_share", ".2f"),
        ],
        needs=GPU,
    ),
    Section(
        "train_gpu",
        "Training throughput on a GPU",
        [
            "bench/train_throughput.py",
            *("--device", "cuda", "--shapes", "gpu-125m", "--precisions", "bf16"),
            *("--compile", "--repeats", "1"),
        ],
        "gpu",
        "Tokens/s and MFU of lmpipe's training loop on params/gpu-125m.yaml's model and "
        "micro-batch (32 × 1024 tokens), bf16 autocast and `torch.compile`, random tokens.",
        [
            ("shape", "shape", ""),
            ("precision", "precision", ""),
            ("params (M)", "params_m", ".2f"),
            ("tokens/s", "tokens_per_sec", ",.0f"),
            ("MFU", "mfu", ".1%"),
        ],
        needs=GPU,
    ),
]
BY_NAME = {s.name: s for s in SECTIONS}


def cell(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if spec and not isinstance(value, str):
        return format(value, spec)
    return str(value)


def table(columns: list[Column], rows: list) -> str:
    lines = [
        "| " + " | ".join(h for h, _, _ in columns) + " |",
        "|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|",
    ]
    for row in rows:
        get = row.__getitem__ if isinstance(row, list | tuple) else row.get  # a key may be absent
        lines.append("| " + " | ".join(cell(get(k), f) for _, k, f in columns) + " |")
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    gpu = m.get("gpu") or "no GPU"
    return f"{m['cpu']}, {m['cores']} cores, torch CPU capability {m['capability']}, {gpu}" + (
        f", torch {m['torch']}" if m.get("torch") else ""
    )


def render_section(s: Section, results: Path = RESULTS) -> str:
    path = results / f"{s.name}.json"
    head = f"## {s.title}\n\n{fill(s.what)}\n"
    if not path.is_file():
        how = (
            "python bench/gpu_figures.py"
            if s.cost == "gpu"
            else f"python bench/all.py --run --only {s.name}"
        )
        return f"{head}\nNot run yet: `{how}`.\n"
    doc = json.loads(path.read_text(encoding="utf-8"))
    fig = doc["figures"]
    parts = [
        head,
        f"```bash\n{doc['command']}\n```\n",
        f"{doc['date']}; {machine_line(doc['machine'])}.\n",
    ]
    caption = s.caption(fig)
    if caption:
        parts.append(fill(caption) + "\n")
    for key in s.tables:
        if fig.get(key):
            parts.append(table(s.columns, fig[key]) + "\n")
    return "\n".join(parts)


def fill(text: str) -> str:
    return textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False)


def render(results: Path = RESULTS) -> str:
    intro = (
        "# Benchmarks\n\n"
        + fill(
            "Generated by `python bench/all.py --write BENCHMARKS.md` from `bench/results/*.json`; "
            "do not edit by hand. Each section gives the command that produced its figures, the "
            "machine and the date; `python bench/all.py --run --only NAME` reruns one section and "
            "`--write` renders the document again. Throughput figures come from shared machines: "
            "compare the ratios measured within one process, not absolute figures across sections "
            "or machines. The serving figures under hostile traffic (aborted streams, oversized "
            "bodies, `/health` latency) are in [docs/serving.md](docs/serving.md)."
        )
        + "\n\n"
    )
    index = ["| section | cost | date |", "|---|---|---|"]
    for s in SECTIONS:
        path = results / f"{s.name}.json"
        date = json.loads(path.read_text())["date"] if path.is_file() else "not run"
        index.append(f"| [{s.title}](#{anchor(s.title)}) | {s.cost} | {date} |")
    body = "\n".join(render_section(s, results) for s in SECTIONS)
    return intro + "\n".join(index) + "\n\n" + body


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces as hyphens."""
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def run(sections: list[Section], results: Path = RESULTS, timeout: float | None = None) -> int:
    """Runs each section's command with `--json` into `results`; one that fails or runs past
    `timeout` seconds is reported and the others still run. Returns 1 if any failed."""
    failed = []
    for s in sections:
        out = results / f"{s.name}.json"
        cmd = [sys.executable, *s.argv, "--json", str(out)]
        print(f"--- {s.name}: {shlex.join(cmd)}", flush=True)
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            print(f"{s.name}: ran past {timeout:.0f} s", file=sys.stderr)
            rc = 1
        if rc:
            failed.append(s.name)
            continue
        doc = json.loads(out.read_text(encoding="utf-8"))  # one script can serve two sections
        doc["section"] = s.name
        out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run the sections' scripts")
    ap.add_argument("--only", nargs="+", default=None, choices=list(BY_NAME), metavar="NAME")
    ap.add_argument("--cheap", action="store_true", help="with --run: the cheap sections only")
    ap.add_argument("--write", type=Path, default=None, help="render the document here")
    ap.add_argument("--check", type=Path, default=None, help="exit 1 if this file differs")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--list", action="store_true", help="the sections, their cost and command")
    args = ap.parse_args()
    if args.list:
        for s in SECTIONS:
            print(f"{s.name:26s} {s.cost:9s} python {shlex.join(s.argv)}")
    rc = 0
    if args.run:
        chosen = [BY_NAME[n] for n in args.only] if args.only else SECTIONS
        chosen = [s for s in chosen if s.cost == "cheap" or not args.cheap]
        # the GPU sections run where asked by name (bench/gpu_figures.py runs them all)
        chosen = [s for s in chosen if s.cost != "gpu" or args.only]
        rc = run(chosen, args.results)
    if args.write:
        args.write.write_text(render(args.results), encoding="utf-8")
    stale = args.check and (
        not args.check.is_file() or args.check.read_text(encoding="utf-8") != render(args.results)
    )
    if stale:
        print(
            f"{args.check} differs from what bench/results renders: run "
            f"`python bench/all.py --write {args.check}`",
            file=sys.stderr,
        )
        rc = 1
    sys.exit(rc)


if __name__ == "__main__":
    main()
