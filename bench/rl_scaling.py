"""RL data-parallel scaling: episodes/s of lmpipe's RL loop on 1 and on N processes (gloo on a
CPU, NCCL on GPUs), the same global batch, the same models as `bench/rl_throughput.py`.

    python bench/rl_scaling.py                        # ppo, 1 and 2 processes, this machine
    python bench/rl_scaling.py --algo rloo --nproc 1 2 --steps 6
    python bench/rl_scaling.py --device cuda --nproc 1 8   # one process per GPU

Each process samples and scores its share of the prompt groups (per-row random streams, so the
gathered rollout is one process's), the log-prob and value passes are dealt out by chunk and the
update by prompt groups (`lmpipe.rl.learner`); the sampler's share of a step is printed (each
process's own time sampling its share). On a CPU the machine's cores are shared: N processes
get cores/N threads each, so the figure says whether splitting the passes between processes
beats splitting them between threads, not how N machines would scale. The process counts run
in turn, `--rounds` times, so that drift over minutes falls on every count; each count's figure
is its median step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from _results import add_json_arg, write

sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    backend = "nccl" if args.device == "cuda" else "gloo"
    if world > 1:
        torch.distributed.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    device = "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    from rl_throughput import lmpipe_trainer

    try:
        # the models on the device, as the rl stage puts them; the loop follows the policy's
        t = lmpipe_trainer(args.algo, args.steps, args, device)  # one warm-up step inside
        times, shares = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            m = t.train_step()
            times.append(time.perf_counter() - t0)
            shares.append(m["rl/generate_share"])
        if rank == 0:
            episodes = args.prompts * 2  # the global batch: prompts x 2 samples
            torch.save(
                {
                    "eps": episodes / statistics.median(times),
                    "generate_share": statistics.mean(shares),
                },
                out,
            )
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out, init = os.path.join(tmp, "out.pt"), f"file://{tmp}/rendezvous"
        mp.spawn(worker, args=(world, init, args, out), nprocs=world, join=True)
        return torch.load(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", default="ppo", choices=["ppo", "rloo", "dpg"])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process count")
    ap.add_argument("--rounds", type=int, default=2, help="times each count runs, in turn")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per step (2 samples each)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="CPU threads shared by the processes (cores/N each)",
    )
    add_json_arg(ap)
    args = ap.parse_args()
    args.profile = False
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.nproc}
    for _ in range(args.rounds):
        for n in args.nproc:
            runs[n].append(measure(n, args))
    base = statistics.median(r["eps"] for r in runs[args.nproc[0]])
    cpu = torch.backends.cpu.get_cpu_capability()
    print(
        f"{args.algo}, {args.prompts} prompts x 2 samples, {args.new_tokens} new tokens, "
        f"{args.device}, {args.threads} threads, {cpu}"
    )
    print(
        f"{'processes':>9}  {'episodes/s':>10}  {'speedup':>7}  {'efficiency':>10}  "
        f"{'generate share':>14}"
    )
    rows = []
    for n, rs in runs.items():
        eps = statistics.median(r["eps"] for r in rs)
        share = statistics.mean(r["generate_share"] for r in rs)
        speedup = eps / base
        print(
            f"{n:>9}  {eps:>10.1f}  {speedup:>7.2f}  {speedup / (n / args.nproc[0]):>10.2f}  "
            f"{share:>14.2f}"
        )
        rows.append(
            {"processes": n, "episodes_per_sec": eps, "speedup": speedup, "generate_share": share}
        )
    write(
        args.json, {"algo": args.algo, "device": args.device, "threads": args.threads, "rows": rows}
    )


if __name__ == "__main__":
    main()
