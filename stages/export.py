"""Export: ONNX bundles (KV cache, graph-optimised fp32 + int8) gated on parity with PyTorch.

Run by DVC (see dvc.yaml).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lmpipe import stage
from lmpipe.config import load_params
from lmpipe.io import atomic_dir, write_json
from lmpipe.onnx.gate import Prepared, export_variant, variant_sources
from lmpipe.tracking.report import model_card
from lmpipe.tracking.run import stage_run

CARD_KEYS = (
    "max_abs_logit_diff",
    "greedy_token_match",
    "size_mb",
    "int8.size_mb",
    "int8.greedy_token_match",
)
"""The figures a registered bundle's description gives."""


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rl", type=Path, required=True, help="RL policy (models/rl)")
    ap.add_argument("--compressed", type=Path, required=True, help="models/compressed")
    ap.add_argument("--data", type=Path, required=True, help="prepared data (prompts, val)")
    ap.add_argument("--out", type=Path, required=True, help="folder of bundles (models/onnx)")
    ap.add_argument("--report", type=Path, required=True, help="metrics JSON")
    return ap.parse_args()


def log_bundles(tracker: Any, out: Path, report: dict[str, dict], register: bool) -> None:
    """Each bundle as an MLflow pyfunc model (mlflow.pyfunc.load_model generates text with it),
    registered as lmpipe-<variant> if `register`; the registry version goes into its row."""
    for name in report:
        registered = f"lmpipe-{name}" if register else None
        card = model_card(f"{name} ONNX", report[name], CARD_KEYS)
        version = stage.log_model(
            tracker,
            out / name,
            f"onnx-{name}",
            "bundle",
            registered,
            card,
            {"lmpipe.variant": name},
        )
        if registered:
            report[name]["registry_version"] = version


def main() -> None:
    args = parse_args()
    params = load_params(args.params, ["export", "tracking"])
    cfg = params.export
    sources = variant_sources(cfg.variants, args.rl, args.compressed)
    inputs = {"rl": args.rl, "compressed": args.compressed, "data": args.data}
    with stage_run("export", params, params.tracking, inputs) as tracker:
        prepared = Prepared.load(args.data)
        report: dict[str, dict] = {}
        with atomic_dir(args.out) as out:
            for name, folder in sources.items():
                report[name] = export_variant(name, folder, out / name, prepared, cfg)
        log_bundles(tracker, args.out, report, cfg.register_model)
        tracker.log_outputs({"bundles": args.out})
        tracker.log_report(report, "reports/export.json")
        write_json(args.report, report)


if __name__ == "__main__":
    stage.run(main, "export")
