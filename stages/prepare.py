"""Prepare: corpus → clean splits, BPE tokenizer, token files, SFT pairs and prompt sets.

Run by DVC (see dvc.yaml):
    python stages/prepare.py --params params.yaml --out data/prepared --report reports/prepare.json
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from lmpipe import stage
from lmpipe.config import load_params
from lmpipe.data.prepare import prepare
from lmpipe.io import atomic_dir, write_json
from lmpipe.tracking.run import stage_run

log = logging.getLogger("prepare")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, required=True, help="output directory (data/prepared)")
    ap.add_argument("--report", type=Path, required=True, help="metrics JSON (reports/...)")
    ap.add_argument("--corpus-dir", type=Path, default=None, help="tracked corpus folder, hashed")
    args = ap.parse_args()

    params = load_params(args.params, ["base", "data", "tokenizer", "tracking"])
    inputs = {"corpus": args.corpus_dir} if args.corpus_dir and args.corpus_dir.exists() else {}
    with stage_run("prepare", params, params.tracking, inputs) as tracker:
        t0 = time.perf_counter()
        with atomic_dir(args.out) as tmp:
            report, timings = prepare(
                params.data,
                params.tokenizer,
                params.seed,
                tmp,
                provenance={"params": params.to_dict()},
                base_cfg=params.base,
            )
        timings["total_s"] = time.perf_counter() - t0
        tracker.log_outputs({"data": args.out})
        tracker.log_metrics({f"prepare/{k}": v for k, v in timings.items()})
        tracker.log_report(report, "reports/prepare.json")
        write_json(args.report, report)
    log.info(
        "prepared %s docs, %s train tokens, vocab %s, %.1fs (%s)",
        report["documents"]["train"],
        report["tokens"]["train"],
        report["vocab_size"],
        timings["total_s"],
        ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
    )


if __name__ == "__main__":
    stage.run(main, "prepare")
