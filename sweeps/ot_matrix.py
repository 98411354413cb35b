r"""The ablation dashboard's whole OT matrix in one sweep: Stage1 router cells and Stage2
spatial cells, one MLflow parent run, one summary.

    .venv/bin/python sweeps/ot_matrix.py                          # quick: 9 cells, small preset, local Ray
    .venv/bin/python sweeps/ot_matrix.py --profile full --name matrix-full-1
    .venv/bin/python sweeps/ot_matrix.py --profile smoke --model tiny --variants stage1_baseline,stage2_spatial_adapter
    .venv/bin/python sweeps/ot_matrix.py --name matrix-full-1 --resume
    .venv/bin/python sweeps/ot_matrix.py --profile official-full --model pact --gpus-per-trial 1 \
        --set stage1.init_checkpoint=/weights/ss_flow.safetensors --set stage2.init_checkpoint=/weights/stage2.pt

Cells: stage1_baseline, stage1_ot_first, stage1_mask_prior, stage1_rgb_edge,
stage1_virtual_patch, stage1_first_third_edge, stage2_spatial_diag, stage2_spatial_adapter.
--set KEY=VALUE applies to every cell; --set stage1.KEY=VALUE or stage2.KEY=VALUE to the
cells of that stage only.
"""

import sys

from pact_ray.kinds import MATRIX
from pact_ray.tune.sweep import sweep_command


def main(argv: list[str] | None = None) -> int:
    return sweep_command(MATRIX, argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
