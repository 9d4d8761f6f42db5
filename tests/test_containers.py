"""The Dockerfile installs what pyproject.toml lists, and the serve image's set is enough to serve.

The images cannot be built here (no Docker engine); `make lint` runs hadolint on the Dockerfile,
and these tests hold the file to the one dependency list.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def run_commands(dockerfile: str) -> list[str]:
    """Every RUN instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    return [ln.strip()[4:] for ln in joined.splitlines() if ln.strip().startswith("RUN ")]


def pip_installs(dockerfile: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN instruction."""
    out = []
    for cmd in run_commands(dockerfile):
        for part in re.split(r"&&|;|\bthen\b", cmd):
            words = shlex.split(part.replace('"', ""))
            if words[:2] == ["pip", "install"]:
                out.append(words[2:])
    return out


def test_serve_extra_is_a_subset_of_the_dependencies_word_for_word():
    deps = set(PYPROJECT["project"]["dependencies"])
    serve = PYPROJECT["project"]["optional-dependencies"]["serve"]
    assert set(serve) <= deps, set(serve) - deps
    names = {Requirement(r).name for r in serve}
    assert "torch" not in names and {"onnxruntime", "tokenizers", "fastapi", "uvicorn"} <= names


def test_dockerfile_installs_only_from_pyproject_and_the_pinned_torch():
    installs = pip_installs(DOCKERFILE)
    assert installs, "no pip install found"
    torch_pin = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text())[1]
    arg = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE)[1]
    assert arg == torch_pin, "Dockerfile and Makefile pin different torch versions"
    torch_req = next(
        Requirement(r)
        for r in PYPROJECT["project"]["dependencies"]
        if Requirement(r).name == "torch"
    )
    assert Version(arg) in torch_req.specifier
    for args in installs:
        packages = [a for a in args if not a.startswith("-") and a not in ("-r",)]
        flags_with_values = {"--index-url", "-r"}
        skip = {args[i + 1] for i, a in enumerate(args[:-1]) if a in flags_with_values}
        for pkg in packages:
            if pkg in skip:
                continue
            assert pkg.startswith("/build") or pkg == "torch==${TORCH_VERSION}", (
                f"the Dockerfile installs {pkg!r} by hand; add it to pyproject.toml instead"
            )
        for i, a in enumerate(args):
            if a == "-r":  # requirement files are written from pyproject.toml in the same RUN
                assert args[i + 1].startswith("/tmp/")
    assert "tomllib" in DOCKERFILE and "['serve']" in DOCKERFILE and "['gpu']" in DOCKERFILE


def test_build_context_is_what_the_images_copy():
    ignore = (ROOT / ".dockerignore").read_text().split()
    allowed = {p.removeprefix("!").rstrip("/") for p in ignore if p.startswith("!")}
    copied = set()
    for ln in DOCKERFILE.splitlines():
        if ln.startswith("COPY ") and "--from" not in ln:
            copied |= {w.rstrip("/") for w in ln.split()[1:-1] if not w.startswith("--")}
    assert "*" in ignore  # an allow-list: everything else stays out
    assert copied == allowed


def test_serve_runs_with_only_the_serve_extra_installed(bundle):
    """Import the server and generate from a bundle with every package outside the serve
    extra's dependency closure blocked — what the slim image has."""
    _, folder = bundle
    code = textwrap.dedent(f"""
        import importlib.metadata as md, sys
        from packaging.requirements import Requirement
        serve = {PYPROJECT["project"]["optional-dependencies"]["serve"]!r}
        keep, todo = set(), [Requirement(r) for r in serve]
        while todo:
            r = todo.pop()
            name = r.name.lower().replace("_", "-")
            if name in keep or (r.marker and not r.marker.evaluate({{"extra": ""}})):
                continue
            keep.add(name)
            todo += [Requirement(x) for x in (md.requires(r.name) or [])]
        owners = md.packages_distributions()
        blocked = {{mod for mod, dists in owners.items()
                   if not any(d.lower().replace("_", "-") in keep for d in dists)
                   and mod not in ("lmpipe", "_distutils_hack")}}
        assert "torch" in blocked and "onnxruntime" not in blocked

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in blocked:
                    raise ModuleNotFoundError(f"{{name}} is not in the serve image", name=name)
        sys.meta_path.insert(0, Block())
        from lmpipe.onnx.runtime import OnnxLM
        from lmpipe.serve.app import create_app
        from lmpipe.serve.engine import Completer
        import lmpipe.cli
        app = create_app(Completer({str(folder)!r}, "fp32"))
        lm = OnnxLM({str(folder)!r})
        out = lm.generate_ids([lm.prompt_ids("w7 w8")], max_new_tokens=4, seed=0)
        assert len(out.tokens[0]) >= 1
        assert "torch" not in sys.modules and "mlflow" not in sys.modules
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
