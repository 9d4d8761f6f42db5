"""Training throughput (tokens/s) of lmpipe's training loop, fp32 vs bf16 autocast, per shape.

    python bench/train_throughput.py          # default model + nanoGPT's Shakespeare-char shape
    python bench/train_throughput.py --steps 40 --shapes nanogpt --compile
    python bench/train_throughput.py --shapes nanogpt --nanogpt /path/to/nanoGPT/model.py
    python bench/train_throughput.py --shapes gpu-125m --precisions bf16 --compile   # a GPU
    python bench/train_throughput.py --shapes nanogpt --profile --nanogpt ...   # where time goes

Runs the real loop (`lmpipe.train.train`: AdamW, schedule, clipping, loss) on random tokens.
Variants of one shape alternate in the same process (A, B, A, B, ...) and the median of the
repeats is printed, so a busy machine biases no variant. Also prints MFU when the device's peak
is known (a GPU from the table in lmpipe.precision, or --peak-tflops). With --nanogpt, nanoGPT's own
model.py (from a checkout of karpathy/nanoGPT, not part of lmpipe) is timed in the same process
on the same shape, with its own AdamW, as the reference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _results import add_json_arg, write
from lmpipe.allocator import keep_freed_memory
from lmpipe.batches import TokenWindows
from lmpipe.config import ModelParams, PretrainParams
from lmpipe.model import build_model, n_params
from lmpipe.precision import flops_per_token, peak_flops
from lmpipe.profiles import read_profile
from lmpipe.train import lm_loss_sum, train

SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2}
SHAPES = {
    # lmpipe's default `model` section (params.yaml), vocab of the default tokenizer
    "default": (ModelParams(), 4096, 16),
    # nanoGPT's train_shakespeare_char shape with its batch of 16 on CPU runs
    "nanogpt": (
        ModelParams(arch="gpt2", d_model=256, n_layers=4, n_heads=4, context=128, d_ff=1024),
        65,
        16,
    ),
    "nanogpt-llama": (ModelParams(d_model=256, n_layers=4, n_heads=4, context=128), 65, 16),
}


def _profile_shape(path: Path) -> tuple[ModelParams, int, int]:
    """The model, vocab and per-process micro-batch of a params profile."""
    prof = read_profile(path)
    return (
        ModelParams(**prof.get("model", {})),
        prof.get("tokenizer", {}).get("vocab_size", 4096),
        prof.get("pretrain", {}).get("batch_size", 32),
    )


# the GPU profile: python bench/train_throughput.py --shapes gpu-125m --compile (on a GPU)
SHAPES["gpu-125m"] = _profile_shape(Path(__file__).resolve().parents[1] / "params/gpu-125m.yaml")


def run_once(shape: str, precision: str, steps: int, compile_: bool, device: str, peak: float):
    mcfg, vocab, batch = SHAPES[shape]
    model = build_model(mcfg, vocab, SPECIAL, seed=0).to(device)
    tokens = np.random.default_rng(0).integers(0, vocab, size=200_000).astype(np.uint16)
    src = TokenWindows(tokens, mcfg.context, batch, seed=0)
    warm = 5 + (10 if compile_ else 0)
    cfg = PretrainParams(
        max_steps=steps + warm,
        warmup_steps=5,
        batch_size=batch,
        eval_every=10**9,
        log_every=1,
        checkpoint_every=0,
        precision=precision,
        compile=compile_,
        device=device,
        peak_tflops=peak,
    )
    res = train(model, src, cfg, val_batches=[])
    tps = [r["train/tokens_per_sec"] for r in res.history[warm:]]
    return statistics.median(tps), n_params(model), flops_per_token(model)


def nanogpt_model(path: str, device: str) -> torch.nn.Module:
    """nanoGPT's GPT at the Shakespeare-char shape (its train.py default bias=False)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    conf = mod.GPTConfig(
        block_size=128, vocab_size=65, n_layer=4, n_head=4, n_embd=256, dropout=0.0, bias=False
    )
    torch.manual_seed(0)
    return mod.GPT(conf).to(device)


