"""Sweep the Stage1 OT-router variants with Ray Tune, tracked in MLflow.

    python sweeps/stage1_router.py                      # the quick matrix, small preset, local Ray
    python sweeps/stage1_router.py --profile smoke --model tiny --variants baseline,ot_first
    python sweeps/stage1_router.py --search optuna --variant rgb_edge --num-samples 16 --scheduler asha
    python sweeps/stage1_router.py --name my-sweep --resume

Run with --help for every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pact_ray.sweep import run_sweep  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_sweep("stage1", description=__doc__.split("\n\n")[0]))
