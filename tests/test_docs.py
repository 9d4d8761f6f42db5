"""The manual and the reference pages: their links resolve and their commands exist as written.

Commands are read from the ```bash blocks of README.md and docs/*.md and checked without running
the expensive ones: `lmpipe` subcommands and their flags against the CLI, `dvc exp run -S k=v`
against the params schema, `make` targets against the Makefile, `python bench/x.py --flag`
against the script's own arguments, and every file a command names.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from lmpipe.cli import app
from lmpipe.config import validate_doc

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMIT_ID = re.compile(r"(?<![\w/#.-])(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w-])")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def bash_commands(page: Path) -> list[tuple[int, list[str]]]:
    """(line, argv) of each command in the page's ```bash blocks, continuations joined."""
    out, block, start, pending = [], False, 0, ""
    for no, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh") if not block else False
            continue
        if not block:
            continue
        text = pending + " " + line.strip() if pending else line
        start = start if pending else no
        if text.endswith("\\"):
            pending = text[:-1].rstrip()
            continue
        pending = ""
        lex = shlex.shlex(text, posix=True, punctuation_chars=True)
        argv: list[str] = []
        for token in [*lex, ";"]:
            if token in ("&&", "||", ";", "|", "&", ">", "2>&1"):
                if argv:
                    out.append((start, argv))
                argv = []
            else:
                argv.append(token)
    return out


def all_commands() -> list[tuple[str, list[str]]]:
    return [(f"{p.name}:{no}", argv) for p in PAGES for no, argv in bash_commands(p)]


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_is_a_manual():
    size = (ROOT / "README.md").stat().st_size
    assert size < 16_000, f"README.md is {size} bytes: reference belongs in docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_commit_ids_or_history(page):
    text = page.read_text(encoding="utf-8")
    ids = [m.group() for m in COMMIT_ID.finditer(text)]
    assert not ids, f"{page.name} names commits {ids[:5]}: history belongs in git log"
    assert "measured-figures" not in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and dest.suffix == ".md":
            slugs = {slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)}
            assert anchor in slugs, f"{page.name} links to {target}: no such heading"


def cli_command(argv: list[str]):
    cmd = typer.main.get_command(app)
    for word in argv:
        if not hasattr(cmd, "commands") or word.startswith("-"):
            break
        assert word in cmd.commands, f"lmpipe has no command {word!r} (has {sorted(cmd.commands)})"
        cmd = cmd.commands[word]
    return cmd


def set_dotted(doc: dict, key: str, value: str) -> None:
    *path, last = key.split(".")
    node = doc
    for p in path:
        node = node.setdefault(p, {})
    node[last] = yaml.safe_load(value)


def test_commands_exist_as_written():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    makefile = (ROOT / "Makefile").read_text()
    checked = 0
    for where, argv in all_commands():
        while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value prefixes
            argv = argv[1:]
        if not argv:
            continue
        tool, args = argv[0], argv[1:]
        if tool == "lmpipe":
            cmd = cli_command(args)
            flags = {o for p in cmd.params for o in [*p.opts, *p.secondary_opts]} | {"--help"}
            for a in args:
                if a.startswith("--"):
                    assert a.split("=")[0] in flags, f"{where}: lmpipe {args[0]} has no {a}"
            for a in args:
                if a.startswith("params/"):
                    assert (ROOT / a).exists(), f"{where}: {a} does not exist"
        elif tool == "make":
            for target in (a for a in args if "=" not in a and not a.startswith("-")):
                found = re.search(rf"^{re.escape(target)}:", makefile, re.M)
                assert found, f"{where}: the Makefile has no target {target}"
        elif tool == "dvc" and args[:2] == ["exp", "run"]:
            for i, a in enumerate(args):
                if a == "-S":
                    key, value = args[i + 1].split("=", 1)
                    doc = copy.deepcopy(params)
                    set_dotted(doc, key, value)
                    validate_doc(doc, [])  # raises ParamsError on an unknown key or bad value
        elif tool == "python" and args and args[0].startswith("bench/"):
            script = ROOT / args[0]
            assert script.exists(), f"{where}: {args[0]} does not exist"
            source = script.read_text()
            for a in args[1:]:
                if a.startswith("--"):
                    assert f'"{a.split("=")[0]}"' in source, f"{where}: {args[0]} has no {a}"
        else:
            continue
        checked += 1
    assert checked >= 20, f"only {checked} commands found: is the parser still reading the pages?"


NOT_CODE = {
    "lmpipe.json",
    "lmpipe.params.sha256",
    "lmpipe.pipeline.key",
    "lmpipe.output",
    "lmpipe.reused",
}
"""Names in the pages that look like code but are a file and MLflow tags."""


def resolves(dotted: str) -> bool:
    """`lmpipe.a.b.name`: a module, or an attribute of the longest importable module prefix."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_the_pages_name_exists(page):
    """Every `src/…`, `tests/…`, `bench/…` path and every `lmpipe.x.y` name a page cites exists."""
    text = page.read_text(encoding="utf-8")
    for path in set(re.findall(r"`((?:src|tests|bench|stages|params|sweeps)/[\w/.-]+)`", text)):
        assert (ROOT / path).exists(), f"{page.name} cites {path}, which does not exist"
    for dotted in set(re.findall(r"`(lmpipe(?:\.\w+)+)", text)) - NOT_CODE:
        assert resolves(dotted), f"{page.name} cites {dotted}, which does not exist"
    for module, names in re.findall(r"^from (lmpipe[\w.]*) import ([\w, ]+)$", text, re.M):
        for name in names.split(","):
            dotted = f"{module}.{name.strip()}"
            assert resolves(dotted), f"{page.name} imports {dotted}, which does not exist"
