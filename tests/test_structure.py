"""The package's structure holds: one place per family, no import cycles, a torch-free analyser,
no two public things of one name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import firstlayer
from firstlayer.families import SUPPORTED_TYPES

PACKAGE = Path(firstlayer.__file__).parent
# Modules kept only so that old imports keep working, each name with a DeprecationWarning.
SHIMS = {"firstlayer.checkpoint"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The package's modules `name` imports anywhere in its source (inside functions too), by
    import statements, `importlib.import_module("...")` with a literal, and a package's listing
    of its own modules (`pkgutil.iter_modules(__path__)`)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            literal = node.args and isinstance(node.args[0], ast.Constant)
            if called.endswith("import_module") and literal:
                targets.add(node.args[0].value)
            if called.endswith("iter_modules") and "__path__" in ast.unparse(node):
                targets |= {m for m in MODULES if m.rpartition(".")[0] == name}
    return {t for t in targets if t in MODULES and t != name}


def test_no_import_cycles_counting_imports_inside_functions():
    graph = {name: imports_of(name) for name in MODULES}
    # A module's own package is imported before it whatever it says: not an edge of its own.
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


# The package's layers, bottom up (README, "Architecture"): a module imports only its own layer's
# and those below. The root package is the public API's facade and imports any of them, lazily.
LAYERS = (
    ("firstlayer.errors", "firstlayer.safetensors_io"),
    ("firstlayer.families",),
    ("firstlayer.analysis",),
    ("firstlayer.table",),
    ("firstlayer.folder",),
    ("firstlayer.hf",),
    ("firstlayer.conversion",),
    ("firstlayer.tools", "firstlayer.render"),
    ("firstlayer.vllm", "firstlayer.mlx", "firstlayer.llamacpp"),
    ("firstlayer.cli",),
)


def layer_of(name: str) -> int:
    return next(
        i for i, layer in enumerate(LAYERS) for p in layer if name.split(".")[:2] == p.split(".")
    )


def test_each_layer_imports_only_itself_and_the_layers_below():
    upward = [
        (name, target)
        for name in MODULES
        if name != "firstlayer" and name not in SHIMS
        for target in imports_of(name)
        if target != "firstlayer" and layer_of(target) > layer_of(name)
    ]
    assert not upward, upward


def test_a_model_type_is_named_in_at_most_two_source_files():
    sources = {name: path.read_text() for name, path in MODULES.items() if name not in SHIMS}
    named_in = {}
    for model_type in SUPPORTED_TYPES:
        # llama.cpp, the GGUF tool (its llama-server, its Python package llama-cpp-python, and
        # `make llama-cpp`), is not the model type.
        word = re.compile(rf"(?<![\w-]){re.escape(model_type)}(?![\w]|\.cpp|-cpp|-server)")
        named_in[model_type] = sorted(n for n, text in sources.items() if word.search(text))
    too_many = {t: files for t, files in named_in.items() if len(files) > 2}
    assert not too_many, too_many
    assert all(any(n.startswith("firstlayer.families.") for n in f) for f in named_in.values())


def public_definitions() -> dict[str, list[str]]:
    """Every public name a module defines (def, class, constant), by name."""
    defined = defaultdict(list)
    for name, path in MODULES.items():
        if name in SHIMS:
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for defined_name in names:
                if not defined_name.startswith("_"):
                    defined[defined_name].append(name)
    return defined


def test_no_two_public_things_share_a_name():
    # Each CLI subcommand is `add_<command>` and `run_<command>`; `register` is the vLLM
    # plugin's entry point, named in pyproject.toml.
    shared = {n: m for n, m in public_definitions().items() if len(m) > 1}
    assert not shared, shared


def test_the_analyser_and_the_family_list_import_neither_torch_nor_transformers():
    torch_free = [
        n
        for n in MODULES
        if n.startswith(("firstlayer.analysis", "firstlayer.families"))
        or n in ("firstlayer", "firstlayer.errors", "firstlayer.render.text", "firstlayer.table")
        or n == "firstlayer.table.layout"
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {torch_free!r}:\n"
        "    importlib.import_module(name)\n"
        "from firstlayer.cli import main\n"
        "assert main(['analyze', 'paper', '--accounting', 'exact']) == 0\n"
        "assert main(['families']) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_public_api_resolves():
    for name in firstlayer.__all__:
        assert getattr(firstlayer, name) is not None, name
