"""Base: fingerprint the pretrained model named by `base.model` (nothing for from scratch).

Run by DVC on every `dvc repro` (always_changed): it rewrites data/base.json, and the stages that
read the base (prepare, pretrain) rerun only when its content changed.
    python stages/base.py --params params.yaml --out data/base.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lmpipe import stage
from lmpipe.base import fingerprint, resolve
from lmpipe.config import load_params
from lmpipe.io import write_json

log = logging.getLogger("base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, required=True, help="fingerprint JSON (data/base.json)")
    args = ap.parse_args()

    params = load_params(args.params, ["base"])
    base = resolve(params.base)
    info = {**fingerprint(base), "revision": params.base.revision, "template": params.base.template}
    write_json(args.out, info)
    log.info("base: %s (%s)", info["model"] or "none, from scratch", info["kind"])


if __name__ == "__main__":
    stage.run(main, "base")
