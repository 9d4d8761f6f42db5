"""Imports flow one way: every lmpipe module belongs to a layer and imports only its own layer
or lower ones, libraries never import each other, stage scripts never import each other, and no
modules import each other in a cycle. Imports inside functions count as much as those at the top.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"
STAGES = ROOT / "stages"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "basics",
        (
            "lmpipe.allocator",
            "lmpipe.base",
            "lmpipe.baselines",
            "lmpipe.batches",
            "lmpipe.chat",
            "lmpipe.checkpoints",
            "lmpipe.config",
            "lmpipe.data",
            "lmpipe.dist",
            "lmpipe.gold",
            "lmpipe.io",
            "lmpipe.logprobs",
            "lmpipe.losses",
            "lmpipe.model",
            "lmpipe.optim",
            "lmpipe.pipeline",
            "lmpipe.precision",
            "lmpipe.progress",
            "lmpipe.sampling",
            "lmpipe.scoring",
            "lmpipe.shard",
            "lmpipe.stats",
            "lmpipe.streams",
        ),
    ),
    ("training", ("lmpipe.train", "lmpipe.tracking")),
    (
        "libraries",
        (
            "lmpipe.pretrain",
            "lmpipe.sft",
            "lmpipe.reward",
            "lmpipe.rl",
            "lmpipe.compress",
            "lmpipe.onnx",
        ),
    ),
    ("evaluation", ("lmpipe.evaluate",)),
    (
        "apps",
        (
            "lmpipe.cli",
            "lmpipe.compare",
            "lmpipe.mlflow_model",
            "lmpipe.mlflow_pyfunc",
            "lmpipe.profiles",
            "lmpipe.serve",
            "lmpipe.stage",
            "lmpipe.sweep",
        ),
    ),
]
"""Bottom first. A prefix covers the module of that name and, for a package, every module in it.
The package's own `lmpipe/__init__.py` sits in the bottom layer (it only quiets loggers)."""

