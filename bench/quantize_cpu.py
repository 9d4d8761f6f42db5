"""Int8 on this CPU: torchao weight-only (what the compress stage saves) against fp32 and against
the alternatives we did not choose, on the same model and prompts in one process.

Prints sampled tokens/s with the KV cache at batch 1 and 8 (EOS ignored), the largest logit
difference to fp32 on a fixed batch, and the weight bytes of each in memory.

    python bench/quantize_cpu.py [--model models/rl] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

from _results import add_json_arg, write
from lmpipe.compress.quantize import quantize_int8
from lmpipe.evaluate.engines import TorchEngine
from lmpipe.model import load_model


def weight_bytes(model: torch.nn.Module) -> int:
    total = 0
    values = []
    for v in model.state_dict().values():  # torch.ao packs (int8 weight, bias) tuples
        values.extend(v if isinstance(v, tuple) else [v])
    for t in values:
        if hasattr(t, "__tensor_flatten__"):  # torchao tensors: their int8 data and scales
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/rl")
    ap.add_argument("--new-tokens", type=int, default=64)
    add_json_arg(ap)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    fp32 = load_model(args.model)
    models = {
        "fp32": fp32,
        "torchao int8 weight-only (saved)": quantize_int8(fp32, embeddings=True),
    }
    import torchao.quantization as tq

    w8a8 = copy.deepcopy(fp32)
    tq.quantize_(w8a8, tq.Int8DynamicActivationInt8WeightConfig())
    models["torchao int8 dyn. act. + weight"] = w8a8
    if hasattr(torch.ao.quantization, "quantize_dynamic"):  # deprecated in torch, pickled weights
        models["torch.ao quantize_dynamic (fbgemm)"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(fp32), {torch.nn.Linear}, dtype=torch.qint8
        )
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(5, fp32.config.vocab_size, (4, 64), generator=gen)
    with torch.no_grad():
        ref = fp32(x).logits
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11]]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}")
    base = {}
    rows = []
    for name, m in models.items():
        with torch.no_grad():
            diff = float((m(x).logits - ref).abs().max())
        row = []
        rows.append({"model": name, "max_dlogit": diff, "weights_mb": weight_bytes(m) / 1e6})
        for b in (1, 8):
            engine = TorchEngine(name, args.model, eos=2, pad=0, model=m)
            tps = engine.speed(prompts[0], b, args.new_tokens)["tokens_per_sec"]
            base.setdefault(b, tps)
            rows[-1].update({f"b{b}": tps, f"b{b}_ratio": tps / base[b]})
            row.append(f"b{b} {tps:7,.0f} tok/s ({tps / base[b]:.2f}x)")
        mb = weight_bytes(m) / 1e6
        print(f"{name:36s} {'  '.join(row)}  max|dlogit| {diff:.3f}  weights {mb:5.1f} MB")
    write(args.json, {"model": args.model, "new_tokens": args.new_tokens, "rows": rows})


if __name__ == "__main__":
    main()
