"""pretrain and sft through the real `dvc repro`, torchrun with 2 processes, and kill/resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from conftest import env_for, run, writer_run
from lmpipe.io import hash_path

pytestmark = pytest.mark.e2e


def report(repo, stage):
    return json.loads((repo / "reports" / f"{stage}.json").read_text())


def curve(path, key="train/loss"):
    rows = list(csv.DictReader(path.open()))
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def test_pretrain_and_sft_reports(tiny_repo):
    pre, sft = report(tiny_repo, "pretrain"), report(tiny_repo, "sft")
    for r in (pre, sft):
        assert np.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(np.exp(r["val_loss"]))
        assert r["tokens_per_sec"] > 0 and r["train_seconds"] > 0
    assert pre["baseline_bigram_loss"] < pre["baseline_unigram_loss"] < np.log(512) + 0.5
    assert pre["steps"] == 60 and sft["steps"] == 40
    assert 0.0 <= sft["eos_rate"] <= 1.0
    losses = [loss for _, loss in curve(tiny_repo / "reports" / "plots" / "pretrain.csv")]
    assert losses[-1] < losses[0] - 0.5  # it learned something in 60 tiny steps
    assert [s for s, _ in curve(tiny_repo / "reports/plots/pretrain.csv", "eval/loss")] == [
        20,
        40,
        60,
    ]


def test_models_load_with_plain_transformers_and_lineage_is_tracked(tiny_repo):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_repo / "models" / "sft"))
    tok = AutoTokenizer.from_pretrained(str(tiny_repo / "models" / "sft"))
    ids = tok("In the old mill", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    pre = json.loads((tiny_repo / "models" / "pretrain" / "lmpipe.json").read_text())
    sft = json.loads((tiny_repo / "models" / "sft" / "lmpipe.json").read_text())
    assert sft["inputs"]["input.model.sha256"] == hash_path(tiny_repo / "models" / "pretrain")
    assert "mlflow_run_id" not in pre and "train_seconds" not in pre["metrics"]
    run_ = writer_run(tiny_repo, "models/sft")
    assert (
        run_.data.tags["lineage.model.run_id"]
        == writer_run(tiny_repo, "models/pretrain").info.run_id
    )
    assert run_.data.params["sft.max_steps"] == "40"
    assert "train/loss" in run_.data.metrics and "eval/loss" in run_.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_.info.run_id)}
    assert "samples.txt" in artifacts


def lock_hashes(repo):
    """Every path → md5 in dvc.lock, outputs and dependencies of every stage."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {
        (name, kind, entry["path"]): entry.get("md5")
        for name, stage in lock.items()
        for kind in ("deps", "outs")
        for entry in stage.get(kind, [])
    }


