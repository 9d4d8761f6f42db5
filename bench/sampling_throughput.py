"""Sampling throughput: lmpipe's sampler (`lmpipe.sampling.generate`) against transformers'
`model.generate` (dynamic cache, static cache, static cache + `torch.compile`) and against itself
with its decode step compiled, on the same model, prompts and settings, alternated in one process.

    python bench/sampling_throughput.py
    python bench/sampling_throughput.py --batch 64 --new-tokens 32 --repeats 5
    python bench/sampling_throughput.py --engines lmpipe hf hf-static     # no compiling
    python bench/sampling_throughput.py --device cuda --dtype bf16 --shape gpu-125m --warmup 2
    python bench/sampling_throughput.py --model models/sft                # a model folder
    python bench/sampling_throughput.py --model models/sft --k 12         # reward workload

Pure ancestral sampling at temperature 1 (no top-k/top-p) from a random model of `--shape`
(`default`: params.yaml's model, width 256, 4 layers, vocab 4096; `gpu-125m`: params/gpu-125m.yaml's
12 × 768, vocab 16384), or from `--model DIR` (an lmpipe model folder or a Hugging Face one),
left-padded prompts of 12–24 random tokens. Every engine runs every step (no row stops: lmpipe's
sampler is given no stop token, transformers' `min_new_tokens` masks EOS), so the figure is the
per-step cost, batch × new tokens / median seconds.

The engines (`--engines`): `lmpipe`; `lmpipe-compile`, the same sampler with the model's
forward on one-token (decode) inputs through `torch.compile`, the prefill eager, as transformers
does it; `hf`, `model.generate` with its default dynamic cache; `hf-static`,
`cache_implementation="static"` with `disable_compile=True`; `hf-compile`, the static cache with
transformers' own compiled decode (`compile_config`, a `CompileConfig`; transformers compiles it
by itself on CUDA, on a CPU only when asked). `--compile-mode auto` is transformers' default
`reduce-overhead` (CUDA graphs) for `hf-compile` on CUDA and `default` everywhere else: lmpipe's
sampler makes a new static cache per call, whose new addresses CUDA graphs would re-record.
The first `--warmup` rounds are not timed; a compiled engine's compile time is its first call
less its median call, printed apart. A compile that fails, or takes over `--compile-timeout`
seconds, skips that engine with the reason (printed and in the JSON).

With `--k` (and `--model`, a trained model folder and its data, after `dvc repro sft`) it measures
the reward stage's workload instead: `--k` samples for each of `--batch / k` RL prompts, which end
at EOS: lmpipe's sampler against itself without its two savings (one prefill per distinct prompt;
rows that ended leave the batch), and with bf16 weights (`preference.precision`). Tokens/s there
counts the tokens actually sampled.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from _results import add_json_arg, write
from lmpipe.config import ModelParams
from lmpipe.model import attention_for, build_model, set_attention
from lmpipe.sampling import generate, left_pad

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|prompt|>": 3, "<|response|>": 4}
ENGINES = {
    "lmpipe": "lmpipe generate",
    "lmpipe-compile": "lmpipe generate, compiled decode",
    "hf": "transformers generate",
    "hf-static": "transformers generate, static cache",
    "hf-compile": "transformers generate, static cache + compile",
}
COMPILED = ("lmpipe-compile", "hf-compile")


def shape(name: str) -> tuple[ModelParams, int]:
    """The model and vocabulary of a shape: `default` (params.yaml), `tiny`, or a profile's."""
    if name == "default":
        return ModelParams(), 4096
    if name == "tiny":
        return ModelParams(d_model=64, n_layers=2, n_heads=2, context=128), 512
    from lmpipe.profiles import read_profile

    prof = read_profile(Path(__file__).resolve().parents[1] / "params" / f"{name}.yaml")
    return ModelParams(**prof.get("model", {})), prof.get("tokenizer", {}).get("vocab_size", 4096)


