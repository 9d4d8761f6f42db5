"""What every stage script shares: logging, user-error reporting, the host allocator, the
manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lmpipe.allocator import keep_freed_memory
from lmpipe.chat import TemplateError
from lmpipe.config import ParamsError
from lmpipe.data.sources import DataError
from lmpipe.io import hash_path, without_wall_clock
from lmpipe.onnx.bundle import BundleError
from lmpipe.tracking.tracker import NullTracker, TrackingError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ParamsError,
    DataError,
    TrackingError,
    TemplateError,
    BundleError,
    FileNotFoundError,
)
"""Errors caused by input or configuration: printed as one clear message, exit code 2."""


def setup_logging() -> None:
    # transformers' own bars (loading and writing weights) redraw with carriage returns that
    # litter a log file and say nothing a stage's log lines do not; the stages' tqdm bars stay
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # same, for models
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    level = os.environ.get("LMPIPE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )


KEEP_MEMORY_STAGES = ("pretrain", "sft", "reward", "rl")
"""Stages that keep freed host memory for reuse (`lmpipe.allocator`): the PyTorch training
stages, whose steps it makes faster on a CPU (`bench/train_throughput.py` with and without
`LMPIPE_MALLOC=default`). Not compress, export and evaluate, which measure the generation speed
of the models they report: ONNX Runtime's varied twofold between runs on the development
machine with either setting (`bench/onnx_generation.py [--keep-freed-memory]`), so no gain
there was shown, and their speed figures stay those of a default process."""

DDP_STAGES = ("pretrain", "sft", "reward", "rl", "compress")
"""Stages whose training loop runs data-parallel under torchrun (each rank its own batches)."""


def torchrun_command(stage: str, argv: list[str], env: Mapping[str, str]) -> list[str] | None:
    """The torchrun command that reruns this stage on `LMPIPE_NPROC` processes, or None.

    `LMPIPE_NPROC` is an environment variable, not a param: it changes no DVC hash, since results
    differ only in floating-point order. `LMPIPE_TORCHRUN_ARGS` adds torchrun flags (several
    nodes: `--nnodes=2 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=host0:29500`); without
    it the run is `--standalone` on this machine. None inside torchrun (RANK is set), for stages
    that do not run data-parallel, and for 1 process.
    """
    raw = env.get("LMPIPE_NPROC", "").strip()
    if not raw or "RANK" in env:
        return None
    if raw != "auto" and not raw.isdigit():
        raise SystemExit(f"{stage}: error: LMPIPE_NPROC = {raw!r}: a number of processes or auto")
    if stage not in DDP_STAGES:
        logging.getLogger(__name__).info(
            "LMPIPE_NPROC=%s ignored: %s runs in one process (data-parallel: %s)",
            raw,
            stage,
            ", ".join(DDP_STAGES),
        )
        return None
    if raw == "auto":
        nproc = "gpu"
    elif int(raw) <= 1:
        return None
    else:
        nproc = raw
    extra = shlex.split(env.get("LMPIPE_TORCHRUN_ARGS", ""))
    if not any(a.startswith(("--nnodes", "--rdzv", "--master")) for a in extra):
        extra = ["--standalone", *extra]
    return ["torchrun", f"--nproc_per_node={nproc}", *extra, *argv]


def run(main: Callable[[], Any], stage: str) -> None:
    """Run a stage's `main`; user errors end with `stage: error: ...` and exit code 2.

    With `LMPIPE_NPROC=N` a data-parallel stage replaces itself with `torchrun` on N processes
    (the same script and flags), so `LMPIPE_NPROC=8 dvc repro` trains on 8 GPUs.
    """
    setup_logging()
    try:
        kept = keep_freed_memory() if stage in KEEP_MEMORY_STAGES else False
    except ValueError as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        sys.exit(2)
    logging.getLogger(__name__).debug("freed host memory kept for reuse: %s", kept)
    cmd = torchrun_command(stage, [sys.argv[0], *sys.argv[1:]], os.environ)
    if cmd is not None:
        logging.getLogger(__name__).info("%s: %s", stage, " ".join(cmd))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(cmd[0], cmd)
    kept_outputs = uncached_outputs(stage) if os.environ.get("RANK", "0") == "0" else []
    if os.environ.get("RANK", "0") == "0":
        prune_checkpoints()
    ok = False
    t0 = time.perf_counter()
    try:
        main()
        ok = True
    except USER_ERRORS as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        if ok:
            keep_last_good(kept_outputs)
        else:
            restore_last_good(kept_outputs)
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger(stage).info(
            "%s", summary_line(stage, time.perf_counter() - t0, report_path(sys.argv[1:]))
        )


SUMMARY_KEYS: dict[str, tuple[str, ...]] = {
    "prepare": ("documents.train", "tokens.train", "vocab_size"),
    "pretrain": ("val_loss", "val_ppl", "tokens_per_sec"),
    "sft": ("val_loss", "eos_rate"),
    "reward": ("val_accuracy", "gold_order_accuracy", "baseline_bow_gold_order_accuracy"),
    "rl": ("gold_reward.final", "proxy_reward.final", "kl_to_ref", "episodes_per_sec"),
    "compress": (
        "variants.distilled.gold_reward",
        "variants.pruned.val_ppl",
        "variants.quantized.size_mb",
    ),
    "export": ("rl.max_abs_logit_diff", "rl.int8.greedy_token_match"),
    "evaluate": ("variants.rl.gold_reward", "variants.rl.kl_to_sft", "variants.sft.gold_reward"),
}
"""The figures of a stage's report its last log line gives."""


