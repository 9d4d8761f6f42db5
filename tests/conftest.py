"""Shared fixtures: a repo copy with tiny params, and one `dvc repro` shared by e2e tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = ROOT.parent / "shared" / "corpora"

# Small enough that the whole pipeline runs in about a minute on 2 CPU cores.
TINY = {
    "seed": 7,
    "data": {
        "builtin_stories": 400,
        "val_fraction": 0.1,
        "test_fraction": 0.1,
        "rl_prompts": 32,
        "response_sentences": 1,
        "eval_prompts": 16,
    },
    "tokenizer": {"vocab_size": 512},
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "context": 128},
    "pretrain": {
        "max_steps": 60,
        "batch_size": 8,
        "warmup_steps": 5,
        "eval_every": 20,
        "eval_batches": 2,
        "log_every": 5,
        "checkpoint_every": 10,
        "lr": 0.003,
    },
    "sft": {
        "max_steps": 40,
        "batch_size": 16,
        "warmup_steps": 2,
        "eval_every": 20,
        "eval_batches": 2,
        "log_every": 5,
        "checkpoint_every": 20,
        "samples": 8,
        "max_new_tokens": 24,
        "lr": 0.003,
    },
    "preference": {
        "prompts": 32,
        "samples_per_prompt": 6,
        "max_new_tokens": 32,
        "val_fraction": 0.25,
    },
    "reward": {
        "max_steps": 20,
        "batch_size": 8,
        "warmup_steps": 2,
        "eval_every": 10,
        "eval_batches": 2,
        "log_every": 5,
        "checkpoint_every": 10,
        "norm_samples": 32,
        "lr": 0.001,
    },
    "rl": {
        "steps": 6,
        "prompts_per_step": 8,
        "samples_per_prompt": 2,
        "max_new_tokens": 16,
        "minibatch_size": 8,
        "ppo": {"epochs": 2},
        "eval_prompts": 4,
        "eval_samples": 4,
        "posterior_samples": 8,
        "checkpoint_every": 2,
    },
    "compress": {
        "student_layers": 1,
        "student_d_ff": 32,
        "teacher_samples": 32,
        "batch_size": 8,
        "distill_steps": 12,
        "recovery_steps": 6,
        "warmup_steps": 2,
        "eval_every": 6,
        "eval_batches": 2,
        "calibration_batches": 2,
        "eval_prompts": 4,
        "eval_samples": 2,
        "max_new_tokens": 16,
        "speed_new_tokens": 8,
        "checkpoint_every": 4,
    },
    "export": {"parity_prompts": 4, "parity_steps": 8, "ppl_batches": 1},
    "evaluate": {
        "eval_prompts": 4,
        "samples_per_prompt": 2,
        "max_new_tokens": 16,
        "ppl_windows": 4,
        "best_of_n": [1, 2, 4],
        "self_bleu_texts": 8,
        "speed_new_tokens": 8,
        "speed_repeats": 1,
        "side_by_side": 2,
    },
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def env_for(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo}/mlflow.db"
    env["LMPIPE_LOG_LEVEL"] = "WARNING"
    return env


def run(
    cmd: list[str], repo: Path, check: bool = True, extra_env: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    env = {**env_for(repo), **(extra_env or {})}
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({res.returncode})\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        )
    return res


def copy_repo(dest: Path, params: dict | None = None) -> Path:
    """The project's files (tracked and new, not ignored) in a fresh git repo at `dest`."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file():
            (dest / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f.decode())
    if params is not None:
        base = yaml.safe_load((ROOT / "params.yaml").read_text())
        (dest / "params.yaml").write_text(yaml.safe_dump(merge(base, params), sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "copy"]):
        run(cmd, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A copy of the repo where `dvc repro` ran once on TINY params (shared by e2e tests)."""
    repo = copy_repo(tmp_path_factory.mktemp("repo"), TINY)
    run(["dvc", "repro"], repo, timeout=1800)
    return repo


def run_in_own_store(cmd: list[str], repo: Path, db: Path, **env: str):
    """Run a stage command against its own MLflow store `db`; the result and the store's runs."""
    import mlflow

    store = f"sqlite:///{db}"
    res = run(cmd, repo, timeout=900, extra_env={"MLFLOW_TRACKING_URI": store, **env})
    mlflow.set_tracking_uri(store)
    return res, mlflow.search_runs(search_all_experiments=True, output_format="list")


RL_INPUTS = {"sft": "models/sft", "reward": "models/reward", "data": "data/prepared"}
"""The rl stage's inputs in a repo where `dvc repro` ran (compress reads them too)."""


def stage_cmd(stage: str, params: Path | str, out: Path, model: str, **inputs: str) -> list[str]:
    """`python stages/<stage>.py` on `params` and `inputs` (flag: path), writing into `out`:
    the model to `out/<model>`, then `<stage>.json`, `<stage>.csv` and the cache `cache/`."""
    cmd = ["python", f"stages/{stage}.py", "--params", str(params)]
    for flag, path in inputs.items():
        cmd += [f"--{flag}", str(path)]
    cmd += ["--out", str(out / model), "--report", str(out / f"{stage}.json")]
    cmd += ["--plots", str(out / f"{stage}.csv"), "--cache", str(out / "cache")]
    return cmd


def curve_values(path: Path, key: str) -> list[float]:
    """The logged values of one column of a per-step CSV (rows without it skipped)."""
    import csv

    with path.open() as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


def writer_run(repo: Path, output: str):
    """The first MLflow run tagged as the writer of `output`'s current content."""
    import mlflow

    from lmpipe.io import hash_path
    from lmpipe.tracking.tracker import OUTPUT_TAG

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{OUTPUT_TAG}{hash_path(repo / output)}` LIKE '%'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    assert runs, f"no MLflow run wrote the content of {output}"
    return runs[0]  # the first: a test may rerun a stage to the same bytes after the fixture


ONNX_SPECIAL = {"bos": 1, "eos": 2, "pad": 0, "prompt": 3, "response": 4}


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    """A tiny llama with grouped-query attention, exported with its int8 model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lmpipe.config import ModelParams
    from lmpipe.model import build_model
    from lmpipe.onnx.export import build_bundle

    cfg = ModelParams(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, context=64)
    special = {"<|bos|>": 1, "<|eos|>": 2, "<|pad|>": 0}
    model = build_model(cfg, 300, special, seed=0).eval()
    root = tmp_path_factory.mktemp("onnx")
    tok = root / "tokenizer.json"
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w5"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(tok))
    build_bundle(
        model,
        root / "b",
        tokenizer_file=tok,
        special_tokens=ONNX_SPECIAL,
        generation={"max_new_tokens": 8},
        source={"variant": "test"},
    )
    return model, root / "b"
