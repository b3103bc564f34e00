"""README cannot drift: its documented signatures and every CLI option are checked against the code."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import frogwatch
from frogwatch.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Public functions whose full signature README must give.
DOCUMENTED = [
    "analyze", "describe", "summary", "select", "prepare", "report", "compare",
    "plot_esd", "plot_alpha_depth", "plot_compare", "plot_randomized_esd",
]  # fmt: skip


def _code_spans(text: str) -> list[str]:
    """Inline code spans (they may wrap across lines), outside fenced blocks."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [" ".join(m.group(1).split()) for m in re.finditer(r"`([^`]+)`", text)]


def _as_signature(span: str, name: str) -> inspect.Signature | None:
    """``name(a, *, b=1) -> X`` as a Signature, or None if the span is a call, not a signature."""
    m = re.fullmatch(rf"(?:frogwatch\.)?{name}\((.*)\)(?:\s*->\s*[\w.\[\]| ]+)?", span)
    if not m:
        return None
    try:
        tree = ast.parse(f"def _f({m.group(1)}): pass")
    except SyntaxError:
        return None  # a call with expressions: plot_esd(df.iloc[i])
    ns: dict = {}
    exec(compile(tree, "<README>", "exec"), ns)
    return inspect.signature(ns["_f"])


def _strip(sig: inspect.Signature) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def _documented_signatures(name: str) -> list[inspect.Signature]:
    out = []
    for span in _code_spans(README):
        sig = _as_signature(span, name)
        if sig is not None and any(p.default is not p.empty or p.kind != p.POSITIONAL_OR_KEYWORD
                                   for p in sig.parameters.values()):  # fmt: skip
            out.append(sig)
    return out


@pytest.mark.parametrize("name", DOCUMENTED)
def test_readme_gives_the_full_signature(name):
    actual = inspect.signature(getattr(frogwatch, name))
    want = [(p.name, p.kind, p.default) for p in actual.parameters.values()]
    sigs = _documented_signatures(name)
    full = [s for s in sigs if _strip(s) == want]
    assert full, (
        f"README has no signature of {name} matching the code:\n  code:   {actual}\n  README: "
        + "\n          ".join(str(s) for s in sigs)
    )
    # every other signature-like mention uses real parameter names with the real defaults
    real = {p.name: p for p in actual.parameters.values()}
    if name == "prepare":  # prepare(model, masks, config=None, **kwargs): kwargs are FrogConfig fields
        real.update(inspect.signature(frogwatch.FrogConfig).parameters)
    for s in sigs:
        for p in s.parameters.values():
            assert p.name in real, f"README's {name}{s} names {p.name!r}, which {name} does not take"
            if p.default is not p.empty:
                assert p.default == real[p.name].default, f"README's {name}: {p.name}={p.default!r}"


def _command_line_section() -> str:
    start = README.index("## Command line")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def _synopses() -> dict[str, str]:
    block = re.search(r"```bash\n(.*?)```", _command_line_section(), flags=re.S).group(1)
    block = block.replace("\\\n", " ")
    return {line.split()[1]: line for line in block.splitlines() if line.startswith("frogwatch ")}


def _subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


def test_every_command_has_a_synopsis():
    assert set(_synopses()) == set(_subparsers())


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_synopsis_lists_exactly_the_options_of_the_code(command):
    sub = _subparsers()[command]
    line = _synopses()[command]
    documented = set(re.findall(r"(--[a-z][a-zA-Z-]*)", line))
    options = {o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    assert documented == options, f"{command}: README {sorted(documented)} vs code {sorted(options)}"
    for a in sub._actions:  # README's a|b|c lists are the code's choices
        if a.choices and a.option_strings:
            m = re.search(rf"{a.option_strings[-1]} ([\w-]+(?:\|[\w-]+)+)", line)
            if m:
                assert set(m.group(1).split("|")) == set(map(str, a.choices)), (command, a.option_strings)
    positionals = [a.metavar or a.dest for a in sub._actions if not a.option_strings and a.dest != "help"]
    for p in positionals:
        assert p.upper() in line, f"{command}: positional {p} missing from README's synopsis"


def test_every_option_named_in_the_section_exists():
    names = set()
    for sub in _subparsers().values():
        names |= {o for a in sub._actions for o in a.option_strings}
    section = _command_line_section()
    for opt in set(re.findall(r"(?<![\w-])(--[a-z][a-zA-Z-]*)", section)):
        assert opt in names, f"README's command line section names {opt}, which no command takes"


def test_readme_cli_help_agrees(capsys):
    """Defaults README states in prose are the parser's."""
    sub = _subparsers()
    defaults = {a.dest: a.default for a in sub["report"]._actions}
    assert defaults["out"] == inspect.signature(frogwatch.report).parameters["out_dir"].default
