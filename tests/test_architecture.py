"""The layout's rules, read from the source: stages meet only at files (`footprints.contracts`).

- no import cycle among the modules of `footprints` and `pipelines` (imports inside functions count);
- a stage (`footprints.stages.*`) never imports another stage, nor the runner, the CLI or a benchmark;
- the contracts import no stage, and no shared module imports a stage (only the runner, the CLI and the
  benchmarks may);
- no import from a lower layer to a higher one (`LAYERS`), every package in a layer;
- at most 25 modules and packages at the top of `footprints/`;
- no module is longer than 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("footprints", "pipelines")
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (at module level or inside functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                # `from pkg import mod` imports the submodule when there is one
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in names:
                while target and target not in modules:  # `footprints.x.y` of a function -> module `footprints.x`
                    target = target.rpartition(".")[0]
                if target and target != name and target.split(".")[0] in PACKAGES:
                    targets.add(target)
        graph[name] = targets
    return graph


def _is_stage(module: str) -> bool:
    return module.startswith("footprints.stages.")


def test_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is not a cycle of meaning
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_stages_never_import_each_other_and_shared_code_never_imports_a_stage() -> None:
    graph = import_graph()
    stages = [m for m in graph if _is_stage(m)]
    assert len(stages) == 8, stages  # one module per stage the user types
    orchestrators = ("footprints.runner", "footprints.cli", "footprints.benchmarks")
    bad = []
    for module, targets in graph.items():
        for target in targets:
            if _is_stage(module) and (_is_stage(target) or target.startswith(orchestrators)):
                bad.append(f"{module} -> {target}")
            elif _is_stage(target) and not module.startswith(orchestrators) and not _is_stage(module):
                bad.append(f"{module} -> {target}")
    assert not bad, "imports that break 'stages meet only at files':\n" + "\n".join(bad)


def test_contracts_depend_on_no_stage_and_no_model_code() -> None:
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("footprints.contracts"):
            assert not [t for t in targets if _is_stage(t) or t in ("footprints.runner", "footprints.cli")], module


def test_no_module_is_longer_than_500_lines() -> None:
    too_long = [f"{name}: {n} lines" for name, path in _modules().items()
                if (n := path.read_text().count("\n")) > MAX_LINES]
    assert not too_long, "modules over 500 lines (split them along a seam):\n" + "\n".join(too_long)


def test_the_graph_sees_function_level_imports() -> None:
    """The checks above would be blind if imports inside functions were missed."""
    graph = import_graph()
    assert "footprints.stages.tile" in graph["footprints.runner"] or any(
        t.startswith("footprints.stages") for t in graph["footprints.runner"])
    assert "footprints.model.segmenter" in graph["footprints.prediction.scene"]  # imported inside model_for


# The layers, lowest first. A module may import its own layer and those below it, never one above:
# the contracts (what stages exchange on disk) know no model, polygon or scoring code; the model knows no
# polygons, scoring or training; nothing but the orchestrators (runner, benchmarks, cli) knows a stage.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("footprints", "footprints.errors", "footprints.atomic"),
    ("footprints.config", "footprints.scenes", "footprints.runtime"),  # config checks tile.target against scenes.targets
    ("footprints.contracts",),
    ("footprints.model",),
    ("footprints.polygons", "footprints.synth"),
    ("footprints.scoring",),
    ("footprints.training",),  # validates with scoring's metrics
    ("footprints.report",),
    ("footprints.prediction",),  # its output checks recognise an earlier report (report.html)
    ("footprints.stages",),
    ("footprints.runner", "footprints.benchmarks"),
    ("footprints.cli",),
    ("pipelines",),
)
MAX_TOP_LEVEL = 25


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    upward = [f"{m} -> {t}" for m, targets in import_graph().items() for t in sorted(targets)
              if _layer(t) > _layer(m)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_every_package_has_a_layer_and_the_top_level_is_small() -> None:
    top = sorted(p.name for p in (REPO / "footprints").iterdir()
                 if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file())
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} entries at the top of footprints/: {top}"
    for name in top:
        _layer(f"footprints.{name.removesuffix('.py')}")


def test_the_layers_are_not_vacuous() -> None:
    """The layer check would pass on an empty graph: it must see the arrows the design rests on."""
    graph = import_graph()
    assert "footprints.contracts.checkpoints" in graph["footprints.model.segmenter"]
    assert any(t.startswith("footprints.polygons") for t in graph["footprints.stages.predict"])
    assert _layer("footprints.contracts.paths") < _layer("footprints.model.backbone") < _layer("footprints.stages.tile")
