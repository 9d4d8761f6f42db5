"""Inputs a user gets wrong end with a message naming the param or file, never a traceback:
regexes, devices, truncated weights, corrupt bundle manifests."""

from __future__ import annotations

import json

import pytest
import torch

from lmpipe import dist
from lmpipe.config import ParamsError, validate_doc
from lmpipe.onnx.bundle import BundleError, read_bundle


def test_invalid_separator_regex_is_a_params_error():
    with pytest.raises(ParamsError, match=r"data.separator = '\(unclosed': not a valid regular"):
        validate_doc({"data": {"separator": "(unclosed"}}, ["data"])


@pytest.mark.parametrize("device", ["foo", "gpu", "cuda:x", "cpu0"])
def test_unknown_device_names_are_params_errors(device):
    with pytest.raises(ParamsError, match="use auto, cpu, cuda or cuda:N"):
        validate_doc({"rl": {"device": device}}, ["rl"])
    assert validate_doc({"rl": {"device": "cuda:1"}}, ["rl"]).rl.device == "cuda:1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_params_error(device):
    with pytest.raises(ParamsError, match="CUDA is not available"):
        dist.setup(device)


def test_truncated_weights_name_the_file(tmp_path):
    from lmpipe.config import ModelParams
    from lmpipe.model import build_model, load_model, save_model

    special = {"<|bos|>": 1, "<|eos|>": 2, "<|pad|>": 0}
    model = build_model(ModelParams(d_model=16, n_layers=1, n_heads=2), 64, special, seed=0)
    save_model(model, tmp_path, tmp_path, {"stage": "test"})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(FileNotFoundError, match="model.safetensors cannot be read"):
        load_model(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", json.dumps({"files": {}})])
def test_corrupt_bundle_manifest_is_a_bundle_error(tmp_path, text):
    (tmp_path / "bundle.json").write_text(text)
    with pytest.raises(BundleError, match="bundle.json"):
        read_bundle(tmp_path)


def test_a_failed_stage_puts_back_the_reports_dvc_deleted(tmp_path, monkeypatch):
    from lmpipe import stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  x:\n    cmd: run x\n    outs:\n      - models/x\n"
        "    metrics:\n      - reports/x.json:\n          cache: false\n"
        "    plots:\n      - reports/plots/x.csv:\n          cache: false\n"
    )
    report, plot = tmp_path / "reports" / "x.json", tmp_path / "reports" / "plots" / "x.csv"

    def good():
        plot.parent.mkdir(parents=True, exist_ok=True)
        report.write_text('{"loss": 1}')
        plot.write_text("step,loss\n1,1\n")

    def typo():
        raise ParamsError("x.lr = -1: must be > 0")

    stage.run(good, "x")
    report.unlink()  # what DVC does before it runs a stage
    plot.unlink()
    with pytest.raises(SystemExit) as exit_:
        stage.run(typo, "x")
    assert exit_.value.code == 2
    assert report.read_text() == '{"loss": 1}' and plot.read_text() == "step,loss\n1,1\n"

    def half():  # a failure after writing a new report keeps the new one
        report.write_text('{"loss": 2}')
        raise RuntimeError("crash")

    report.unlink()
    with pytest.raises(RuntimeError):
        stage.run(half, "x")
    assert report.read_text() == '{"loss": 2}'
