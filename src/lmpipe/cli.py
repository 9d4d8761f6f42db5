"""`lmpipe`: generate from and serve an ONNX bundle, compare MLflow runs, sweep params (torch
never imported)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

Bundle = Annotated[Path, typer.Argument(help="bundle folder, e.g. models/onnx/rl")]


class Precision(StrEnum):
    fp32 = "fp32"
    int8 = "int8"
    fp16 = "fp16"


PrecisionOpt = Annotated[
    Precision,
    typer.Option(help="model file: fp32, int8 (model.int8.onnx), fp16 (for CUDA)"),
]


@contextmanager
def _user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Errors the user can fix end the command with their message and exit code 2."""
    try:
        yield
    except kinds as err:
        typer.echo(f"lmpipe: error: {err}", err=True)
        raise typer.Exit(2) from None


def _load(bundle: Path, precision: Precision):
    from lmpipe.chat import TemplateError
    from lmpipe.onnx.bundle import BundleError
    from lmpipe.onnx.runtime import OnnxLM

    with _user_errors(BundleError, TemplateError):
        lm = OnnxLM(bundle, precision=precision.value)
        _ = lm.stop_ids  # reads the chat template: a broken one fails here, not mid-request
        return lm


@app.command()
def generate(
    bundle: Bundle,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt text (repeatable)")],
    max_tokens: Annotated[int, typer.Option(min=1)] = 48,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="0: greedy; tiny values sample the argmax")
    ] = 1.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    top_p: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="0: the most likely token only (greedy)")
    ] = 1.0,
    seed: int | None = None,
    precision: PrecisionOpt = Precision.fp32,
) -> None:
    """Complete each prompt (one user turn of the bundle's chat template) and print one
    completion per line."""
    lm = _load(bundle, precision)
    for p in prompt:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            typer.echo(f"lmpipe: error: prompt {p!r} is not valid UTF-8 text", err=True)
            raise typer.Exit(2) from None
    ids = [lm.prompt_ids(p) for p in prompt]
    with _user_errors(ValueError):
        out = lm.generate_ids(
            ids,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
    for toks in out.tokens:
        sys.stdout.write(lm.decode(toks).replace("\n", " ") + "\n")


@app.command()
def serve(
    bundle: Bundle,
    host: Annotated[str, typer.Option(help="bind address (loopback unless told otherwise)")] = (
        "127.0.0.1"
    ),
    port: int = 8000,
    precision: PrecisionOpt = Precision.fp32,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LMPIPE_API_KEY",
            show_default=False,
            help="require `Authorization: Bearer KEY` on every endpoint but /health",
        ),
    ] = None,
    docs: Annotated[
        bool, typer.Option("--docs/--no-docs", help="serve /docs, /redoc and /openapi.json")
    ] = False,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="largest max_tokens a request may ask (chat's default)")
    ] = 256,
    max_n: Annotated[int, typer.Option(min=1, help="largest n a request may ask")] = 8,
    max_prompts: Annotated[
        int, typer.Option(min=1, help="prompts in one completions request")
    ] = 16,
    queue_limit: Annotated[
        int, typer.Option(min=1, help="running + waiting requests before 429")
    ] = 32,
    max_batch: Annotated[
        int, typer.Option(min=1, help="rows (prompts × n) of waiting requests run as one batch")
    ] = 32,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, help="largest request body (413 beyond)")
    ] = 1 << 20,
    max_prompt_chars: Annotated[
        int, typer.Option(min=1, help="prompt or message characters per request, before tokenizing")
    ] = 32_768,
    max_request_tokens: Annotated[
        int, typer.Option(min=1, help="tokens per request: n × (prompt + max_tokens) over prompts")
    ] = 32_768,
) -> None:
    """OpenAI-style HTTP server: POST /v1/completions and /v1/chat/completions, GET /v1/models,
    GET /health (docs/serving.md)."""
    from lmpipe.chat import TemplateError
    from lmpipe.serve.engine import Completer
    from lmpipe.serve.limits import ServerLimits
    from lmpipe.serve.main import run

    _load(bundle, precision)  # a clear error for a bad folder before the server starts
    limits = ServerLimits(
        max_tokens=max_tokens,
        max_n=max_n,
        max_prompts=max_prompts,
        queue_limit=queue_limit,
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        max_prompt_chars=max_prompt_chars,
        max_request_tokens=max_request_tokens,
    )
    with _user_errors(TemplateError):
        completer = Completer(bundle, precision.value, limits=limits)
    run(
        completer,
        host,
        port,
        api_key=api_key,
        docs=docs,
        warn=lambda m: typer.echo(f"lmpipe: warning: {m}", err=True),
    )


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    markdown = "markdown"


