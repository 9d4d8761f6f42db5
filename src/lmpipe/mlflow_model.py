"""lmpipe's models as MLflow pyfunc models, so a registered version loads with
`mlflow.pyfunc.load_model("models:/<name>/<version>")` and serves with `mlflow models serve`.

Three kinds, one class (`LmpipeModel`, the kind read from the logged folder):
- `bundle`: an ONNX bundle; `predict` generates text with lmpipe's runtime (onnxruntime,
  tokenizers, jinja2: neither torch nor transformers).
- `policy`: a PyTorch model folder (pretrain, sft, rl, compressed); `predict` generates text
  with lmpipe's sampler.
- `reward`: the reward model folder; `predict` scores prompt/response rows (normalised scores).

Each is logged from code (`lmpipe/mlflow_pyfunc.py`, nothing pickled) with this package as code,
so loading needs the libraries above, not an lmpipe install.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc

PARAMS: dict[str, Any] = {
    "max_tokens": 48,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "seed": -1,
}
"""Generation settings `predict` takes as params (seed -1: unseeded; temperature 0: greedy); a
model's own generation defaults replace these when it is logged. PyTorch models ignore top_k
and top_p (lmpipe's sampler draws from the full distribution)."""

MAX_PROMPTS = 256
"""Rows one `predict` call may ask for: a bound on the work one request can cause."""

Request = str | list[dict[str, str]]
"""A plain prompt (one user turn) or a conversation (messages with role and content)."""


def _messages(value: Any) -> list[dict[str, str]]:
    if hasattr(value, "tolist"):  # pandas hands a list cell over as a numpy array
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError("messages must be a non-empty list of {role, content}")
    out = []
    for m in value:
        if not isinstance(m, Mapping) or not all(
            isinstance(m.get(k), str) for k in ("role", "content")
        ):
            raise ValueError("every message needs a string 'role' and a string 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def requests_of(model_input: Any) -> list[Request]:
    """The rows in what MLflow hands `predict`: a DataFrame with a `prompt` column (strings)
    and/or a `messages` column (conversations), a dict of such columns, one string, or a list
    of strings. A row with both uses its messages."""
    if isinstance(model_input, str):
        model_input = {"prompt": [model_input]}
    elif isinstance(model_input, Sequence) and not isinstance(model_input, Mapping):
        model_input = {"prompt": list(model_input)}
    if isinstance(model_input, Mapping):
        import pandas as pd

        cols = {k: [v] if isinstance(v, str) else list(v) for k, v in model_input.items()}
        if len({len(v) for v in cols.values()}) > 1:
            raise ValueError("the input's columns must have the same length")
        model_input = pd.DataFrame(cols)
    if not hasattr(model_input, "columns"):
        raise ValueError("give prompts, or a DataFrame with a 'prompt' or 'messages' column")
    cols = list(model_input.columns)
    if not cols:  # MLflow drops a column its signature does not name (a bare list of strings)
        raise ValueError(
            "give a DataFrame with a 'prompt' (or 'messages') column, e.g. "
            "pd.DataFrame({'prompt': ['Hello']}), or {'prompt': ['Hello']}"
        )
    if "prompt" not in cols and "messages" not in cols:
        if len(cols) != 1:
            raise ValueError(f"the input needs a 'prompt' or 'messages' column; it has {cols}")
        model_input = model_input.rename(columns={cols[0]: "prompt"})
    if not 0 < len(model_input) <= MAX_PROMPTS:
        raise ValueError(f"give 1 to {MAX_PROMPTS} prompts, not {len(model_input)}")
    out: list[Request] = []
    for row in model_input.to_dict("records"):
        msgs, prompt = row.get("messages"), row.get("prompt")
        if hasattr(msgs, "tolist"):
            msgs = msgs.tolist()
        if hasattr(prompt, "tolist"):
            prompt = prompt.tolist()
        if isinstance(msgs, list) and msgs:
            # one conversation, or (MLflow's dict input: one row) a list of them
            convs = (
                msgs
                if all(isinstance(m, list | tuple) or hasattr(m, "tolist") for m in msgs)
                else [msgs]
            )
            out += [_messages(c) for c in convs]
        elif isinstance(prompt, str):
            out.append(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            out += prompt  # {"prompt": [...]} reaches predict as one row holding the list
        else:
            raise ValueError("prompts must be strings")
    if len(out) > MAX_PROMPTS:
        raise ValueError(f"give 1 to {MAX_PROMPTS} prompts, not {len(out)}")
    return out


def prompts_of(model_input: Any) -> list[str]:
    """Plain prompts only (what a reward row or a model without a template needs)."""
    rows = requests_of(model_input)
    if not all(isinstance(r, str) for r in rows):
        raise ValueError("this model takes plain prompts, not messages")
    return rows  # type: ignore[return-value]


IGNORED_WARNINGS = ("Add type hints to the `predict` method", "An input example was not provided")
"""MLflow's advice that does not apply: type hints (they would become a second input schema;
the signature is given) and an input example (the signature says the shape)."""


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Drop IGNORED_WARNINGS raised inside the block and pass every other warning on. (A filter
    would not do: MLflow puts its own "once" filter in front of it.)"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if not any(text in str(w.message) for text in IGNORED_WARNINGS):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def kind_of(path: str | Path) -> str:
    """`bundle` (bundle.json), `reward` (a manifest with the reward normalisation) or `policy`."""
    import json

    path = Path(path)
    if (path / "bundle.json").exists():
        return "bundle"
    manifest = path / "lmpipe.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("normalization"):
        return "reward"
    return "policy"


with quiet_warnings():  # MLflow checks a PythonModel's predict when the class is defined

    class LmpipeModel(mlflow.pyfunc.PythonModel):
        """`predict(rows, params={max_tokens, temperature, top_k, top_p, seed})` → one completion
        per row (each prompt one user turn of the model's chat template, as `lmpipe generate`); for
        a reward model, `predict` of `prompt` and `response` columns → normalised scores."""

        def load_context(self, context: Any) -> None:
            path = Path(context.artifacts["model"])
            self.kind = kind_of(path)
            if self.kind != "bundle":
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # a served model's log is a file
            if self.kind == "bundle":
                from lmpipe.onnx.runtime import OnnxLM

                self.lm = OnnxLM(path)
            elif self.kind == "reward":
                from lmpipe.reward.model import RewardModel

                self.rm = RewardModel.load(path)
            else:
                from lmpipe.chat import load_template
                from lmpipe.model import load_model

                self.model, self.template = load_model(path), load_template(path)

        # no type hints: MLflow would read them as an input schema and warn that Any is not one
        def predict(self, context, model_input, params=None):
            if self.kind == "reward":
                return self._score(model_input)
            settings = {**PARAMS, **(params or {})}
            seed, temperature = int(settings["seed"]), float(settings["temperature"])
            max_tokens = int(settings["max_tokens"])
            rows = requests_of(model_input)
            if self.kind == "bundle":
                ids = [
                    self.lm.prompt_ids(r) if isinstance(r, str) else self.lm.chat_ids(r)
                    for r in rows
                ]
                out = self.lm.generate_ids(
                    ids,
                    max_new_tokens=max_tokens,
                    temperature=temperature,
                    top_k=int(settings["top_k"]),
                    top_p=float(settings["top_p"]),
                    seed=None if seed < 0 else seed,
                )
                return [self.lm.decode(t) for t in out.tokens]
            return self._generate_torch(rows, max_tokens, temperature, seed)

        def _generate_torch(
            self, rows: list[Request], max_tokens: int, temperature: float, seed: int
        ) -> list[str]:
            import torch

            from lmpipe.model import context_length
            from lmpipe.sampling import generate

            t = self.template
            ids = [
                t.prompt_ids(r)
                if isinstance(r, str)
                else t.encode(r, add_generation_prompt=True).ids
                for r in rows
            ]
            width, ctx = max(map(len, ids)), context_length(self.model)
            if width + max_tokens > ctx:
                raise ValueError(
                    f"prompt ({width} tokens) + max_tokens ({max_tokens}) exceeds the "
                    f"model's context of {ctx} tokens"
                )
            gen = torch.Generator().manual_seed(seed) if seed >= 0 else None
            with torch.no_grad():
                g = generate(
                    self.model,
                    ids,
                    max_new_tokens=max_tokens,
                    eos_id=t.stop_ids,
                    pad_id=t.pad_id,
                    temperature=max(temperature, 1e-6),
                    generator=gen,
                    greedy=temperature == 0,
                )
            return [
                t.decode(row[:n])
                for row, n in zip(g.response.tolist(), g.lengths.tolist(), strict=True)
            ]

        def _score(self, model_input: Any) -> list[float]:
            import pandas as pd

            df = pd.DataFrame(model_input) if isinstance(model_input, Mapping) else model_input
            if not hasattr(df, "columns") or not {"prompt", "response"} <= set(df.columns):
                raise ValueError("a reward model scores rows with 'prompt' and 'response' columns")
            if not 0 < len(df) <= MAX_PROMPTS:
                raise ValueError(f"give 1 to {MAX_PROMPTS} rows, not {len(df)}")
            prompts, responses = df["prompt"].tolist(), df["response"].tolist()
            if not all(isinstance(s, str) for s in prompts + responses):
                raise ValueError("prompts and responses must be strings")
            return [float(s) for s in self.rm.score_text(prompts, responses)]


def signature(kind: str, defaults: Mapping[str, Any]) -> Any:
    """Generators: optional `prompt` (string) and `messages` (role/content list) columns, text
    out, generation params with the model's defaults. Reward: `prompt`, `response` → score."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    if kind == "reward":
        return ModelSignature(
            inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
            outputs=Schema([ColSpec("double")]),
        )
    kinds = {
        "max_tokens": "long",
        "temperature": "double",
        "top_k": "long",
        "top_p": "double",
        "seed": "long",
    }
    message = Object([Property("role", "string"), Property("content", "string")])
    columns = [
        ColSpec("string", "prompt", required=False),
        ColSpec(Array(message), "messages", required=False),
    ]
    return ModelSignature(
        inputs=Schema(columns),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec(k, kinds[k], defaults[k]) for k in PARAMS]),
    )


def generation_defaults(gen: Mapping[str, Any]) -> dict[str, Any]:
    """PARAMS with a model's generation settings (bundle.json's `generation` names)."""
    names = (
        ("max_tokens", "max_new_tokens"),
        ("temperature", "temperature"),
        ("top_k", "top_k"),
        ("top_p", "top_p"),
    )
    return {**PARAMS, **{k: type(PARAMS[k])(gen[g]) for k, g in names if gen.get(g) is not None}}


REQUIREMENTS = {
    "bundle": ["onnxruntime", "tokenizers", "jinja2", "numpy", "pandas"],
    "policy": ["torch", "transformers", "safetensors", "tokenizers", "jinja2", "numpy", "pandas"],
}
REQUIREMENTS["reward"] = REQUIREMENTS["policy"]


def log_model(
    path: str | Path,
    name: str,
    kind: str,
    registered_model_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    generation: Mapping[str, Any] | None = None,
) -> Any:
    """Log the model at `path` (a bundle or a model folder) to the active run as a pyfunc model
    of `kind`, registered under `registered_model_name` when given; returns MLflow's ModelInfo."""
    if kind != kind_of(path):
        raise ValueError(f"{path} holds a {kind_of(path)} model, not a {kind} model")
    if kind == "bundle" and generation is None:
        from lmpipe.onnx.bundle import read_bundle

        generation = read_bundle(Path(path)).get("generation") or {}
    package = Path(__file__).resolve().parent
    with quiet_warnings():
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(package / "mlflow_pyfunc.py"),
            artifacts={"model": str(path)},
            code_paths=[str(package)],
            signature=signature(kind, generation_defaults(generation or {})),
            pip_requirements=REQUIREMENTS[kind],
            registered_model_name=registered_model_name,
            tags=dict(tags or {}),
        )