def load(args) -> torch.nn.Module:
    """The model to sample from, on `--device` in `--dtype`, with the device's attention."""
    if args.model is None:
        cfg, vocab = shape(args.shape)
        model = build_model(cfg, vocab, SPECIAL, seed=0)
    elif (Path(args.model) / "lmpipe.json").is_file():
        from lmpipe.model import load_model

        model = load_model(args.model)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = model.to(args.device, dtype).eval()
    return set_attention(model, attention_for(args.device))


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises TimeoutError in this (main) thread after `seconds` (0: no limit)."""

    def expire(*_):
        raise TimeoutError(f"compiling took over {seconds:g} s (--compile-timeout)")

    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def compile_decode(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """`model` with one-token forwards through `torch.compile` and longer ones (the prefill)
    eager: lmpipe's sampler calls the model as it is, so it samples with this unchanged."""
    compiled, eager = torch.compile(model.forward, mode=mode), model.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        return (compiled if ids is not None and ids.shape[1] == 1 else eager)(*args, **kwargs)

    model.forward = forward
    return model


def engines(model, prompts, args) -> dict[str, Callable[[], None]]:
    from transformers import CompileConfig

    device = args.device
    ids, mask = (t.to(device) for t in left_pad(prompts, 0))
    cuda = torch.device(device).type == "cuda"
    auto = args.compile_mode == "auto"
    hf_mode = ("reduce-overhead" if cuda else "default") if auto else args.compile_mode
    lm_mode = "default" if auto else args.compile_mode

    def ours(m):
        return lambda: generate(
            m,
            prompts,
            max_new_tokens=args.new_tokens,
            eos_id=-1,  # no row stops: every engine runs every step
            pad_id=0,
            generator=torch.Generator(device).manual_seed(0),
        )

    def hf(m, **kw):
        @torch.no_grad()
        def run():
            m.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                eos_token_id=m.config.eos_token_id,
                pad_token_id=0,
                **kw,
            )

        return run

    def compiled_hf():
        cc = CompileConfig(mode=hf_mode)
        cc._compile_all_devices = True  # transformers compiles on CUDA only unless told so
        # a model of its own: transformers keeps the compiled call on the model
        return hf(copy.deepcopy(model), cache_implementation="static", compile_config=cc)

    made = {
        "lmpipe": lambda: ours(model),
        "lmpipe-compile": lambda: ours(compile_decode(copy.deepcopy(model), lm_mode)),
        "hf": lambda: hf(model),
        "hf-static": lambda: hf(model, cache_implementation="static", disable_compile=True),
        "hf-compile": compiled_hf,
    }
    return {name: made[name]() for name in args.engines}