@app.command()
def compare(
    stage: Annotated[
        str | None,
        typer.Option(
            help="runs of this stage, e.g. rl (default: pipeline results, i.e. evaluate runs with "
            "the params of the runs upstream of them)"
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            help="MLflow experiment (default: tracking.experiment of ./params.yaml, else lmpipe)"
        ),
    ] = None,
    last: Annotated[int, typer.Option(min=1, help="the newest N runs")] = 10,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="output format")] = (
        OutputFormat.table
    ),
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow store (default: MLFLOW_TRACKING_URI, else tracking.uri of ./params.yaml, "
            "else sqlite:///mlflow.db; a relative sqlite path is taken from the current folder)"
        ),
    ] = None,
    all_params: Annotated[
        bool, typer.Option("--all-params", help="show every param, not only those that differ")
    ] = False,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            metavar="KEY",
            help="metric to show instead of the stage's headline ones (repeatable; "
            "`report/` may be left out; a reports/headline.json name such as rl_gold works too)",
        ),
    ] = None,
) -> None:
    """Compare runs recorded in MLflow: the params that differ and the headline metrics.

    Without --stage, one row per pipeline result (an evaluate run) with every upstream stage's
    params and the figures of reports/headline.json."""
    from lmpipe.compare import CompareError, compare_runs

    keys = [k.strip() for m in metric or [] for k in m.split(",") if k.strip()]
    with _user_errors(CompareError):
        text, warnings = compare_runs(
            stage, experiment, last, fmt.value, tracking_uri, all_params, keys
        )
    for line in warnings:
        typer.echo(f"lmpipe: warning: {line}", err=True)
    sys.stdout.write(text + "\n")


@app.command()
def sweep(
    spec: Annotated[Path, typer.Argument(help="sweep spec, e.g. sweeps/kl.yaml")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="validate the spec and print the plan; run nothing")
    ] = False,
    trials: Annotated[
        int | None, typer.Option(min=1, help="override the spec's number of trials")
    ] = None,
) -> None:
    """Search params with DVC experiments (grid, random or TPE); resumes where it stopped."""
    from lmpipe.sweep import SweepError, load_spec, sweep_dir
    from lmpipe.sweep import sweep as run

    root = Path.cwd()
    with _user_errors(SweepError):
        plan = load_spec(spec, root)
        if trials is not None:
            plan = plan.with_trials(trials)
        for line in plan.describe():
            typer.echo(line)
        if dry_run:
            return
        files = run(plan, root, echo=typer.echo)
    typer.echo((sweep_dir(root, plan) / "summary.md").read_text())
    typer.echo("files: " + ", ".join(str(p.relative_to(root)) for p in files.values()))


params_app = typer.Typer(no_args_is_help=True, help="Apply a params profile (params/*.yaml).")
app.add_typer(params_app, name="params")

Profile = Annotated[Path, typer.Argument(help="profile, e.g. params/gpu-125m.yaml")]
ParamsFile = Annotated[Path, typer.Option("--params", help="the params file it applies to")]
PARAMS = Path("params.yaml")


def _profile(action: str, profile: Path, params_file: Path) -> list[str]:
    """`lmpipe.profiles.<action>(profile, params_file)`; a params error ends the command."""
    from lmpipe import profiles
    from lmpipe.config import ParamsError

    with _user_errors(ParamsError):
        return getattr(profiles, action)(profile, params_file)


@params_app.command("apply")
def params_apply(profile: Profile, params_file: ParamsFile = PARAMS) -> None:
    """Write a profile's values into params.yaml (comments kept; validated first)."""
    changed = _profile("apply", profile, params_file)
    typer.echo(
        f"{params_file}: {len(changed)} value(s) changed"
        + (": " if changed else "")
        + ", ".join(changed)
    )


@params_app.command("flags")
def params_flags(profile: Profile, params_file: ParamsFile = PARAMS) -> None:
    """Print `-S key=value` flags: dvc exp run $(lmpipe params flags params/gpu-125m.yaml)."""
    sys.stdout.write(" ".join(_profile("dvc_flags", profile, params_file)) + "\n")


@app.command("prune-checkpoints")
def prune_checkpoints(
    cache: Annotated[Path, typer.Option(help="the stages' checkpoint folder")] = Path(
        ".cache/checkpoints"
    ),
    models: Annotated[Path, typer.Option(help="the model outputs")] = Path("models"),
) -> None:
    """Remove the checkpoints of runs whose output is in place: after a killed run, DVC may
    check the stage's outputs out of its cache and never run it (make repro calls this)."""
    from lmpipe.stage import prune_checkpoints as prune

    removed = prune(cache, models)
    typer.echo(
        f"removed {len(removed)} checkpoint folder(s)" + "".join(f"\n  {d}" for d in removed)
    )


@app.command("relocate-mlflow")
def relocate_mlflow(
    uri: Annotated[
        str | None,
        typer.Option(help="tracking URI (default: MLFLOW_TRACKING_URI, else tracking.uri)"),
    ] = None,
    params_file: Annotated[Path, typer.Option("--params", help="params file")] = Path(
        "params.yaml"
    ),
) -> None:
    """Point the project's embedded MLflow store at this folder's artifacts after the project
    was copied, cloned with its store, or mounted elsewhere (every stage does this too; run it
    before `mlflow ui` or `mlflow.pyfunc.load_model` in a copy). A server store is left alone."""
    from lmpipe.config import ParamsError, TrackingParams, parse_section, read_yaml
    from lmpipe.tracking.store import relocate_store, resolve_uri

    with _user_errors(ParamsError):
        raw = read_yaml(params_file).get("tracking") if params_file.exists() else None
        cfg = parse_section("tracking", raw)
    assert isinstance(cfg, TrackingParams)
    resolved = resolve_uri(cfg, Path.cwd()) if uri is None else uri
    moved = relocate_store(resolved)
    typer.echo(
        f"{resolved}: artifact locations moved from {', '.join(moved)}"
        if moved
        else f"{resolved}: artifact locations already point here"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
