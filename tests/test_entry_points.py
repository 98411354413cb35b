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
