"""Sweep the Stage2 spatial-articulation variants with Ray Tune, tracked in MLflow.

    .venv/bin/python sweeps/stage2_spatial.py                     # the quick profile, all three variants, small preset
    .venv/bin/python sweeps/stage2_spatial.py --profile smoke --model tiny --variants baseline,spatial_adapter
    .venv/bin/python sweeps/stage2_spatial.py --profile full --name s2-full-1
    .venv/bin/python sweeps/stage2_spatial.py --name s2-full-1 --resume
"""

import sys

from pact_ray.kinds import STAGE2
from pact_ray.tune.sweep import sweep_command


def main(argv: list[str] | None = None) -> int:
    return sweep_command(STAGE2, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