def run_nanogpt(path: str, precision: str, steps: int, device: str) -> float:
    """tokens/s of nanoGPT's GPT (Shakespeare-char shape, batch 16), the same step as ours."""
    model = nanogpt_model(path, device)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device)
    data = torch.randint(0, 65, (16, 129))
    x, y = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)
    times = []
    for i in range(steps + 5):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return 16 * 128 / statistics.median(times)


def profile(shape: str, nanogpt: str | None, device: str, steps: int = 5) -> None:
    """Where a bare fp32 step's time goes (forward, loss, backward, clip, AdamW), ours against
    nanoGPT's: the operators by self time, from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    mcfg, vocab, batch_size = SHAPES[shape]
    tokens = np.random.default_rng(0).integers(0, vocab, size=200_000).astype(np.uint16)
    batch = TokenWindows(tokens, mcfg.context, batch_size, seed=0).fixed_batches(1)[0]
    batch = batch.to(torch.device(device))
    x, y = batch.input_ids.contiguous(), batch.labels.contiguous()  # nanoGPT .view()s them
    ours = build_model(mcfg, vocab, SPECIAL, seed=0).to(device)

    def ours_loss():  # the loss our loop trains on
        return lm_loss_sum(ours, batch) / batch.n_targets

    models = {"ours": (ours, ours_loss)}
    if nanogpt and shape.startswith("nanogpt"):
        ref = nanogpt_model(nanogpt, device)
        models["nanoGPT"] = (ref, lambda: ref(x, y)[1])
    for name, (model, loss_fn) in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()

        def step(model=model, loss_fn=loss_fn, opt=opt):
            loss_fn().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        print(f"--- {name} ({shape}), {steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["default", "nanogpt", "nanogpt-llama"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--nanogpt", default=None, help="path to nanoGPT's model.py, as reference")
    ap.add_argument("--profile", action="store_true", help="operator profile, no timing")
    add_json_arg(ap)
    args = ap.parse_args()
    kept = (
        keep_freed_memory()
    )  # as the training stages run (lmpipe.stage.run); LMPIPE_MALLOC=default
    if args.profile:
        for shape in args.shapes:
            profile(shape, args.nanogpt, args.device)
        return
    dev = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, "
        f"freed host memory {'kept' if kept else 'returned'} (LMPIPE_MALLOC)"
    )
    rows = []
    for shape in args.shapes:
        results: dict[str, list[float]] = {p: [] for p in args.precisions}
        ref: dict[str, list[float]] = {p: [] for p in args.precisions}
        with_ref = bool(args.nanogpt) and shape.startswith("nanogpt")
        for _ in range(args.repeats):  # ours and the reference alternate: drift biases neither
            for p in args.precisions:
                tps, n, fpt = run_once(
                    shape, p, args.steps, args.compile, args.device, args.peak_tflops
                )
                results[p].append(tps)
                if with_ref:
                    ref[p].append(run_nanogpt(args.nanogpt, p, args.steps, args.device))
        base = statistics.median(results[args.precisions[0]])
        for p in args.precisions:
            med = statistics.median(results[p])
            peak = peak_flops(PretrainParams(peak_tflops=args.peak_tflops), dev)
            mfu = f"  MFU {med * fpt / peak:.1%}" if peak else ""
            row = {
                "shape": shape,
                "precision": p,
                "params_m": n / 1e6,
                "tokens_per_sec": med,
                "vs_first": med / base,
                "mfu": med * fpt / peak if peak else None,
                "compiled": args.compile,
                "nanogpt_ratio": None,
            }
            rows.append(row)
            print(
                f"{shape:14s} {p:5s} params {n / 1e6:6.2f}M  {med:10,.0f} tokens/s  "
                f"x{med / base:.2f} vs {args.precisions[0]}{mfu}"
                + ("  (compiled)" if args.compile else "")
            )
            if ref[p]:
                r = statistics.median(ref[p])
                row["nanogpt_ratio"] = med / r
                print(
                    f"{'  nanoGPT':14s} {p:5s} {'':16s}{r:10,.0f} tokens/s  "
                    f"ours/nanoGPT {med / r:.2f}"
                )
    write(
        args.json, {"device": str(dev), "steps": args.steps, "repeats": args.repeats, "rows": rows}
    )


if __name__ == "__main__":
    main()
