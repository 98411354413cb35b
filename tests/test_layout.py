"""The package's architecture, checked: one registry whose knobs are config fields, no
import cycles, few loose top-level modules, a Ray-free core, one config build per trial in
the driver, and entry points that resolve."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pact_ray.kinds import RUN_KINDS, MatrixKind
from pact_ray.errors import ConfigError
from pact_ray.runs.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pact_ray"


# ---------------------------------------------------------------- the registry

@pytest.mark.parametrize("kind", [k for k in RUN_KINDS.values() if not isinstance(k, MatrixKind)], ids=lambda k: k.name)
def test_every_knob_is_a_field_of_its_config_with_a_range(kind):
    preset = kind.presets[0]
    for name, variant in kind.variants.items():
        model = variant.setting("model", preset)
        flat = kind.config_cls.for_variant(name, "smoke", model).flat()
        for key in variant.knobs:
            assert key in flat, f"{kind.name} variant {name}: knob {key!r} is not a config field"
            knob = kind.knobs[key]
            assert knob.low < knob.high and (knob.low > 0 or not knob.log), key
        for key in variant.settings:
            assert key in flat, f"{kind.name} variant {name}: setting {key!r} is not a config field"
    for profile in kind.profiles.values():
        official = {"init_checkpoint": "x"} if profile.init == "official" else {}
        flat = kind.config_cls.for_variant(next(iter(kind.variants)), profile.name, preset, **official).flat()
        assert set(profile.settings) <= set(flat), f"{kind.name} profile {profile.name}: settings that are not config fields"

def test_matrix_cells_name_registered_variants():
    matrix = RUN_KINDS["matrix"]
    for cell, (kind, variant) in matrix.cells.items():
        assert variant in RUN_KINDS[kind].variants and cell == f"{kind}_{variant}"


# ---------------------------------------------------------------- the package

def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _top_level_imports(path: Path, module: str) -> set[str]:
    """pact_ray modules imported when ``module`` is imported (statements outside functions)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in tree.body:  # module level only: imports inside functions run later
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "pact_ray" or m.startswith("pact_ray.")}


def test_no_module_level_import_cycles():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imported in _top_level_imports(path, name):
            # "from pact_ray.x import y" imports pact_ray.x (and pact_ray.x.y when y is a module)
            if imported in modules and imported != name:
                deps.add(imported)
        graph[name] = deps
    # A package's __init__ runs before its submodules: importing pact_ray.a.b imports pact_ray.a.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("module-level import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_two_data_families_stay_apart():
    """pact_ray.data.objects (PAct) and pact_ray.data.arm (the world model) import nothing of
    each other, at module level or inside functions; they share only pact_ray.data.cache."""
    for family, other in (("objects", "arm"), ("arm", "objects")):
        modules = [p for p in (PACKAGE / "data" / family).rglob("*.py") if p.name != "__init__.py"]
        assert len(modules) >= 4, modules
        for path in modules:
            tree = ast.parse(path.read_text())
            imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            assert not {m for m in imported if m.startswith(f"pact_ray.data.{other}")}, f"{path} imports pact_ray.data.{other}"


# Layers, lowest first (pact_ray.common's docstring): each folder may import only the folders
# listed before it (and the loose top-level modules such as pact_ray.errors).
LAYERS = ("common", "data", "models", "metrics")


def _imported_modules(path: Path) -> set[str]:
    """Every pact_ray module a file imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {m for m in imported if m.startswith("pact_ray.")}


@pytest.mark.parametrize("layer", LAYERS)
def test_lower_layers_do_not_import_higher_ones(layer):
    """common < data < models < metrics: no folder imports a higher one, even inside a function
    (data <-> models and metrics <-> models were cycles: the presets and the mask-moment names
    now live in pact_ray.common)."""
    higher = LAYERS[LAYERS.index(layer) + 1:] + ("training", "runs", "tune", "report", "tracking")
    for path in (PACKAGE / layer).rglob("*.py"):
        bad = {m for m in _imported_modules(path) if m.split(".")[1] in higher}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


# Pairs of units of pact_ray that may still import each other, each with its reason. A unit is
# a sub-package (folder) or a loose top-level module (pact_ray/verdicts.py is "verdicts").
MUTUAL_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {
    ("kinds", "report"): "the report names runs by their kind, read from the registry (pact_ray.kinds); each kind names "
                         "its sweep summary, a function of the report imported when the sweep ends. Splitting the registry "
                         "in two to break this would list the kinds twice.",
}


def _unit(module: str) -> str | None:
    """The unit of a pact_ray module: its folder under pact_ray, or the loose module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pact_ray" else None


