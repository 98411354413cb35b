"""Sweep the Stage1 OT-router variants with Ray Tune, tracked in MLflow.

    .venv/bin/python sweeps/stage1_router.py                      # the quick matrix, small preset, local Ray
    .venv/bin/python sweeps/stage1_router.py --profile smoke --model tiny --variants baseline,ot_first
    .venv/bin/python sweeps/stage1_router.py --search optuna --variant rgb_edge --num-samples 16 --scheduler asha
    .venv/bin/python sweeps/stage1_router.py --name my-sweep --resume
    .venv/bin/python sweeps/stage1_router.py --name my-sweep --resume auto   # start, continue or do nothing: one command for every retry
"""

import sys

from pact_ray.kinds import STAGE1
from pact_ray.tune.sweep import sweep_command


def main(argv: list[str] | None = None) -> int:
    return sweep_command(STAGE1, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
