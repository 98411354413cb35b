"""Every metric name that a trainable reports, MLflow stores and the summary reads, defined once."""

LOSS = "loss"
GATE = "gate"
EDGE_DELTA = "edge_delta"
VIRTUAL_MASS = "virtual_mass"
PLAN_ENTROPY = "plan_entropy"
MARGINAL_ERROR = "marginal_error"  # L1 marginal error of the router's plans, mean over problems and blocks
MARGINAL_ERROR_MAX = "marginal_error_max"  # the largest, over every plan solved in the step (target: < router tol)
SINKHORN_ITERS = "sinkhorn_iters"  # solver iterations per patched block (both solves of an edge variant)
EDGE_SOLVE_ITERS = "edge_solve_iters"  # of which the warm-started edge-regularised solve (0 without edge term)
OT_TIME_MS = "ot_time_ms"
STEP_TIME_S = "step_time_s"
GRAD_NORM = "grad_norm"
LR = "lr"
STEP = "step"
NONFINITE_STEPS = "nonfinite_steps"  # steps so far whose training loss was NaN or infinite (a diverged run)
RESUME_NOTE = "resume_note"  # not a metric: a one-line note in the first result after a resume that skipped an unreadable checkpoint

# Held-out validation (pact_ray.training.validation), at the profile's evaluation steps and
# at the last step: the same samples, timesteps and noise for every variant and seed.
VAL_LOSS = "val_loss"  # the training objective on the validation split (Stage1: flow MSE; Stage2: flow + art)
VAL_FLOW_LOSS = "val_flow_loss"  # the rectified-flow MSE alone
VAL_ART_L2 = "val_art_l2"  # Stage2: articulation MSE over valid slots
VAL_ART_TYPE_ACC = "val_art_type_acc"  # Stage2: decoded joint type == target
VAL_ART_LABEL_ACC = "val_art_label_acc"  # Stage2: decoded semantic label == target

# Stage2
ART_L2 = "art_l2"
MASK_PARTS = "mask_parts"
EMPTY = "empty"

# Router diagnostics, in the order they are reported.
ROUTER_DIAGNOSTICS = (GATE, EDGE_DELTA, VIRTUAL_MASS, PLAN_ENTROPY, MARGINAL_ERROR, MARGINAL_ERROR_MAX, SINKHORN_ITERS,
                      EDGE_SOLVE_ITERS, OT_TIME_MS)

# Stage2, every step (besides LOSS, ART_L2, MASK_PARTS and EMPTY).
FLOW_LOSS = "flow_loss"  # Stage2: rectified-flow MSE on the voxel latents, every voxel of every row
ART_LOSS = "art_loss"  # the articulation term of LOSS: ART_L2 times the config's art_weight
ART_TYPE_ACC = "art_type_acc"  # decoded joint type == target, over the batch's parts
ART_LABEL_ACC = "art_label_acc"  # decoded semantic label == target
# Mean squared error of each slot group of the articulation vector (valid slots only),
# keyed by pact_ray.data.objects.articulation.SLOT_GROUPS.
ART_GROUP_ERRORS = {
    "type": "art_err_type",
    "axis": "art_err_axis",
    "origin": "art_err_origin",
    "range": "art_err_range",
    "label": "art_err_label",
}
# Spatial variants: the 2D mask moments of the parts (pact_ray.models.stage2.mask_moments),
# in its column order, averaged over the batch's visible parts (defined in the layer below
# models and metrics, which both read it).
from pact_ray.common.moments import MASK_MOMENTS  # noqa: E402, F401 (re-exported: M.MASK_MOMENTS)

# World model (pact_ray.metrics.world_model): validation-split metrics, reported at the
# evaluation steps and in the evaluation report; definitions in that module's docstring.
VAL_MSE = "val_mse"
VAL_MSE_VISUAL = "val_mse_visual"
SSIM = "ssim"
PSNR = "psnr"
VAL_MSE_MOTOR_STRIP = "val_mse_motor_strip"
VAL_MSE_ACTION = "val_mse_action_{k}"  # .format(k=action id): 0 STAY, 1 MOVE+, 2 MOVE-
VAL_MSE_STATIC = "val_mse_static"
VAL_MSE_DYNAMIC = "val_mse_dynamic"
MOTOR_POSITION_MAE_MEAN = "motor_position_mae_mean"
MOTOR_POSITION_MAE_PER_JOINT = "motor_position_mae_per_joint"  # a list; in MLflow one metric per joint:
PER_JOINT = "{name}.{joint}"  # .format(name=..., joint="J0"): motor_position_mae_per_joint.J0
MOTOR_POSITION_MAE_ACTION = "motor_position_mae_action_{k}"
MOTOR_VELOCITY_MAE_MEAN = "motor_velocity_mae_mean"
MOTOR_DIRECTION_ACCURACY = "motor_direction_accuracy"
MOTOR_CONSISTENCY_ERROR = "motor_consistency_error"
ACTION_DISCRIMINATION_SCORE = "action_discrimination_score"
MOTOR_DISCRIMINATION_SCORE = "motor_discrimination_score"
VAL_MSE_TEACHER_FORCED = "val_mse_teacher_forced"  # GPT only: val_mse of the teacher-forced frames
TF_FR_GAP = "tf_fr_gap"  # GPT only: val_mse (free-running) - val_mse_teacher_forced
VAL_SAMPLES = "val_samples"  # validation samples scored
EVAL_TIME_S = "eval_time_s"  # seconds the evaluation took
BEST_VAL_MSE = "best_val_mse"  # lowest val_mse so far (the weights kept as the best checkpoint)
BEST_STEP = "best_step"  # the step of those weights


def metric_mode(metric: str) -> str:
    """"max" for a metric where higher is better (accuracies, scores, SSIM, PSNR), "min" for
    the losses and errors."""
    higher = ("_acc", "accuracy", "score", SSIM, PSNR)
    return "max" if metric.endswith(higher) or metric in (SSIM, PSNR) else "min"
