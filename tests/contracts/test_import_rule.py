"""The import rule of DESIGN.md, read from every module's imports: stages on top, libraries below,
imports flowing one way. A new arrow the rule forbids fails here, naming the file and the import.

Rule, by layer (a module may import its own layer, the layers listed, and the package root
``ssl_path``, which holds only the version):

- ``ssl_path.core`` imports nothing of the project;
- ``ssl_path.data``, ``ssl_path.encoder``, ``ssl_path.evaluation`` import ``core``;
- ``ssl_path.tiling`` imports ``data`` and ``core``;
- ``ssl_path.training`` (the loop and the task contract) imports ``encoder`` (checkpoints) and ``core``,
  never ``methods``: the loop does not know which method or head it runs;
- ``ssl_path.methods`` imports ``training`` (the contract it implements, schedules), ``data.transforms``,
  ``encoder`` and ``core``;
- ``ssl_path.publish`` reads ``encoder``, ``evaluation``, ``data.manifest``, ``data.readers`` (dataset
  names of results), the methods' card facts, and ``core``;
- stages (``ssl_path/<stage>.py``, ``ssl_path/encoder/__main__.py``) import any library of ``ssl_path``;
- ``probes``, ``finetune`` and ``slurm`` import ``ssl_path``, never each other; nothing in
  ``ssl_path`` imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_PACKAGES = ("ssl_path", "probes", "finetune", "slurm")
PROJECT = (*TOP_PACKAGES, "model_cards")
STAGE = "stage"
ALLOWED: dict[str, tuple[str, ...]] = {
    "ssl_path.core": (),
    "ssl_path.data": ("ssl_path.core",),
    "ssl_path.encoder": ("ssl_path.core",),
    "ssl_path.evaluation": ("ssl_path.core",),
    "ssl_path.tiling": ("ssl_path.data", "ssl_path.core"),
    "ssl_path.training": ("ssl_path.encoder", "ssl_path.core"),
    "ssl_path.methods": ("ssl_path.training", "ssl_path.data.transforms", "ssl_path.encoder", "ssl_path.core"),
    "ssl_path.publish": (
        "ssl_path.encoder",
        "ssl_path.evaluation",
        "ssl_path.data.manifest",
        "ssl_path.data.readers",
        "ssl_path.methods",
        "ssl_path.core",
    ),
    STAGE: ("ssl_path",),
    "probes": ("ssl_path",),
    "finetune": ("ssl_path",),
    "slurm": ("ssl_path",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer a module of the project belongs to, as keyed in :data:`ALLOWED`."""
    parts = module.split(".")
    if parts[0] != "ssl_path":
        return parts[0]
    if len(parts) == 1:
        return "ssl_path"
    if module == "ssl_path.encoder.__main__" or (len(parts) == 2 and (REPO / "ssl_path" / f"{parts[1]}.py").is_file()):
        return STAGE
    return ".".join(parts[:2])


def imported_modules(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import of the project in ``source``, function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            # ``from pkg import sub`` may import a submodule: count it as ``pkg.sub``.
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in PROJECT]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden_imports(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` that the rule forbids, as ``"line: target"``."""
    layer = layer_of(module)
    allowed = (layer, *ALLOWED.get(layer, ()))
    bad = []
    for line, target in imported_modules(module, source, is_package):
        if target == "ssl_path" or target.startswith("ssl_path.__"):
            continue  # the package root: its version
        if not any(_within(target, prefix) for prefix in allowed) and not _within(target, "model_cards"):
            bad.append(f"{line}: {target}")
    return bad


def project_modules() -> list[Path]:
    return sorted(p for package in TOP_PACKAGES for p in (REPO / package).rglob("*.py"))


def test_every_module_of_the_project_follows_the_import_rule():
    modules = project_modules()
    assert len(modules) > 60  # the walk found the tree
    violations = {
        str(path.relative_to(REPO)): bad
        for path in modules
        if (bad := forbidden_imports(module_name(path), path.read_text(), path.name == "__init__.py"))
    }
    assert not violations, violations


def test_every_library_layer_is_named_by_the_rule():
    layers = {layer_of(module_name(p)) for p in project_modules()}
    assert layers <= {*ALLOWED, "ssl_path"}, layers - {*ALLOWED, "ssl_path"}


@pytest.mark.parametrize(
    "module,source",
    [
        ("ssl_path.training.loop", "from ssl_path.methods import methods"),
        ("ssl_path.training.loop", "def f():\n    from ssl_path.data.loader import shard_loader"),
        ("ssl_path.core.io", "import ssl_path.encoder"),
        ("ssl_path.publish.export", "from probes.features import encoder_hash"),
        ("ssl_path.evaluation.results", "from ssl_path.encoder import load"),
        ("probes.knn", "from finetune.task import HeadTask"),
        ("finetune.segment", "import probes.knn"),
        ("ssl_path.methods.dinov2", "from ssl_path.data.loader import shard_loader"),
        ("ssl_path.encoder.refs", "from . import checkpoint\nfrom ..tiling import slides"),
    ],
)
def test_a_forbidden_arrow_is_caught(module, source):
    assert forbidden_imports(module, source)


@pytest.mark.parametrize(
    "module,source",
    [
        ("ssl_path.methods.dinov2", "from ssl_path.training.task import TrainingTask"),
        ("ssl_path.pretrain", "from ssl_path.methods import methods"),
        ("ssl_path.encoder.refs", "from . import checkpoint"),
        ("probes.knn", "from ssl_path.evaluation.metrics import SCORES"),
        ("ssl_path.evaluation.results", "import ssl_path"),
    ],
)
def test_an_allowed_arrow_passes(module, source):
    assert forbidden_imports(module, source) == []
