"""Sweep the Stage2 spatial-articulation variants with Ray Tune, tracked in MLflow.

    python sweeps/stage2_spatial.py                     # the quick profile, all three variants, small preset
    python sweeps/stage2_spatial.py --profile smoke --model tiny --variants baseline,spatial_adapter
    python sweeps/stage2_spatial.py --profile full --name s2-full-1
    python sweeps/stage2_spatial.py --name s2-full-1 --resume

Run with --help for every flag.
"""

import sys

from pact_ray.runs.kinds import STAGE2
from pact_ray.tune.sweep import sweep_command


def main(argv: list[str] | None = None) -> int:
    return sweep_command(STAGE2, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