def test_no_two_folders_import_each_other():
    """No two units of pact_ray (folders, and loose top-level modules each on its own) import
    each other, counting every import of a module, inside functions too: a call-time import
    is still a dependency, and two units that need each other are one unit split in two (a
    lower layer must not reach up). The pairs that must remain are in MUTUAL_IMPORTS_ALLOWED,
    with their reasons; an allowed pair that no longer imports each other leaves the list."""
    edges: dict[tuple[str, str], set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = _unit(_module_name(path))
        for imported in _imported_modules(path):
            target = _unit(imported)
            if source and target and target != source:
                edges.setdefault((source, target), set()).add(f"{path.relative_to(ROOT)} imports {imported}")
    mutual = {(a, b) for a, b in edges if a < b and (b, a) in edges}
    unexplained = mutual - set(MUTUAL_IMPORTS_ALLOWED)
    assert not unexplained, "units that import each other: " + "; ".join(
        f"{a} <-> {b} ({sorted(edges[(a, b)])[0]}, {sorted(edges[(b, a)])[0]})" for a, b in sorted(unexplained))
    assert all(a < b for a, b in MUTUAL_IMPORTS_ALLOWED), "allowed pairs are listed in name order"
    stale = set(MUTUAL_IMPORTS_ALLOWED) - mutual
    assert not stale, f"allowed pairs that no longer import each other (remove them): {sorted(stale)}"


def test_few_loose_top_level_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 5, loose


def test_the_core_runs_without_ray():
    """Configs, trainers, checkpoint I/O, the models and the world-model report load without Ray."""
    code = (
        "import sys\n"
        "import pact_ray.runs.stage1, pact_ray.runs.stage2, pact_ray.runs.world_model\n"
        "import pact_ray.training.stage1, pact_ray.training.stage2, pact_ray.training.world_model\n"
        "import pact_ray.training.checkpoints, pact_ray.report.world_model\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(loaded[:5])\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_driver_builds_each_trial_config_once(monkeypatch, tmp_path):
    from pact_ray.tune import plan as sweep_plan
    from pact_ray.tune.flags import build_parser

    kind = RUN_KINDS["matrix"]
    args = build_parser(kind, "").parse_args(["--profile", "smoke", "--model", "tiny", "--seeds", "0,1",
                                              "--storage-path", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    built: list[str] = []
    original = RunConfig.from_flat.__func__

    def counting(cls, flat):
        built.append(flat["variant"])
        return original(cls, flat)

    monkeypatch.setattr(RunConfig, "from_flat", classmethod(counting))
    plan = sweep_plan.make_plan(kind, args)
    sweep_plan.validate_inputs(plan)
    assert len(built) == len(plan.trial_configs) == 2 * len(kind.variants)
    assert all(isinstance(cfg, RunConfig) for _, cfg in plan.configs)


# ---------------------------------------------------------------- the run kinds

@pytest.mark.parametrize("kind", [k for k in RUN_KINDS.values() if not isinstance(k, MatrixKind)], ids=lambda k: k.name)
def test_each_kind_names_its_training_module_for_rays_preload(kind):
    """Ray's worker preload takes module names: the one a kind gives is where its trainer,
    model builder and dataset come from."""
    module = kind.training()
    assert module.__name__ == kind.trainer_module
    assert callable(module.build_model) and callable(module.dataset_for)
    cfg = kind.config_cls.for_variant(next(iter(kind.variants)), "smoke", kind.presets[0], 0)
    assert type(kind.trainer(cfg)).__module__ == kind.trainer_module


def test_the_run_kinds_are_listed_once():
    """RUN_KINDS is the one list: the trainables, each sweep script, its console script and
    the --set example of its help all follow from it."""
    from pact_ray.tune.flags import build_parser, parse_overrides
    from pact_ray.tune.trainables import TRAINABLES

    assert list(TRAINABLES) == list(RUN_KINDS)
    assert all(fn.__name__ == f"train_{name}" and fn.__module__ == "pact_ray.tune.trainables" for name, fn in TRAINABLES.items())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    sweep_scripts = {name: target for name, target in scripts.items() if target.startswith("sweeps.")}
    assert sweep_scripts == {f"pact-{k.script.replace('_', '-')}": f"sweeps.{k.script}:main" for k in RUN_KINDS.values()}
    assert {p.stem for p in (ROOT / "sweeps").glob("*.py") if p.stem != "__init__"} == {k.script for k in RUN_KINDS.values()}
    for kind in RUN_KINDS.values():
        assert kind.set_example in " ".join(build_parser(kind, "").format_help().split())
        overrides = parse_overrides([item.strip() for item in kind.set_example.split(",")])

        def builds(variant: str) -> bool:
            try:
                return isinstance(kind.config({"variant": variant, "profile": "smoke", "model": kind.presets[0], "seed": 0,
                                               **overrides}), RunConfig)
            except ConfigError:  # e.g. router keys on a variant without the router
                return False

        assert any(builds(v) for v in kind.variants), f"{kind.name}: --set {kind.set_example} fits no variant"


def test_nothing_outside_a_kind_branches_on_its_name_nor_imports_by_string():
    """The Ray Tune layer, the tracking and the report reach a kind's own code through the
    registry, not by comparing its name; nothing in pact_ray imports a module named by a string."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "importlib" not in text and "__import__(" not in text, f"{path.relative_to(ROOT)} imports by string"
        if path.name == "kinds.py":
            continue
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                sides = [node.left, *node.comparators]
                names = {s.value for s in sides if isinstance(s, ast.Constant)} | {
                    s.attr for s in sides if isinstance(s, ast.Attribute) and s.attr in {"name"} and isinstance(s.value, ast.Attribute)}
                assert not names & set(RUN_KINDS), f"{path.relative_to(ROOT)}:{node.lineno} compares with a kind's name"
                kinds_named = [s for s in sides if isinstance(s, ast.Attribute) and s.attr == "name"
                               and isinstance(s.value, ast.Name) and s.value.id.isupper()]
                assert not kinds_named, f"{path.relative_to(ROOT)}:{node.lineno} compares with a kind's name"


# ---------------------------------------------------------------- entry points

def test_every_console_script_resolves_to_a_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"pact-stage1-router", "pact-summarize", "pact-eval-report"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_scripts_do_not_patch_sys_path():
    for folder in ("sweeps", "analysis"):
        for path in (ROOT / folder).glob("*.py"):
            assert "sys.path.insert" not in path.read_text(), path
