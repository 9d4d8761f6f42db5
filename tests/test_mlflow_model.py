"""ONNX bundles as MLflow pyfunc models: registered, loaded by `models:/` URI, generating text,
also in a process where torch and transformers cannot be imported."""

import json
import subprocess
import sys

import pandas as pd
import pytest


@pytest.fixture()
def registered(bundle, tmp_path, monkeypatch):
    import mlflow

    from lmpipe.mlflow_model import log_bundle

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/store.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = log_bundle(bundle[1], "onnx-test", "lmpipe-test", {"lmpipe.variant": "test"})
    return uri, info


def test_a_registered_bundle_loads_by_uri_and_generates(registered):
    import mlflow

    uri, _ = registered
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/lmpipe-test/1")
    out = model.predict(pd.DataFrame({"prompt": ["w5 w6 w7", "w8"]}),
                        params={"max_tokens": 4, "temperature": 0.0})  # fmt: skip
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    # the same greedy text from a list of prompts, and the bundle's defaults as param defaults
    assert model.predict(["w5 w6 w7", "w8"], params={"max_tokens": 4, "temperature": 0.0}) == out
    params = {p.name: p.default for p in model.metadata.signature.params}
    assert params["max_tokens"] == 8  # the fixture bundle's generation.max_new_tokens
    version = mlflow.MlflowClient().get_model_version("lmpipe-test", "1")
    assert version.tags["lmpipe.variant"] == "test"
    with pytest.raises(Exception, match="1 to 256 prompts"):
        model.predict(["w5"] * 300)


def test_prompts_are_read_from_each_input_shape_and_checked():
    from lmpipe.mlflow_model import prompts_of

    assert prompts_of(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert prompts_of(pd.DataFrame({"text": ["a"]})) == ["a"]
    assert prompts_of({"prompt": "a"}) == prompts_of("a") == ["a"]
    for bad, match in (
        (pd.DataFrame({"x": ["a"], "y": ["b"]}), "'prompt' column"),
        ({"text": "a"}, "'prompt' key"),
        ([1, 2], "strings"),
        ([], "1 to 256"),
    ):
        with pytest.raises(ValueError, match=match):
            prompts_of(bad)


def test_the_model_loads_without_torch_or_transformers(registered):
    uri, _ = registered
    code = f"""
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
import mlflow
mlflow.set_tracking_uri({uri!r})
m = mlflow.pyfunc.load_model("models:/lmpipe-test/1")
import json
print(json.dumps(m.predict(["w5 w6"], params={{"max_tokens": 3, "seed": 1}})))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (text,) = json.loads(res.stdout.strip().splitlines()[-1])
    assert isinstance(text, str)
