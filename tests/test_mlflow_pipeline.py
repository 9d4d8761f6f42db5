"""MLflow as its users expect it, on the tiny pipeline: one pipeline run per `dvc repro` with
the stage runs under it, every model loadable from the registry, and a copied project that
finds its runs' artifacts in the copy."""

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import run

pytestmark = pytest.mark.e2e

STAGES = ("prepare", "pretrain", "sft", "reward", "rl", "compress", "export", "evaluate")


def runs_of(repo):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    return mlflow.search_runs(
        search_all_experiments=True, output_format="list", order_by=["attributes.start_time ASC"]
    )


def test_one_dvc_repro_is_one_pipeline_run_with_the_stage_runs_under_it(tiny_repo):
    runs = runs_of(tiny_repo)
    pipelines = [r for r in runs if r.data.tags.get("lmpipe.stage") == "pipeline"]
    first = pipelines[0]  # the fixture's `dvc repro`; other tests may rerun stages later
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id]
    assert sorted(r.data.tags["lmpipe.stage"] for r in children) == sorted(STAGES)
    assert first.info.status == "FINISHED"
    assert first.data.tags["git.commit"] == children[0].data.tags["git.commit"]
    assert not any(k.startswith("lmpipe.reused.") for k in first.data.tags)
    # the report card's headline figures on the pipeline run, the inputs as datasets
    headline = json.loads((tiny_repo / "reports/headline.json").read_text())
    assert first.data.metrics["rl_gold"] == pytest.approx(headline["rl_gold"])
    rl = next(r for r in children if r.data.tags["lmpipe.stage"] == "rl")
    assert {d.dataset.name for d in rl.inputs.dataset_inputs} == {
        "models/sft",
        "models/reward",
        "data/prepared",
    }


def test_every_stage_model_is_registered_and_loads_by_uri(tiny_repo):
    import mlflow

    runs_of(tiny_repo)
    client = mlflow.MlflowClient()
    names = {m.name for m in client.search_registered_models()}
    for stage in ("pretrain", "sft", "reward", "rl", "distilled", "pruned", "quantized"):
        assert f"lmpipe-{stage}-torch" in names
    for variant in ("rl", "distilled", "pruned"):
        assert f"lmpipe-{variant}" in names
    version = client.get_model_version("lmpipe-rl-torch", "1")
    for tag in (
        "lmpipe.stage",
        "lmpipe.params.sha256",
        "git.commit",
        "dvc.lock.sha256",
        "output.model.sha256",
        "lineage.sft.run_id",
    ):
        assert version.tags.get(tag), tag
    assert version.description.startswith("lmpipe rl (ppo) model: gold_reward.final ")
    policy = mlflow.pyfunc.load_model("models:/lmpipe-rl-torch/1")
    chat = [{"role": "user", "content": "Tell me a story."}]
    out = policy.predict(
        pd.DataFrame({"prompt": ["Tell me a story.", None], "messages": [None, chat]}),
        params={"max_tokens": 6, "temperature": 0.0},
    )
    assert len(out) == 2 and out[0] == out[1]  # the same turn, as a prompt and as messages
    reward = mlflow.pyfunc.load_model("models:/lmpipe-reward-torch/1")
    scores = reward.predict(
        pd.DataFrame({"prompt": ["Tell me a story."] * 2, "response": [out[0], "the the the"]})
    )
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


def test_a_copied_project_finds_every_runs_artifacts_in_the_copy(tiny_repo, tmp_path):
    first, moved = tmp_path / "first", tmp_path / "moved"
    shutil.copytree(tiny_repo, first, symlinks=True)
    shutil.copytree(first, moved, symlinks=True)
    shutil.rmtree(first)  # nothing may point at a folder that is gone, nor back at the original
    res = run(["lmpipe", "relocate-mlflow"], moved)
    assert "moved from" in res.stdout
    import mlflow

    runs = runs_of(moved)
    client = mlflow.MlflowClient()
    for r in runs:
        assert r.info.artifact_uri.startswith(moved.as_uri()), r.info.artifact_uri
        # a stage run another test made fail on purpose has nothing to find
        if (
            r.data.tags.get("lmpipe.stage") not in (None, "pipeline")
            and r.info.status == "FINISHED"
        ):
            assert client.list_artifacts(r.info.run_id), r.data.tags["lmpipe.stage"]
    for m in client.search_model_versions():
        where = client.get_model_version_download_uri(m.name, m.version)
        assert where.startswith(moved.as_uri()), where
    code = (
        "import mlflow\n"
        f"mlflow.set_tracking_uri('sqlite:///{moved}/mlflow.db')\n"
        "m = mlflow.pyfunc.load_model('models:/lmpipe-rl/1')\n"
        "print(m.predict({'prompt': 'Tell me a story.'}, params={'max_tokens': 4})[0] != None)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=moved, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("True"), res.stderr[-3000:]
    assert "already point here" in run(["lmpipe", "relocate-mlflow"], moved).stdout