def report_path(argv: list[str]) -> Path | None:
    """The JSON report a stage was told to write: evaluate's `--metrics` (its `--report` is the
    Markdown report card), else `--report`."""
    for flag in ("--metrics", "--report"):
        if flag in argv[:-1]:
            return Path(argv[argv.index(flag) + 1])
    return None


def summary_line(stage: str, seconds: float, report: Path | None) -> str:
    """`<stage> finished in 1m23s: key figures` — one line a reader of the log looks for."""
    minutes, secs = divmod(round(seconds), 60)
    took = f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    figures = []
    if report is not None and report.is_file():
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(report.read_text())
            for key in SUMMARY_KEYS.get(stage, ()):
                value: Any = data
                for part in key.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                if isinstance(value, int) and not isinstance(value, bool):
                    figures.append(f"{key} {value}")
                elif isinstance(value, float):
                    figures.append(f"{key} {value:.4g}")
    return f"{stage} finished in {took}" + (f": {', '.join(figures)}" if figures else "")


CHECKPOINTS = Path(".cache") / "checkpoints"
"""Where stages keep their resumable checkpoints (their --cache default)."""

LAST_GOOD = Path(".cache") / "lmpipe" / "last-good"
"""Copies of the stage outputs DVC does not cache (reports, plot CSVs), as of each stage's last
successful run."""


def uncached_outputs(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[Path]:
    """The stage's `cache: false` outputs in dvc.yaml. DVC deletes them before the stage runs and
    no `dvc checkout` brings them back, so a stage that fails (a typo in params) would lose
    them: the harness puts the last good ones back."""
    path = Path(dvc_yaml)
    if not path.exists():
        return []
    import yaml

    entries = (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(stage) or {}
    out = []
    for kind in ("outs", "metrics", "plots"):
        for entry in entries.get(kind) or []:
            if isinstance(entry, dict):
                out += [Path(p) for p, opts in entry.items() if (opts or {}).get("cache") is False]
    return out


def keep_last_good(paths: list[Path], store: Path = LAST_GOOD) -> None:
    for p in paths:
        if p.is_file() and not p.is_absolute():
            (store / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, store / p)


def restore_last_good(paths: list[Path], store: Path = LAST_GOOD) -> None:
    """Put back each output the failed run left missing (never over one it wrote)."""
    for p in paths:
        if not p.exists() and not p.is_absolute() and (store / p).is_file():
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(store / p, p)
            logging.getLogger(__name__).warning("restored the last good %s", p)


def log_model(
    tracker: NullTracker,
    path: str | Path,
    name: str,
    kind: str,
    registered_name: str | None = None,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str | None:
    """Log the model at `path` to the tracker's MLflow run as a pyfunc model of `kind`
    (`lmpipe.mlflow_model`: bundle, policy or reward), registered as `registered_name` when
    given, the version tagged with the run's lineage (`NullTracker.version_tags`) and described
    by `description`; the registered version, or None."""
    tracker.note_model(path, name, kind, registered_name, description)
    if tracker.run_id is None:  # tracking is off: there is no MLflow run to log to
        return None
    from lmpipe.mlflow_model import log_model as log_pyfunc  # lazy: importing MLflow is slow

    version_tags = tracker.version_tags(tags)
    info = log_pyfunc(path, name, kind, registered_name, version_tags)
    version = getattr(info, "registered_model_version", None)
    if not registered_name or version is None:
        return None
    tracker.tag_version(registered_name, str(version), version_tags, description)
    return str(version)


def checkpoint_key(params: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the stage's params (not tracking) and the
    content hashes of its inputs. Computed on every DDP rank, since every rank resumes."""
    key = params.to_dict()
    key.pop("tracking", None)
    return {"params": key, "inputs": {name: hash_path(path) for name, path in inputs.items()}}


def manifest(
    stage: str,
    params: Any,
    tags: dict[str, str],
    metrics: dict[str, Any],
    run_key: str | None = None,
) -> dict[str, Any]:
    """The lmpipe.json of a model folder: what made it, from what, and how good it was.

    Only what the result depends on: the same inputs and params give the same manifest, so a
    resumed or repeated run writes the same bytes and DVC reruns nothing after it. The MLflow
    run and the timings are in the run and the report (`tracking.run.lineage_tags` finds the run by
    the folder's content). `run_key` names the run's checkpoint folder, which
    `prune_checkpoints` removes once the output exists.
    """
    return {
        "stage": stage,
        "params": params.to_dict(),
        "inputs": {k: v for k, v in tags.items() if k.startswith("input.")},
        "git_commit": tags.get("git.commit", "unknown"),
        "git_dirty": tags.get("git.dirty", "unknown"),
        "metrics": without_wall_clock(metrics),
        **({"run_key": run_key} if run_key else {}),
    }


def prune_checkpoints(cache: str | Path = CHECKPOINTS, models: str | Path = "models") -> list[Path]:
    """Remove the checkpoint folders of runs whose output is in place (its manifest's run_key):
    DVC checking a stage's outputs out of its cache after a killed run never runs the stage, so
    nothing else would clear that run's checkpoint. Called before every stage and by `make
    repro`."""
    cache, models = Path(cache), Path(models)
    if not cache.is_dir() or not models.is_dir():
        return []
    done = set()
    for m in [*models.glob("*/lmpipe.json"), *models.glob("*/*/lmpipe.json")]:
        with contextlib.suppress(OSError, ValueError):
            if key := json.loads(m.read_text()).get("run_key"):
                done.add(key)
    removed = [d for d in cache.iterdir() if d.is_dir() and d.name in done]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
        logging.getLogger(__name__).info("removed the checkpoint of a finished run: %s", d)
    return removed
