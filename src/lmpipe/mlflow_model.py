"""lmpipe's ONNX bundles as MLflow models: a pyfunc model whose `predict` generates text with
lmpipe's runtime (onnxruntime; neither torch nor transformers), so a registered bundle loads
with `mlflow.pyfunc.load_model("models:/lmpipe-rl/1")` and serves with `mlflow models serve`.

The logged model carries the bundle as an artifact and this package's runtime as code, so
loading needs onnxruntime, tokenizers and jinja2, not an lmpipe install.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc

PARAMS: dict[str, Any] = {"max_tokens": 48, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                          "seed": -1}  # fmt: skip
"""Generation settings `predict` takes as params (seed -1: unseeded); the bundle's
`generation` defaults replace these when the model is logged."""

MAX_PROMPTS = 256
"""Prompts one `predict` call may ask for: a bound on the work one request can cause."""


def prompts_of(model_input: Any) -> list[str]:
    """The prompts in what MLflow hands `predict`: a DataFrame (its `prompt` column, or its only
    one), a list of strings, one string, or a dict with `prompt` (a string or a list)."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame: its `prompt` or only column
        cols = list(model_input.columns)
        if "prompt" not in cols and len(cols) != 1:
            raise ValueError(f"the input needs a 'prompt' column; it has {cols}")
        model_input = model_input["prompt" if "prompt" in cols else cols[0]].tolist()
    elif isinstance(model_input, Mapping):
        if "prompt" not in model_input:
            raise ValueError("the input needs a 'prompt' key")
        model_input = model_input["prompt"]
    if isinstance(model_input, str):
        model_input = [model_input]
    if not isinstance(model_input, Sequence) or not all(isinstance(p, str) for p in model_input):
        raise ValueError("prompts must be strings")
    if not 0 < len(model_input) <= MAX_PROMPTS:
        raise ValueError(f"give 1 to {MAX_PROMPTS} prompts, not {len(model_input)}")
    return list(model_input)


class BundleModel(mlflow.pyfunc.PythonModel):
    """`predict(prompts, params={max_tokens, temperature, top_k, top_p, seed})` → one completion
    per prompt, each prompt one user turn of the bundle's chat template (as `lmpipe generate`)."""

    def load_context(self, context: Any) -> None:
        from lmpipe.onnx.runtime import OnnxLM

        config = context.model_config or {}
        self.lm = OnnxLM(context.artifacts["bundle"], precision=config.get("precision", "fp32"))

    # no type hints: MLflow would read them as an input schema and warn that Any is not one
    def predict(self, context, model_input, params=None):
        settings = {**PARAMS, **(params or {})}
        ids = [self.lm.prompt_ids(p) for p in prompts_of(model_input)]
        seed = int(settings["seed"])
        out = self.lm.generate_ids(
            ids, max_new_tokens=int(settings["max_tokens"]),
            temperature=float(settings["temperature"]), top_k=int(settings["top_k"]),
            top_p=float(settings["top_p"]), seed=None if seed < 0 else seed,
        )  # fmt: skip
        return [self.lm.decode(t) for t in out.tokens]


def signature(defaults: Mapping[str, Any]) -> Any:
    """Input: strings (a list, or a DataFrame's one column); output: strings; params with the
    bundle's defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {"max_tokens": "long", "temperature": "double", "top_k": "long", "top_p": "double",
             "seed": "long"}  # fmt: skip
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(k, kinds[k], defaults[k]) for k in PARAMS]),
    )


def log_bundle(
    bundle: str | Path,
    name: str,
    registered_model_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    precision: str = "fp32",
) -> Any:
    """Log `bundle` to the active run as a pyfunc model (registered under
    `registered_model_name` when given); returns MLflow's ModelInfo."""
    from lmpipe.onnx.runtime import read_bundle

    gen = read_bundle(Path(bundle)).get("generation") or {}
    defaults = {**PARAMS, **{k: type(PARAMS[k])(gen[g]) for k, g in (
        ("max_tokens", "max_new_tokens"), ("temperature", "temperature"), ("top_k", "top_k"),
        ("top_p", "top_p")) if gen.get(g) is not None}}  # fmt: skip
    package = Path(__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=BundleModel(),
        artifacts={"bundle": str(bundle)},
        code_paths=[str(package)],
        signature=signature(defaults),
        model_config={"precision": precision},
        pip_requirements=["onnxruntime", "tokenizers", "jinja2", "numpy", "pandas"],
        registered_model_name=registered_model_name,
        tags=dict(tags or {}),
    )
