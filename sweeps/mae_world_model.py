"""Sweep the MAE world model and its GPT baseline with Ray Tune, tracked in MLflow.

    .venv/bin/python sweeps/mae_world_model.py                     # quick: mae, mae_random, gpt at --model small, ...
    .venv/bin/python sweeps/mae_world_model.py --profile smoke --model tiny --variants mae,gpt --seeds 0,1
    .venv/bin/python sweeps/mae_world_model.py --variants mae_small,mae_reference,gpt_small --set lr=5e-4
    .venv/bin/python sweeps/mae_world_model.py --data /data/so100-pan --profile full --name wm-full
    .venv/bin/python sweeps/mae_world_model.py --name wm-full --resume

A run's evaluation report: `python analysis/eval_report.py --run RUN_ID --out DIR` (the sweep prints
the command for its runs).
"""

import sys

from pact_ray.kinds import WORLD_MODEL
from pact_ray.tune.sweep import sweep_command


def main(argv: list[str] | None = None) -> int:
    return sweep_command(WORLD_MODEL, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
