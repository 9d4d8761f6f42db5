"""The GPU figures in one go: the GPU tests, then every `gpu` section of bench/all.py (sampling
engines, RL episodes/s, training tokens/s and MFU), each writing its JSON into `--results`.

    python bench/gpu_figures.py                        # a CUDA machine: about 8 minutes
    python bench/gpu_figures.py --results "$OUT"       # the JSON elsewhere, to copy back
    python bench/gpu_figures.py --smoke                # every piece on a CPU, tiny, < 1 minute

Each step runs in a process of its own under a time limit, so one that fails or hangs is
reported and the others still run; the exit status is 1 if any failed. Afterwards, with the JSON
files in bench/results, `python bench/all.py --write BENCHMARKS.md` renders them. `--smoke` runs
the same scripts on the CPU with tiny arguments into a temporary folder (nothing in
bench/results changes) and checks that every section renders from what they wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import all as bench_all  # bench/all.py: the sections, how they run and render

TESTS = ["-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"]
# seconds per step on the GPU: the tests, then each section, within a 10-minute call
LIMITS = {"tests": 90, "sampling_gpu": 240, "rl_gpu": 90, "train_gpu": 150}
SMOKE_LIMIT = 300  # a step of --smoke, on a CPU that other work may share
SMOKE = {
    "sampling_gpu": [
        "bench/sampling_throughput.py",
        *("--shape", "tiny", "--batch", "4", "--new-tokens", "4", "--repeats", "1"),
        *("--engines", "lmpipe", "hf", "hf-static"),
    ],
    "rl_gpu": [
        "bench/rl_scaling.py",
        *("--nproc", "1", "--prompts", "4", "--new-tokens", "4", "--steps", "1", "--rounds", "1"),
    ],
    "train_gpu": [
        "bench/train_throughput.py",
        *("--device", "cpu", "--shapes", "nanogpt", "--precisions", "fp32"),
        *("--steps", "2", "--repeats", "1"),
    ],
}


def sections(smoke: bool) -> list[bench_all.Section]:
    """bench/all.py's `gpu` sections; with `smoke`, their CPU-sized stand-ins."""
    gpu = [s for s in bench_all.SECTIONS if s.cost == "gpu"]
    if smoke:
        gpu = [dataclasses.replace(s, argv=SMOKE[s.name]) for s in gpu]
    return gpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=None, help="default: bench/results")
    ap.add_argument("--smoke", action="store_true", help="tiny, on the CPU, into a temp folder")
    ap.add_argument("--no-tests", action="store_true", help="the figures only")
    args = ap.parse_args()
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            sys.exit(
                f"no CUDA device (torch {torch.__version__}): run this on a GPU machine with a "
                "CUDA build of torch, or --smoke for the CPU check"
            )
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) if args.smoke else (args.results or bench_all.RESULTS)
        results.mkdir(parents=True, exist_ok=True)
        failed = []

        def limit(step: str) -> float:
            return SMOKE_LIMIT if args.smoke else LIMITS[step]

        start = time.perf_counter()
        if not args.no_tests:
            print(f"--- tests: python {' '.join(TESTS)}", flush=True)
            try:
                rc = subprocess.run(
                    [sys.executable, *TESTS], cwd=bench_all.ROOT, timeout=limit("tests")
                ).returncode
            except subprocess.TimeoutExpired:
                rc = 1
            if rc not in (0, 5):  # 5: none collected
                failed.append("tests")
        for s in sections(args.smoke):
            if bench_all.run([s], results, timeout=limit(s.name)):
                failed.append(s.name)
            elif args.smoke:
                text = bench_all.render_section(s, results)
                assert "|---" in text, f"{s.name} rendered no table:\n{text}"
        print(f"--- {time.perf_counter() - start:.0f} s; results in {results}", flush=True)
        if failed:
            sys.exit(f"failed: {' '.join(failed)}")
        if not args.smoke:
            print("then, with the JSON in bench/results: python bench/all.py --write BENCHMARKS.md")


if __name__ == "__main__":
    main()
