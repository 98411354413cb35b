"""The cluster recipes in deploy/ are valid: Ray's own schema for the launcher YAML, the
RayJob's structure, bash syntax for SLURM, and every sweep command in them parses with the
sweep's real flags."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

from pact_ray.kinds import get_kind
from pact_ray.tune.flags import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _sweep_flags(command: str) -> list[str]:
    """The flags of the stage1_router.py call inside a shell command line."""
    words = shlex.split(command.replace("\\\n", " "))
    i = next(i for i, w in enumerate(words) if w.endswith("sweeps/stage1_router.py"))
    return [w for w in words[i + 1 :] if not w.startswith("${") and w != '"${resume[@]}"']


def _check_flags(flags: list[str]) -> None:
    args = build_parser(get_kind("stage1"), "").parse_args(flags)
    assert args.address and args.storage_path and args.name
    assert args.resume == "auto"  # every retry of the scheduler runs this same command: it heals itself


def test_ray_cluster_launcher_yaml_matches_rays_schema():
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "local"
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    text = (DEPLOY / "ray-cluster.yaml").read_text()
    cmd = re.search(r'ray exec deploy/ray-cluster.yaml "(.*?)"\n', text.replace("\\\n#      ", " "), re.S).group(1)
    _check_flags(_sweep_flags(cmd.split("&&", 1)[1]))


def test_kuberay_rayjob_manifest():
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert head["image"] and workers and all(w["template"]["spec"]["containers"][0]["image"] for w in workers)
    mounts = {m["mountPath"] for m in head["volumeMounts"]}
    assert "/shared" in mounts
    yaml.safe_load(spec["runtimeEnvYAML"])
    _check_flags(_sweep_flags(spec["entrypoint"]))
    assert "/shared/runs" in spec["entrypoint"]  # storage every pod can reach
    assert spec["backoffLimit"] >= 1  # KubeRay retries a failed attempt with the same entrypoint
    assert "RAY_AUTH_MODE" not in spec["runtimeEnvYAML"]  # never disabled on a cluster


def test_slurm_script():
    path = DEPLOY / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    directives = re.findall(r"^#SBATCH (--[\w-]+)", text, re.M)
    assert {"--nodes", "--time", "--job-name", "--requeue", "--signal"} <= set(directives)
    assert re.search(r"^#SBATCH --signal=B:TERM@\d+$", text, re.M)  # the notice reaches the batch shell...
    assert "trap 'kill -TERM \"$sweep\"' TERM" in text  # ...which passes it to the sweep
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_MODE=disabled" not in text
    assert "ray\" start --head" in text and "--address=\"$head_ip:$PORT\"" in text
    sweep = text[text.index('"$REPO/sweeps/stage1_router.py"'):].split(" &\n")[0]
    sweep = sweep.replace('"$head_ip:$PORT"', "10.0.0.1:6379").replace('"$SHARED/runs"', "/shared/runs")
    sweep = sweep.replace('"sqlite:///$SHARED/mlflow.db"', "sqlite:////shared/mlflow.db").replace('"$NAME"', "stage1-slurm")
    _check_flags(_sweep_flags(sweep.replace('"$REPO/sweeps/stage1_router.py"', "sweeps/stage1_router.py")))
