"""The package's import graph: layers import downwards only, no cycles, no imports hidden in
functions except of optional heavy dependencies.

Read with ``ast`` from the source of ``looplm/**/*.py`` (nothing is imported). Importing
``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too, so a module also depends on the
packages above it. The order is written out in docs/architecture.md ("Layers").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "looplm"

# Lowest first. A module may import modules of its own tier or a lower one; the most specific
# prefix decides a module's tier (``looplm.train.command`` is a command, ``looplm.train.loop``
# training library).
TIERS: list[tuple[str, ...]] = [
    ("looplm", "looplm.errors", "looplm.argtypes"),
    ("looplm.ops", "looplm.data"),
    ("looplm.layers",),
    ("looplm.routers", "looplm.state", "looplm.flops", "looplm.model", "looplm.memory"),
    ("looplm.quant",),
    ("looplm.checkpoint", "looplm.generate", "looplm.perplexity", "looplm.chat", "looplm.draft_heads",
     "looplm.speculative"),
    ("looplm.hf", "looplm.pretrained", "looplm.train", "looplm.convert"),
    ("looplm.bench", "looplm.serve", "looplm.info", "looplm.generate_command", "looplm.import_command",
     "looplm.pull_command", "looplm.export_command", "looplm.chat_command", "looplm.train.command",
     "looplm.train.evaluate", "looplm.quantize_command", "looplm.linearize_command",
     "looplm.recursify_command", "looplm.train_draft_command"),
    ("looplm.cli", "looplm.__main__"),
]

# Third-party modules that may be imported inside a function: optional or slow to import, and
# needed only by the code path that uses them.
LAZY_ALLOWED = {
    "accelerate", "datasets", "fastapi", "gguf", "httpx", "jinja2", "llama_cpp", "matplotlib", "openai",
    "pyarrow", "tokenizers", "torch.profiler", "torch.utils.cpp_extension", "torch.utils.tensorboard",
    "tqdm", "transformers", "uvicorn", "uvloop",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The looplm module an imported name lives in (``looplm.layers.kv_cache`` for
    ``from looplm.layers import kv_cache``; a package for names defined in its ``__init__``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported name, line, at module level) of every import statement in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level: set[int] = set()
    for node in tree.body:  # module level, including under ``if`` / ``try`` at module level
        for sub in ast.walk(node):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                break
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                top_level.add(id(sub))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: ``from . import x`` is the package itself
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out += [(n, node.lineno, id(node) in top_level) for n in names]
    return out


def _tier(module: str) -> int:
    """The tier of the longest prefix in TIERS naming ``module`` (the bare package names only itself)."""
    matches = [(len(p), i) for i, prefixes in enumerate(TIERS) for p in prefixes
               if module == p or (module.startswith(p + ".") and p != "looplm")]
    assert matches, f"{module} has no tier: add it to TIERS here and to docs/architecture.md"
    return max(matches)[1]


def _graph() -> dict[str, set[str]]:
    """Module -> looplm modules it depends on (its imports and the packages above them)."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        deps = set()
        for name, _, _ in _imports(module):  # imports in functions too: a cycle all the same
            if name.split(".")[0] == "looplm":
                target = _resolve(name)
                while target and target != module:
                    deps.add(target)
                    target = target.rpartition(".")[0]
        parent = module.rpartition(".")[0]
        while parent:
            deps.add(parent)
            parent = parent.rpartition(".")[0]
        deps.discard(module)
        graph[module] = deps
    return graph


def test_every_module_has_a_tier() -> None:
    for module in MODULES:
        _tier(module)


def test_imports_point_downwards() -> None:
    wrong = []
    for module in MODULES:
        for name, line, _ in _imports(module):
            if name.split(".")[0] != "looplm":
                continue
            target = _resolve(name)
            if _tier(target) > _tier(module):
                wrong.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line} imports {target}")
    assert not wrong, "lower layers import upper ones:\n" + "\n".join(dict.fromkeys(wrong))


def test_no_import_cycles() -> None:
    graph = _graph()
    done: set[str] = set()
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        if m in stack:
            return stack[stack.index(m):] + [m]
        if m in done:
            return None
        stack.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + "."):  # a package importing its own submodules is not a cycle
                continue
            if (cycle := visit(d)) is not None:
                return cycle
        stack.pop()
        done.add(m)
        return None

    for m in sorted(graph):
        cycle = visit(m)
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_level_imports_only_of_optional_dependencies() -> None:
    hidden = []
    for module in MODULES:
        for name, line, top in _imports(module):
            if top:
                continue
            if not any(name == a or name.startswith(a + ".") for a in LAZY_ALLOWED):
                hidden.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line} imports {name}")
    assert not hidden, ("imports inside functions (move them to the top of the module; add an optional "
                        "heavy dependency to LAZY_ALLOWED):\n" + "\n".join(dict.fromkeys(hidden)))


@pytest.mark.parametrize("source, expect", [
    ("import os\ndef f():\n    import json\n", [("os", True), ("json", False)]),
    ("try:\n    import yaml\nexcept ImportError:\n    pass\n", [("yaml", True)]),
    ("class A:\n    def f(self):\n        from looplm import model\n", [("looplm.model", False)]),
])
def test_import_reader(source: str, expect: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader tells module-level imports from hidden ones (so the checks above can fail)."""
    monkeypatch.setitem(MODULES, "looplm.probe", tmp_path / "probe.py")
    (tmp_path / "probe.py").write_text(source)
    assert [(n, top) for n, _, top in _imports("looplm.probe")] == expect
