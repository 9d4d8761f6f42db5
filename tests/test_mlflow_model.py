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

    from lmpipe.mlflow_model import log_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/store.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        tags = {"lmpipe.variant": "test"}
        info = log_model(bundle[1], "onnx-test", "bundle", "lmpipe-test", tags)
    return uri, info


def test_a_registered_bundle_loads_by_uri_and_generates(registered):
    import mlflow

    uri, _ = registered
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/lmpipe-test/1")
    out = model.predict(
        pd.DataFrame({"prompt": ["w5 w6 w7", "w8"]}), params={"max_tokens": 4, "temperature": 0.0}
    )
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    # the same greedy text from a dict of prompts, and the bundle's defaults as param defaults
    assert (
        model.predict({"prompt": ["w5 w6 w7", "w8"]}, params={"max_tokens": 4, "temperature": 0.0})
        == out
    )
    params = {p.name: p.default for p in model.metadata.signature.params}
    assert params["max_tokens"] == 8  # the fixture bundle's generation.max_new_tokens
    version = mlflow.MlflowClient().get_model_version("lmpipe-test", "1")
    assert version.tags["lmpipe.variant"] == "test"
    with pytest.raises(Exception, match="1 to 256 prompts"):
        model.predict({"prompt": ["w5"] * 300})
    with pytest.raises(Exception, match="'prompt' .* column"):
        model.predict(["w5"])  # MLflow drops the unnamed column: the error says what to send


def test_prompts_and_conversations_are_read_from_each_input_shape_and_checked():
    from lmpipe.mlflow_model import requests_of

    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert requests_of(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert requests_of(pd.DataFrame({"text": ["a"]})) == ["a"]
    assert requests_of({"prompt": "a"}) == requests_of("a") == requests_of(["a"]) == ["a"]
    # MLflow hands a dict input over as one row holding the lists
    assert requests_of(pd.DataFrame({"prompt": [["a", "b"]]})) == ["a", "b"]
    assert requests_of(pd.DataFrame({"messages": [chat]})) == [chat]
    assert requests_of(pd.DataFrame({"messages": [[chat, chat[1:]]]})) == [chat, chat[1:]]
    assert requests_of(pd.DataFrame({"prompt": [None, "b"], "messages": [chat, None]})) == [
        chat,
        "b",
    ]
    for bad, match in (
        (pd.DataFrame({"x": ["a"], "y": ["b"]}), "'prompt' or 'messages' column"),
        (pd.DataFrame(), "'prompt' \\(or 'messages'\\) column"),
        ([1, 2], "strings"),
        ([], "1 to 256"),
        (pd.DataFrame({"messages": [[{"role": "user"}]]}), "string 'role' and a string"),
    ):
        with pytest.raises(ValueError, match=match):
            requests_of(bad)


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
print(json.dumps(m.predict({{"prompt": "w5 w6"}}, params={{"max_tokens": 3, "seed": 1}})))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (text,) = json.loads(res.stdout.strip().splitlines()[-1])
    assert isinstance(text, str)


def test_mlflow_models_serve_generates_from_prompts(registered, tmp_path):
    import os
    import socket
    import time
    import urllib.error
    import urllib.request

    uri, _ = registered
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = os.path.dirname(sys.executable)  # mlflow runs `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    mlflow_bin = os.path.join(bin_dir, "mlflow")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "models",
            "serve",
            "-m",
            "models:/lmpipe-test/1",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        up = False
        for _ in range(300):  # minutes on a busy 2-core machine: it loads the bundle first
            try:
                up = urllib.request.urlopen(f"{url}/ping", timeout=1).status == 200
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(1)
        assert up, (tmp_path / "serve.log").read_text()[-3000:]

        def invoke(body):
            req = urllib.request.Request(
                f"{url}/invocations",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return json.loads(resp.read())["predictions"]
            except urllib.error.HTTPError as err:
                raise AssertionError(err.read().decode()[-2000:]) from None

        params = {"max_tokens": 3, "temperature": 0.0}
        (text,) = invoke({"dataframe_records": [{"prompt": "w5 w6"}], "params": params})
        assert isinstance(text, str)
        # this bundle has no chat template: a conversation is the client's error, said so
        chat = [{"role": "user", "content": "w5 w6"}]
        with pytest.raises(AssertionError, match="has no chat template"):
            invoke({"dataframe_records": [{"messages": chat}], "params": params})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
