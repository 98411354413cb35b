"""Every runnable script: --help works, and a bad flag ends in one sentence, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for folder in ("sweeps", "analysis") for p in (ROOT / folder).glob("*.py") if not p.name.startswith("_"))
MODULES = ["pact_ray.tracking.server", "pact_ray.data.objects.synthetic", "pact_ray.data.arm.synthetic"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_help_and_bad_flag(script):
    ok = _run([str(script), "--help"])
    assert ok.returncode == 0 and "usage:" in ok.stdout
    bad = _run([str(script), "--no-such-flag"])
    assert bad.returncode == 2
    err = bad.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err


_HEAVY = ("mlflow", "torch", "ray", "scipy", "matplotlib", "pandas")
_IMPORTS_ON_HELP = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print(sorted(m for m in %r if m in sys.modules), file=sys.stderr)
""" % (_HEAVY,)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_help_imports_no_heavy_library(script):
    """`--help` and a bad flag answer before MLflow, torch, Ray, scipy, matplotlib or pandas
    are imported (each of those costs seconds; the analysis scripts once took 5 s to print
    their usage)."""
    out = _run(["-c", _IMPORTS_ON_HELP, str(script)])
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


@pytest.mark.parametrize("module", MODULES)
def test_module_help(module):
    ok = _run(["-m", module, "--help"])
    assert ok.returncode == 0 and "usage:" in ok.stdout


def test_tracking_server_refuses_a_public_address():
    bad = _run(["-m", "pact_ray.tracking.server", "--host", "0.0.0.0", "--port", "5999"])
    assert bad.returncode == 2 and "--allow-remote" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.parent.name == "sweeps"], ids=lambda p: p.name)
def test_sweep_help_has_examples_says_defaults_once_and_only_what_applies(script):
    text = _run([str(script), "--help"]).stdout
    assert f"python sweeps/{script.name}" in text  # examples
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default: quick)") == 1 and text.count("(default: small)") == 1
    if script.name == "mae_world_model.py":
        assert "pact" not in text.replace("pact-ray", "") and "official-full" not in text and "router.eps" not in text
        assert "reference" in text and "--checkpoint" not in text
    else:
        assert "official-full" in text and "--checkpoint" in text and "pact" in text


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.parent.name == "sweeps"], ids=lambda p: p.name)
def test_sweep_help_gives_each_profiles_steps_and_validation_points_and_every_default_once(script):
    from pact_ray.kinds import RUN_KINDS

    text = _run([str(script), "--help"]).stdout
    kind = next(k for k in RUN_KINDS.values() if k.script == script.stem)
    profiles = text.split("profiles (--profile):\n", 1)[1].split("\n\n", 1)[0]
    for name, profile in kind.profiles.items():
        line = next(line for line in profiles.splitlines() if line.split()[0] == name)
        assert f"seeds {','.join(map(str, range(profile.seeds)))}" in line
    first = next(iter(kind.profiles.values()))
    assert f"{first.steps} step" in profiles and "validated at step" in profiles
    for flag, default in (("--gpus-per-trial", "0.0"), ("--optuna-seed", "0"), ("--max-failures", "2")):
        block = text.split(flag, 2)[2].split("\n  --", 1)[0]  # the flag's help, after its usage mention
        assert " ".join(block.split()).count("(default: ") == 1 and f"(default: {default})" in " ".join(block.split()), block
    assert "Run with --help" not in text and "--list-keys" in text


def test_profile_lines_name_the_validation_points():
    from pact_ray.kinds import STAGE1, WORLD_MODEL
    from pact_ray.tune.flags import profiles_text

    stage1 = {line.split()[0]: line for line in profiles_text(STAGE1).splitlines()}
    assert "8 steps (first-third variants: 3), validated at steps 3, 8; seeds 0,1,2" in stage1["quick"]
    assert "60 steps (first-third variants: 20), validated at steps 10, 20, 30, 40, 50, 60" in stage1["full"]
    assert "no verdicts" in stage1["smoke"] and "--checkpoint" in stage1["official-full"]
    wm = {line.split()[0]: line for line in profiles_text(WORLD_MODEL).splitlines()}
    assert "60 steps, validated at steps 30, 60" in wm["quick"]
    assert "3000 steps, validated every 250 steps (250, 500, ..., 3000)" in wm["full"]


def test_ot_matrix_help_keeps_its_line_continuation():
    text = _run([str(ROOT / "sweeps" / "ot_matrix.py"), "--help"]).stdout
    assert "--gpus-per-trial 1 \\\n        --set stage1.init_checkpoint=" in text
    assert "Stage1: 8 steps (first-third variants: 3)" in text and "Stage2: 5 steps" in text  # each kind's own steps


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.parent.name == "sweeps"], ids=lambda p: p.name)
def test_list_keys_prints_every_set_key_with_type_default_and_accepted_values(script):
    from pact_ray.kinds import RUN_KINDS
    from pact_ray.runs.config import test_only_fields

    done = _run([str(script), "--list-keys"])
    assert done.returncode == 0 and not done.stderr, done.stderr
    text = done.stdout
    kind = next(k for k in RUN_KINDS.values() if k.script == script.stem)
    cells = getattr(kind, "cells", None)
    kinds = [RUN_KINDS[k] for k in dict.fromkeys(k for k, _ in cells.values())] if cells else [kind]
    for k in kinds:
        prefix = f"{k.name}." if cells else ""
        flat = k.config_cls.for_variant(next(iter(k.variants)), "smoke", "tiny").flat()
        for key in set(flat) - test_only_fields(k.config_cls) - {"variant", "profile", "model", "seed"}:
            assert f"\n  {prefix}{key} (" in text, key
        assert "fail_at_step" not in text
    if kind.script == "stage1_router":
        assert "  lr (float, default 0.0001, > 0)" in text
        assert "  optimizer (str, default adamw, one of ('adamw', 'sgd')): " in text
        assert "  router.eps (float, default 0.05, > 0, --search optuna range 0.01..0.5 (log)): " in text
        assert "  router.m_v (float, default 0.05, in (0, 1), " in text
        assert "  val_fraction (float, default 0.25, in (0, 1)): " in text
    if kind.script == "mae_world_model":
        assert "  mask (str, default target, one of ('target', 'target_random')): " in text
