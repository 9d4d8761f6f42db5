"""RL throughput: episodes/s of lmpipe's RL loop and the share of time spent generating, next to
TRL's RLOOTrainer on the same models and settings when `trl` is installed
(`pip install -e .[bench]`).

    python bench/rl_throughput.py                       # rloo, ppo and dpg, then TRL's RLOO
    python bench/rl_throughput.py --algos rloo --steps 5 --no-trl
    python bench/rl_throughput.py --algos rloo --precision bf16   # both loops in bf16 autocast
    python bench/rl_throughput.py --algos rloo --no-trl --profile   # where a step's time goes

Setting (the issue's reference): a tiny Llama policy and reward model (width 256, 4 layers,
vocab 4096, random init, fp32), 64 prompts x 2 samples, 32 new tokens, one update per batch
(PPO: its default epochs and minibatches), the reward model scores every response. Both loops
run on the same models, with the same attention kernel (`lmpipe.model.attention_for`); the
first step of each is a warm-up and not timed, and lmpipe's RLOO steps alternate with TRL's
(one each, never at the same time), so that the machine's drift over minutes falls on both
sides of their ratio. With `--precision bf16` (or `auto` where it resolves to bf16, as the rl
stage's default does on CPUs with AVX-512 BF16 or AMX) both loops run under bf16 autocast:
lmpipe's `rl.precision`, TRL's `bf16=True`.

Each loop runs as it ships. TRL runs in a process of its own: lmpipe's loop keeps freed host
memory, as the rl stage does (`lmpipe.allocator`), and TRL's process leaves the C allocator as
it is, as TRL does. `--trl-malloc keep` gives TRL lmpipe's setting too (it gains more from it
than lmpipe's loop does).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import multiprocessing
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from _results import add_json_arg, write
from lmpipe.allocator import ENV as MALLOC_ENV
from lmpipe.allocator import keep_freed_memory
from lmpipe.config import ModelParams, RLParams
from lmpipe.model import attention_for, build_model, set_attention
from lmpipe.precision import use_bf16
from lmpipe.reward.scoring import raw_scores
from lmpipe.rl.loop import RLTrainer
from lmpipe.rl.rollout import ValueModel

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|prompt|>": 3, "<|response|>": 4}
VOCAB, PROMPT_LEN = 4096, 16


def models(seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    cfg = ModelParams(d_model=256, n_layers=4, n_heads=4, context=128)
    policy = build_model(cfg, VOCAB, SPECIAL, seed)
    ref = build_model(cfg, VOCAB, SPECIAL, seed)
    torch.manual_seed(seed)
    rm_config = copy.deepcopy(policy.config)
    rm_config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(
        rm_config, attn_implementation=attention_for()
    ).eval()
    return policy, ref, rm


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, 3, *rng.integers(5, VOCAB, PROMPT_LEN - 3).tolist(), 4] for _ in range(n)]


def lmpipe_trainer(algo: str, steps: int, args, device: str = "cpu") -> RLTrainer:
    """lmpipe's RL loop on the bench's models (on `device`), after one (untimed) warm-up step."""
    kernel = attention_for(device)
    policy, ref, rm = (set_attention(m.to(device), kernel) for m in models())
    # scored as the rl stage scores (RewardModel.score_ids): the head at the last token, each
    # prompt run once for its k responses (lmpipe.reward.scoring.sequence_scores)
    rm.config.lmpipe_response_token_id = SPECIAL["<|response|>"]

    def score_fn(p, r):
        return raw_scores(rm, [[*a, *b] for a, b in zip(p, r, strict=True)], SPECIAL["<|pad|>"])

    cfg = RLParams(
        algo=algo,
        prompts_per_step=args.prompts,
        samples_per_prompt=2,
        # warm-up, the step after TRL's warm-up, the timed steps: the lr never decays to 0
        max_new_tokens=args.new_tokens,
        missing_eos_penalty=None,
        steps=steps + 2,
        precision=args.precision,
        minibatch_size=args.prompts * 2 if algo != "ppo" else 32,
    )
    value = ValueModel.zero_head(policy) if algo == "ppo" else None
    t = RLTrainer(
        policy,
        ref,
        cfg,
        prompts(args.prompts * 4),
        score_fn,
        eos_id=2,
        pad_id=0,
        seed=0,
        value_model=value,
    )
    t.train_step()  # warm-up
    return t


def summarise(metrics: list[dict[str, float]]) -> dict[str, float]:
    return {
        "episodes_per_sec": statistics.median(m["rl/episodes_per_sec"] for m in metrics),
        "generate_share": float(np.mean([m["rl/generate_share"] for m in metrics])),
    }


def bench_lmpipe(algo: str, steps: int, args) -> dict[str, float]:
    t = lmpipe_trainer(algo, steps, args)
    with phase_timer(t) as phases:
        metrics = [t.train_step() for _ in range(steps)]
    if args.profile:
        print(f"--- lmpipe {algo}: seconds per step ({steps} steps)")
        for name, total in phases.items():
            print(f"  {name:32s} {total / steps:6.3f}")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t.train_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return summarise(metrics)


@contextlib.contextmanager
def phase_timer(trainer: RLTrainer):
    """Seconds spent in the step's parts, summed over the steps run inside the block: the
    sampler, the reward model, every log-prob pass (reference and policy, including the
    policy's forward with grad that rloo and dpg run inside their update), the update, and
    the whole step. The parts nest, so they do not add up to the step."""
    import lmpipe.rl.learner as learner
    import lmpipe.rl.loop as loop
    import lmpipe.rl.ppo as ppo

    totals: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    patched = [(loop, "generate", "generate"), (loop, "score_generation", "reward model")]
    patched += [(m, "response_logprobs", "log-prob passes (all)") for m in (loop, learner, ppo)]
    saved = [(m, n, getattr(m, n)) for m, n, _ in patched]
    for m, n, name in patched:
        setattr(m, n, timed(name, getattr(m, n)))
    original_update, original_step = trainer.algo.step, trainer.train_step
    trainer.algo.step = timed("update (incl. its log-probs)", original_update)
    trainer.train_step = timed("whole step", original_step)
    try:
        yield totals
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)
        trainer.algo.step = original_update
        trainer.train_step = original_step


def bench_trl(steps: int, args, bf16: bool, between: Callable[[], None]) -> dict[str, float]:
    """TRL's RLOOTrainer, `steps` timed steps after one warm-up; `between` runs after each of
    its steps (outside its timing): the wait for lmpipe's step, so the two loops alternate."""
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    policy, _, rm = models()
    vocab = {**SPECIAL, **{f"t{i}": i for i in range(len(SPECIAL), VOCAB)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t5")),
        pad_token="<|pad|>",
        eos_token="<|eos|>",
        bos_token="<|bos|>",
    )
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # the same token ids as lmpipe's prompts, template tokens included (TRL encodes prompts
    # without adding special tokens)
    names = {i: name for name, i in vocab.items()}
    ids = prompts(args.prompts * 4 * (steps + 2))
    texts = [" ".join(names[i] for i in p) for p in ids]
    if tok(texts[0], add_special_tokens=False)["input_ids"] != ids[0]:
        raise RuntimeError("TRL's prompts would not be lmpipe's token ids")
    config = trl.RLOOConfig(
        output_dir="/tmp/lmpipe-bench-trl",
        per_device_train_batch_size=args.prompts * 2,
        num_generations=2,
        max_completion_length=args.new_tokens,
        steps_per_generation=1,
        num_iterations=1,
        max_steps=steps + 1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        temperature=1.0,
        beta=0.05,
        bf16=bf16,
        disable_tqdm=True,
        # the same attention kernel as lmpipe's models on this device (eager on CPU)
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": attention_for()},
    )
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            between()

    path = "/tmp/lmpipe-bench-trl/policy"
    policy.save_pretrained(path)  # TRL builds its reference copy from a path
    trainer = trl.RLOOTrainer(
        model=path,
        reward_funcs=rm,
        args=config,
        processing_class=tok,
        reward_processing_classes=tok,
        train_dataset=Dataset.from_dict({"prompt": texts}),
        callbacks=[Timer()],
    )
    trainer.train()
    per_step = statistics.median(times[1:])
    return {"episodes_per_sec": args.prompts * 2 / per_step, "version": trl.__version__}


def trl_process(conn, steps: int, args, bf16: bool) -> None:
    """`bench_trl` in a process of its own: the C allocator as `--trl-malloc` says; after
    each of its steps it tells the parent and waits until the parent's lmpipe step is done."""
    kept = keep_freed_memory({MALLOC_ENV: args.trl_malloc})

    def between() -> None:
        conn.send("step")
        conn.recv()

    try:
        r = bench_trl(steps, args, bf16, between)
        conn.send(("done", {**r, "malloc_kept": kept}))
    except BaseException as e:  # the parent must not wait forever
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        raise


def alternate_with_trl(steps: int, args, bf16: bool, lmpipe_step: Callable[[], None]):
    """TRL's result, with `lmpipe_step` run after each of TRL's steps, in this process while
    TRL's waits."""
    ctx = multiprocessing.get_context("spawn")  # a fresh process: nothing inherited but args
    here, there = ctx.Pipe()
    proc = ctx.Process(target=trl_process, args=(there, steps, args, bf16), daemon=True)
    proc.start()
    try:
        while True:
            if not here.poll(600):
                raise RuntimeError("TRL's process said nothing for 10 minutes")
            msg = here.recv()
            if msg == "step":
                lmpipe_step()
                here.send("go")
            elif msg[0] == "done":
                return msg[1]
            else:
                raise RuntimeError(f"TRL's process failed: {msg[1]}")
    finally:
        proc.join(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", nargs="+", default=["rloo", "ppo", "dpg"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-part seconds and top aten ops")
    ap.add_argument(
        "--trl-malloc",
        default="default",
        choices=["default", "keep"],
        help="C allocator of TRL's process: as TRL ships (default), or lmpipe's setting (keep)",
    )
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "auto"],
        help="lmpipe's rl.precision; TRL runs in bf16 autocast too where it resolves to bf16 "
        "(fp32, the default, is the issue's setting)",
    )
    add_json_arg(ap)
    args = ap.parse_args()
    # as the training stages run (lmpipe.stage.run); TRL's process chooses its own
    kept = keep_freed_memory()
    bf16 = use_bf16(args.precision, torch.device("cpu"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"precision {'bf16' if bf16 else 'fp32'} ({args.precision}), "
        f"attention {attention_for()}, "
        f"freed host memory {'kept' if kept else 'returned'} in lmpipe's loop "
        f"(LMPIPE_MALLOC)"
    )
    # with TRL to compare against, lmpipe's rloo steps alternate with TRL's steps, so that
    # this machine's drift over minutes (5-10%) falls on both sides of the ratio
    has_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    alternate = "rloo" in args.algos and has_trl and not args.profile
    rows = {}
    for algo in args.algos:
        if algo == "rloo" and alternate:
            continue
        rows[algo] = bench_lmpipe(algo, args.steps, args)
        show(algo, rows[algo])
    figures = {"precision": "bf16" if bf16 else "fp32", "rows": []}
    if args.no_trl or not has_trl:
        if not args.no_trl:
            print("trl not installed: pip install -e .[bench]")
        return save(args, figures, rows)
    rloo_steps: list[dict[str, float]] = []
    step = lambda: None  # noqa: E731
    if alternate:
        t = lmpipe_trainer("rloo", args.steps, args)
        step = lambda: rloo_steps.append(t.train_step())  # noqa: E731
    r = alternate_with_trl(args.steps, args, bf16, step)
    if alternate:  # the step after TRL's warm-up is dropped too: the pairs are the timed steps
        rows["rloo"] = summarise(rloo_steps[1:])
        show("rloo", rows["rloo"], " (its steps alternated with TRL's)")
    print(
        f"trl {r['version']} RLOOTrainer {r['episodes_per_sec']:7.1f} episodes/s  "
        f"(its process: freed host memory {'kept' if r['malloc_kept'] else 'returned'})"
    )
    if "rloo" in rows:
        ratio = rows["rloo"]["episodes_per_sec"] / r["episodes_per_sec"]
        print(f"lmpipe rloo / trl RLOO: {ratio:.2f}x")
        figures["caption"] = f"lmpipe RLOO / TRL RLOO: **{ratio:.2f}x** (TRL {r['version']})."
    figures["rows"].append(
        {
            "loop": f"trl {r['version']} RLOOTrainer",
            "episodes_per_sec": r["episodes_per_sec"],
            "generate_share": None,
        }
    )
    save(args, figures, rows)


def save(args, figures: dict, rows: dict[str, dict[str, float]]) -> None:
    figures["rows"][:0] = [{"loop": f"lmpipe {algo}", **r} for algo, r in rows.items()]
    write(args.json, figures)


def show(algo: str, r: dict[str, float], note: str = "") -> None:
    print(
        f"lmpipe {algo:5s} {r['episodes_per_sec']:7.1f} episodes/s  "
        f"generation {100 * r['generate_share']:.0f}% of the step{note}"
    )


if __name__ == "__main__":
    main()
