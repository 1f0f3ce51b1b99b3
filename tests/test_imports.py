"""The package's imports point one way, and no module reaches into another's private names.

Every module of ``snsm`` has a place in :data:`ORDER` (lowest first); an
import, at the top of a module or inside a function, may only name a module
that comes earlier. ``from .x import _name`` and ``x._name`` of another
module are refused: what two modules share is public in the lower one.
"""
import ast
import pathlib

import pytest

from conftest import ROOT

PACKAGE = ROOT / "src" / "snsm"

#: the layers, lowest first; a module may import only modules listed before it
ORDER = [
    # 1 shared rules
    "snsm.weight_decay",
    "snsm.rounding",
    "snsm.subset_norm",
    "snsm._common",
    "snsm._kernels.triton_sn",
    "snsm._kernels",
    "snsm.subspace",
    "snsm._dtensor",
    # 2 paths
    "snsm._reference",
    "snsm.foreach",
    "snsm.fused",
    "snsm.distributed",
    "snsm.paths",
    # 3 shell
    "snsm.in_backward",
    "snsm._base",
    "snsm.optimizer",
    # 4 variants and friends
    "snsm.variants",
    "snsm.norm",
    "snsm.adago",
    "snsm.loft",
    "snsm.metastorm",
    "snsm.grouping",
    "snsm.batch_size",
    "snsm",
    # 5 integrations (imported only when used)
    "snsm.integrations",
    "snsm.integrations.transformers",
    # 6 application: I/O and checkpointing below train, launch above it, cli on top
    "snsm.bench",
    "snsm.bench.fileio",
    "snsm.bench.progress",
    "snsm.bench.checkpoint",
    "snsm.bench.corpus",
    "snsm.bench.tokenizer",
    "snsm.bench.model",
    "snsm.bench.presets",
    "snsm.bench.optimizers",
    "snsm.bench.textdata",
    "snsm.bench.finetune_data",
    "snsm.bench.train",
    "snsm.bench.report",
    "snsm.bench.launch",
    "snsm.bench.speed",
    "snsm.bench.theory",
    "snsm.bench.family",
    "snsm.bench.memory",
    "snsm.bench.dist_speed",
    "snsm.bench.finetune",
    "snsm.bench.cli",
    "snsm.bench.__main__",
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(module: str):
    """``(line, imported module, imported name or None)`` for every import of a snsm module in ``module``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "snsm" or alias.name.startswith("snsm."):
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target != "snsm" and not target.startswith("snsm."):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # a submodule imported by name
                    yield node.lineno, sub, None
                else:
                    yield node.lineno, target, alias.name


def _module_aliases(module: str) -> dict:
    """Local names bound to snsm modules in ``module`` (``from . import subspace as sm`` -> ``sm``)."""
    tree = ast.parse(MODULES[module].read_text())
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    names[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("snsm") and alias.asname:
                    names[alias.asname] = alias.name
    return names


def test_every_module_has_a_place_in_the_layers():
    missing = sorted(set(MODULES) - set(ORDER))
    assert not missing, f"modules without a place in ORDER (add them to their layer): {missing}"


def _upward(module: str) -> list:
    rank = ORDER.index(module)
    found = []
    for line, target, _ in _edges(module):
        if target != module and (target not in ORDER or ORDER.index(target) >= rank):
            found.append(f"{MODULES[module].name}:{line} imports {target}")
    return found


def _private(module: str) -> list:
    found = []
    for line, target, name in _edges(module):
        if name and name.startswith("_") and not name.startswith("__") and target != module:
            found.append(f"{MODULES[module].name}:{line} imports {target}.{name}")
    aliases = _module_aliases(module)
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{MODULES[module].name}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    assert module in ORDER, f"{module} has no place in ORDER"
    upward = _upward(module)
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_from_other_modules(module):
    private = _private(module)
    assert not private, "private names of other modules:\n" + "\n".join(private)


def test_the_checks_see_an_upward_and_a_private_import(tmp_path, monkeypatch):
    """The checks above fail on the kind of import they exist to refuse."""
    bad = tmp_path / "weight_decay.py"
    bad.write_text("from .optimizer import _group_key\nfrom . import subspace as sm\nx = sm._usable\n")
    monkeypatch.setitem(MODULES, "snsm.weight_decay", bad)
    assert _upward("snsm.weight_decay") == ["weight_decay.py:1 imports snsm.optimizer",
                                            "weight_decay.py:2 imports snsm.subspace"]
    assert _private("snsm.weight_decay") == ["weight_decay.py:1 imports snsm.optimizer._group_key",
                                             "weight_decay.py:3 reads snsm.subspace._usable"]