LIBRARIES = "libraries"
"""The layer whose prefixes are separate libraries: each imports basics and training only."""


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, the prefix that covers `module`), or None when no layer declares it."""
    if module == "lmpipe":
        return 0, "lmpipe"
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return index, prefix
    return None


@dataclass(frozen=True)
class Import:
    path: Path  # the importing file
    line: int
    source: str  # the statement as written
    target: str  # the module imported


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, src: Path) -> bool:
    base = src / Path(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports(path: Path, src: Path = SRC) -> Iterator[Import]:
    """Every lmpipe module `path` imports, at the top or inside functions: `import a.b`,
    `from a import b` (b a module, else a), relative imports resolved against the file's
    package (files under `src`)."""
    text = path.read_text()
    package = module_name(path, src).split(".") if path.is_relative_to(src) else []
    if package and path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [
                f"{base}.{a.name}" if is_module(f"{base}.{a.name}", src) else base
                for a in node.names
            ]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target == "lmpipe" or target.startswith("lmpipe."):
                source = ast.get_source_segment(text, node) or ""
                yield Import(path, node.lineno, " ".join(source.split()), target)


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def where(imp: Import) -> str:
    return f"{shown(imp.path)}:{imp.line}: `{imp.source}`"


def layer_errors(src: Path = SRC) -> list[str]:
    """What breaks the layering among the lmpipe modules under `src`, one message per import."""
    errors = []
    for path in sorted(src.joinpath("lmpipe").rglob("*.py")):
        module = module_name(path, src)
        own = layer_of(module)
        if own is None:
            errors.append(
                f"{shown(path)}: {module} is in no layer; declare it in tests/test_layers.py LAYERS"
            )
            continue
        for imp in imports(path, src):
            theirs = layer_of(imp.target)
            if theirs is None:
                errors.append(f"{where(imp)} imports {imp.target}, which is in no layer")
            elif theirs[0] > own[0]:
                errors.append(
                    f"{where(imp)}: {module} ({LAYERS[own[0]][0]}) imports {imp.target} "
                    f"({LAYERS[theirs[0]][0]}), a higher layer"
                )
            elif LAYERS[own[0]][0] == LIBRARIES == LAYERS[theirs[0]][0] and own[1] != theirs[1]:
                errors.append(
                    f"{where(imp)}: library {own[1]} imports library {theirs[1]}; a library "
                    "imports only basics and training (move what both need down)"
                )
    return errors


def stage_errors(stages: Path = STAGES, src: Path = SRC) -> list[str]:
    """What a stage script imports that it may not: another stage, or an undeclared module."""
    names = {p.stem for p in stages.glob("*.py")} | {"stages"}
    errors = []
    for path in sorted(stages.glob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                tops = ["." if node.level else (node.module or "").split(".")[0]]
            else:
                continue
            if any(top == "." or top in names for top in tops):
                source = ast.get_source_segment(text, node)
                errors.append(
                    f"{shown(path)}:{node.lineno}: `{source}`: a stage imports another "
                    "stage; move what they share into lmpipe"
                )
        for imp in imports(path, src):
            if layer_of(imp.target) is None:
                errors.append(f"{where(imp)} imports {imp.target}, which is in no layer")
    return errors


def find_cycle(src: Path = SRC) -> list[Import] | None:
    """One cycle of imports among the lmpipe modules under `src` (each edge the first
    statement that makes it), or None."""
    edges: dict[str, dict[str, Import]] = {}
    for path in sorted(src.joinpath("lmpipe").rglob("*.py")):
        module = module_name(path, src)
        for imp in imports(path, src):
            if imp.target != module:
                edges.setdefault(module, {}).setdefault(imp.target, imp)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[tuple[str, Import | None]] = []

    def visit(module: str, via: Import | None) -> list[Import] | None:
        state[module] = 1
        path.append((module, via))
        for target, imp in sorted(edges.get(module, {}).items()):
            if state.get(target) == 1:
                start = next(i for i, (m, _) in enumerate(path) if m == target)
                return [e for _, e in path[start + 1 :] if e is not None] + [imp]
            if target not in state and (found := visit(target, imp)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (found := visit(module, None)):
            return found
    return None


def test_every_module_is_in_a_layer_and_imports_only_its_layer_or_lower_ones():
    """A module of a higher layer imported by a lower one, a library importing another library,
    or a module no layer declares (a new module gets declared) fails with file, line and
    statement."""
    errors = layer_errors()
    assert not errors, "imports against the layering:\n" + "\n".join(errors)


def test_stage_scripts_import_lmpipe_only_never_each_other():
    errors = stage_errors()
    assert not errors, "\n".join(errors)


def test_no_import_cycles():
    cycle = find_cycle()
    assert cycle is None, "modules import each other in a cycle:\n" + "\n".join(
        where(imp) for imp in cycle
    )


def test_the_checks_catch_what_they_should(tmp_path):
    """On a made-up tree: relative and function-level imports are followed, and each check
    names the file, line and statement."""
    src, stages = tmp_path / "src", tmp_path / "stages"
    files = {
        "lmpipe/__init__.py": "",
        "lmpipe/model.py": "import lmpipe.train\n",
        "lmpipe/train.py": "",
        "lmpipe/nowhere.py": "",
        "lmpipe/rl/__init__.py": "",
        "lmpipe/rl/loop.py": "def f():\n    from ..compress import score\n",
        "lmpipe/compress/__init__.py": "",
        "lmpipe/compress/score.py": "from lmpipe.sampling import generate\n",
        "lmpipe/sampling.py": "def g():\n    from lmpipe.compress import score\n",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    stages.mkdir()
    (stages / "sft.py").write_text("from lmpipe import model\n")
    (stages / "rl.py").write_text("import lmpipe.rl.loop\n\n\ndef main():\n    from sft import x\n")

    errors = layer_errors(src)
    lines = {e.split(": ", 1)[0].removeprefix(str(src) + "/"): e for e in errors}
    assert set(lines) == {
        "lmpipe/model.py:1",
        "lmpipe/nowhere.py",
        "lmpipe/rl/loop.py:2",
        "lmpipe/sampling.py:2",
    }, errors
    assert (
        "`import lmpipe.train`: lmpipe.model (basics) imports lmpipe.train (training)"
        in (lines["lmpipe/model.py:1"])
    )
    assert (
        "`from ..compress import score`: library lmpipe.rl imports library lmpipe.compress"
        in (lines["lmpipe/rl/loop.py:2"])
    )
    assert "lmpipe.nowhere is in no layer" in lines["lmpipe/nowhere.py"]

    cycle = find_cycle(src)
    assert cycle is not None
    assert {where(i).removeprefix(str(src) + "/") for i in cycle} == {
        "lmpipe/compress/score.py:1: `from lmpipe.sampling import generate`",
        "lmpipe/sampling.py:2: `from lmpipe.compress import score`",
    }
    got = stage_errors(stages, src)
    assert len(got) == 1 and got[0].endswith(
        "rl.py:5: `from sft import x`: a stage imports another stage; move what they share "
        "into lmpipe"
    ), got


MAX_MODULE_LINES = 350
MAX_MAIN_STATEMENTS = 40


def test_library_modules_stay_small():
    """A module a newcomer can read in one sitting: split by concern beyond ~350 lines."""
    big = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_stage_mains_are_thin():
    """A stage's main() parses args, loads params, calls the library and writes outputs."""
    fat = {}
    for path in sorted(STAGES.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                count = sum(isinstance(n, ast.stmt) for n in ast.walk(node)) - 1
                if count > MAX_MAIN_STATEMENTS:
                    fat[path.name] = count
    assert not fat, f"main() over {MAX_MAIN_STATEMENTS} statements: {fat}"