def timed(fn: Callable[[], None], device: str) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compare(args) -> None:
    # lmpipe's and transformers' compiled calls compile the same model code, and dynamo keeps
    # compiled variants per code object: the default limit of 8 would fall back to eager
    dynamo = torch._dynamo.config
    setattr(
        dynamo, "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit", 64
    )
    model = load(args)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [
        [1, 3, *rng.integers(5, vocab, int(rng.integers(10, 23))).tolist(), 4]
        for _ in range(args.batch)
    ]
    runs = engines(model, prompts, args)
    first: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for r in range(args.warmup):
        for name, fn in list(runs.items()):
            limit = args.compile_timeout if name in COMPILED and r == 0 else 0
            try:
                with time_limit(limit):
                    t = timed(fn, args.device)
                # dynamo catches exceptions while it traces, the alarm's among them, and falls
                # back to eager: a call that outlived the limit is skipped all the same
                if limit and t > limit:
                    raise TimeoutError(
                        f"compiling took {t:.1f} s, over {limit:g} s (--compile-timeout)"
                    )
            except Exception as err:  # a compiler's failure or timeout skips its engine
                if name not in COMPILED:
                    raise
                skipped[ENGINES[name]] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                print(f"skipped {ENGINES[name]}: {skipped[ENGINES[name]]}")
                del runs[name]
                continue
            if r == 0:
                first[name] = t
                print(f"first call of {ENGINES[name]}: {t:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, args.device))
    tokens = args.batch * args.new_tokens
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med.get("lmpipe")
    what = args.model or f"random {args.shape} model"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, "
        f"{args.dtype}; {what}; batch {args.batch}, {args.new_tokens} new tokens"
    )
    rows = []
    for name, t in med.items():
        compile_s = first[name] - t if name in COMPILED and name in first else None
        vs = base / t if base else None
        print(
            f"{ENGINES[name]:46s} {tokens / t:9,.0f} tokens/s  ({t:.2f} s"
            + (f", {vs:.2f}x lmpipe's" if vs else "")
            + (f", compiled in {compile_s:.0f} s" if compile_s is not None else "")
            + ")"
        )
        rows.append(
            {
                "sampler": ENGINES[name],
                "tokens_per_sec": tokens / t,
                "vs_lmpipe": vs,
                "compile_s": compile_s,
            }
        )
    figures = {
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "device": args.device,
        "dtype": args.dtype,
        "model": what,
        "rows": rows,
        "skipped": skipped,
    }
    if base and "hf" in med:
        figures["lmpipe_over_transformers"] = med["hf"] / base
        print(f"lmpipe / transformers: {figures['lmpipe_over_transformers']:.2f}x")
    write(args.json, figures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds (compiling is in them)")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the weights'")
    ap.add_argument("--shape", default="default", help="default, tiny, or a params/ profile")
    ap.add_argument("--model", default=None, help="a model folder instead, e.g. models/sft")
    ap.add_argument(
        "--compile-mode",
        default="auto",
        choices=["auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
    )
    ap.add_argument("--compile-timeout", type=float, default=300, help="seconds (0: no limit)")
    ap.add_argument("--data", default="data/prepared", help="with --k: the model's data")
    ap.add_argument("--k", type=int, default=None, help="with --model: the reward workload")
    add_json_arg(ap)
    args = ap.parse_args()
    if args.k is not None:
        if not args.model:
            ap.error("--k measures the reward workload of a trained model: give --model DIR")
        return trained(args)
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first round compiles)")
    compare(args)


def trained(args) -> None:
    import json

    from lmpipe.chat import load_template
    from lmpipe.model import load_model
    from lmpipe.streams import stream_keys

    template = load_template(args.data)
    lines = (Path(args.data) / "prompts" / "rl.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["prompt"] for line in lines[: args.batch // args.k]]
    prompts = [template.prompt_ids(t) for t in texts for _ in range(args.k)]
    fp32 = load_model(args.model)
    bf16 = load_model(args.model).to(torch.bfloat16)
    runs = {
        "without the savings": (fp32, {"share_prefix": False, "compact": False}),
        "lmpipe generate": (fp32, {}),
        "lmpipe generate, bf16": (bf16, {}),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, (model, kw) in runs.items():
            t0 = time.perf_counter()
            g = generate(  # per-row random streams, as the reward stage draws
                model,
                prompts,
                max_new_tokens=args.new_tokens,
                eos_id=template.stop_ids,
                pad_id=template.pad_id,
                row_keys=stream_keys(r, torch.arange(len(prompts))),
                **kw,
            )
            if r:
                times[name].append(time.perf_counter() - t0)
                tokens[name] = tokens.get(name, 0) + int(g.lengths.sum())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}: "
        f"{len(texts)} prompts x {args.k} samples, <= {args.new_tokens} new tokens"
    )
    base = statistics.median(times["without the savings"])
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        rate = tokens[name] / sum(t)
        print(f"{name:24s} {rate:8,.0f} tokens/s  ({med:.2f} s, {base / med:.2f}x)")
        rows.append({"sampler": name, "tokens_per_sec": rate, "speedup": base / med})
    write(
        args.json,
        {
            "model": args.model,
            "prompts": len(texts),
            "k": args.k,
            "new_tokens": args.new_tokens,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
