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

from pact_ray.runs.config import RunConfig
from pact_ray.runs.kinds import RUN_KINDS, MatrixKind

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
    from pact_ray.tune import sweep
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
    plan = sweep.make_plan(kind, args)
    sweep.validate_inputs(plan)
    assert len(built) == len(plan.trial_configs) == 2 * len(kind.variants)
    assert all(isinstance(cfg, RunConfig) for _, cfg in plan.configs)


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
