"""Inputs a user gets wrong end with a message naming the param or file, never a traceback:
regexes, devices, truncated weights, corrupt bundle manifests."""

from __future__ import annotations

import json

import pytest
import torch

from lmpipe import dist
from lmpipe.config import ParamsError, validate_doc
from lmpipe.onnx.runtime import BundleError, read_bundle


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