def kill_pretrain_at_a_checkpoint(repo):
    """`dvc repro -f pretrain`, SIGKILLed once a checkpoint is on disk; the checkpoint file."""
    import shutil

    for old in (repo / ".cache" / "checkpoints").glob("pretrain-*"):
        shutil.rmtree(old)
    proc = subprocess.Popen(
        ["dvc", "repro", "-f", "pretrain"],
        cwd=repo,
        env=env_for(repo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    ckpts = []
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = list((repo / ".cache" / "checkpoints").glob("pretrain-*/checkpoint.pt"))
        if ckpts:
            break
        time.sleep(0.01)
    stage = [
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if "stages/pretrain.py" in " ".join(c.cmdline())
    ]
    assert ckpts and stage, "the stage ended before a checkpoint could be killed"
    for c in stage:
        os.kill(c.pid, signal.SIGKILL)
    assert proc.wait() != 0
    assert not (repo / "models" / "pretrain").exists()  # DVC removed it; the killed run wrote none
    return ckpts[0]


def test_sigkill_midway_then_plain_repro_resumes_to_the_same_dvc_lock(tiny_repo):
    import shutil

    import torch

    weights = tiny_repo / "models" / "pretrain" / "model.safetensors"
    reference, before = weights.read_bytes(), lock_hashes(tiny_repo)
    ckpt = kill_pretrain_at_a_checkpoint(tiny_repo)
    assert 0 < torch.load(ckpt, weights_only=True)["step"] < 60
    # as on the first run of a pipeline: no dvc.lock entry and no run cache to restore the
    # stage from, so it runs and resumes
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    del lock["stages"]["pretrain"]
    (tiny_repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.rmtree(tiny_repo / ".dvc" / "cache" / "runs")
    res = run(["dvc", "repro"], tiny_repo, extra_env={"LMPIPE_LOG_LEVEL": "INFO"})
    assert "resuming from checkpoint" in res.stderr + res.stdout
    assert weights.read_bytes() == reference
    assert not ckpt.exists()  # cleared after a finished run
    # only the reports of wall-clock time differ; nothing after pretrain ran again
    changed = {k for k, v in lock_hashes(tiny_repo).items() if before.get(k) != v}
    assert changed == {
        ("pretrain", "outs", "reports/pretrain.json"),
        ("pretrain", "outs", "reports/plots/pretrain_speed.csv"),
    }, changed
    assert "Running stage 'sft'" not in res.stdout
    assert "up to date" in run(["dvc", "status"], tiny_repo).stdout


def test_sigkill_then_a_restored_stage_leaves_no_checkpoint_behind(tiny_repo):
    before = lock_hashes(tiny_repo)
    ckpt = kill_pretrain_at_a_checkpoint(tiny_repo)
    res = run(["dvc", "repro"], tiny_repo)
    assert "'pretrain' is cached" in res.stdout  # DVC checked it out: the stage never ran
    assert lock_hashes(tiny_repo) == before
    assert ckpt.exists()
    recipe = (tiny_repo / "Makefile").read_text().split("\nrepro:")[1].split("\n\n")[0]
    assert "dvc repro\n\t$(BIN)/lmpipe prune-checkpoints" in recipe  # what make repro runs next
    run([str(Path(sys.executable).parent / "lmpipe"), "prune-checkpoints"], tiny_repo)
    assert not ckpt.parent.exists()


def test_torchrun_two_processes_match_one_process(tiny_repo, tmp_path):
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["pretrain"].update(
        {"batch_size": 4, "max_steps": 20, "eval_every": 20, "log_every": 1, "checkpoint_every": 0}
    )
    ddp_params = tmp_path / "ddp.yaml"
    ddp_params.write_text(yaml.safe_dump(params))
    params["pretrain"]["batch_size"] = 8
    one_params = tmp_path / "one.yaml"
    one_params.write_text(yaml.safe_dump(params))
    common = ["--data", "data/prepared", "--report", str(tmp_path / "r.json")]
    # LMPIPE_NPROC=2: the stage script replaces itself with `torchrun --nproc_per_node=2`
    res = run(
        [
            "python",
            "stages/pretrain.py",
            "--params",
            str(ddp_params),
            "--out",
            str(tmp_path / "ddp"),
            "--plots",
            str(tmp_path / "ddp.csv"),
            *common,
        ],
        tiny_repo,
        timeout=600,
        extra_env={"LMPIPE_NPROC": "2", "LMPIPE_LOG_LEVEL": "INFO"},
    )
    assert "torchrun --nproc_per_node=2 --standalone stages/pretrain.py" in res.stderr
    assert report_at(tmp_path / "r.json")["world_size"] == 2
    run(
        [
            "python",
            "stages/pretrain.py",
            "--params",
            str(one_params),
            "--out",
            str(tmp_path / "one"),
            "--plots",
            str(tmp_path / "one.csv"),
            *common,
        ],
        tiny_repo,
    )
    ddp, one = curve(tmp_path / "ddp.csv"), curve(tmp_path / "one.csv")
    assert [s for s, _ in ddp] == [s for s, _ in one] == list(range(1, 21))
    # same global batch of 8 windows, gradients averaged by all-reduce: only float order differs
    np.testing.assert_allclose([v for _, v in ddp], [v for _, v in one], rtol=2e-4)


def test_torchrun_sharded_pretrain_matches_one_process_and_saves_the_same_folder(
    tiny_repo, tmp_path
):
    from safetensors.torch import load_file

    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["pretrain"].update(
        {"max_steps": 6, "eval_every": 6, "log_every": 1, "checkpoint_every": 3}
    )
    params["pretrain"].update({"sharding": "fsdp", "precision": "fp32", "batch_size": 4})
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(params))
    params["pretrain"]["batch_size"] = 8
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(params))

    def pretrain(name, **env):
        cmd = ["python", "stages/pretrain.py", "--params", str(tmp_path / f"{name}.yaml")]
        cmd += ["--data", "data/prepared", "--report", str(tmp_path / f"{name}.json")]
        cmd += ["--out", str(tmp_path / name), "--plots", str(tmp_path / f"{name}.csv")]
        cmd += ["--cache", str(tmp_path / "cache" / name)]
        return run(cmd, tiny_repo, timeout=600, extra_env=env)

    res = pretrain("fsdp", LMPIPE_NPROC="2", LMPIPE_LOG_LEVEL="INFO")
    assert "torchrun --nproc_per_node=2 --standalone stages/pretrain.py" in res.stderr
    pretrain("one")
    assert report_at(tmp_path / "fsdp.json")["world_size"] == 2
    sharded, one = curve(tmp_path / "fsdp.csv"), curve(tmp_path / "one.csv")
    np.testing.assert_allclose([v for _, v in sharded], [v for _, v in one], rtol=2e-4)
    # the same folder: files, tensor names, shapes and dtypes, and weights up to float order
    assert sorted(p.name for p in (tmp_path / "fsdp").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    a = load_file(tmp_path / "fsdp" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {
        k: (v.shape, v.dtype) for k, v in b.items()
    }
    for k, v in b.items():
        np.testing.assert_allclose(a[k].numpy(), v.numpy(), rtol=1e-3, atol=1e-5, err_msg=k)


def report_at(path):
    return json.loads(path.read_text())


def test_lmpipe_nproc_builds_the_torchrun_command_only_where_it_applies():
    from lmpipe.stage import torchrun_command

    argv = ["stages/sft.py", "--params", "params.yaml"]
    assert torchrun_command("sft", argv, {}) is None
    assert torchrun_command("sft", argv, {"LMPIPE_NPROC": "1"}) is None
    assert torchrun_command("sft", argv, {"LMPIPE_NPROC": "4"}) == [
        "torchrun",
        "--nproc_per_node=4",
        "--standalone",
        *argv,
    ]
    assert torchrun_command("sft", argv, {"LMPIPE_NPROC": "auto"})[1] == "--nproc_per_node=gpu"
    multi = {
        "LMPIPE_NPROC": "8",
        "LMPIPE_TORCHRUN_ARGS": (
            "--nnodes=2 --node_rank=1 --rdzv_backend=c10d --rdzv_endpoint=h0:29500"
        ),
    }
    assert torchrun_command("pretrain", argv, multi) == [
        "torchrun",
        "--nproc_per_node=8",
        "--nnodes=2",
        "--node_rank=1",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=h0:29500",
        *argv,
    ]
    # already inside torchrun, or a stage that runs in one process: no relaunch
    assert torchrun_command("sft", argv, {"LMPIPE_NPROC": "4", "RANK": "0"}) is None
    assert torchrun_command("export", argv, {"LMPIPE_NPROC": "4"}) is None
    with pytest.raises(SystemExit, match="LMPIPE_NPROC = 'two'"):
        torchrun_command("sft", argv, {"LMPIPE_NPROC": "two"})


def test_from_scratch_folders_load_with_transformers_and_their_chat_template(tiny_repo):
    """Every model folder lmpipe writes is a transformers folder whose tokenizer applies
    lmpipe's one-turn format as a chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmpipe.chat import load_template

    want = load_template(tiny_repo / "data" / "prepared").prompt_ids("Tom went to the sea.")
    msgs = [{"role": "user", "content": "Tom went to the sea."}]
    for name in ("pretrain", "sft", "rl", "compressed/distilled", "compressed/pruned"):
        folder = tiny_repo / "models" / name
        tok = AutoTokenizer.from_pretrained(str(folder))
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)
        assert ids["input_ids"] == want, name
        AutoModelForCausalLM.from_pretrained(str(folder))
