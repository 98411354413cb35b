"""Sweep the Stage2 spatial-articulation variants with Ray Tune, tracked in MLflow.

    python sweeps/stage2_spatial.py                     # the quick profile, all three variants, small preset
    python sweeps/stage2_spatial.py --profile smoke --model tiny --variants baseline,spatial_adapter
    python sweeps/stage2_spatial.py --profile full --name s2-full-1
    python sweeps/stage2_spatial.py --name s2-full-1 --resume

Run with --help for every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pact_ray.sweep import run_sweep  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_sweep("stage2", description=__doc__.split("\n\n")[0]))
