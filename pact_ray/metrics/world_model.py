"""Validation metrics of a world model (``docs/specs/world_model.md``; names in
:mod:`pact_ray.metrics.names`).

Every sample is predicted under each action (the counterfactuals); the metrics of "the
prediction" use the recorded action. Predictions are clamped to the pixel range [0, 1]
first. Joint values are decoded from the motor strip (:class:`pact_ray.data.arm.strip.MotorStrip`)
of the predicted and of the true frames, in degrees (velocities: degrees per frame).

=============================  ==================================================================
val_mse                        pixel MSE of the prediction (all rows and channels)
val_mse_visual                 the same over the camera rows (above the strip)
val_mse_motor_strip            the same over the strip rows
ssim                           mean over samples of ``skimage.metrics.structural_similarity``
                               (RGB, data range 1, default 7 x 7 window)
psnr                           mean over samples of ``skimage.metrics.peak_signal_noise_ratio``
                               (data range 1); an exact prediction counts as PSNR_CAP dB
val_mse_action_{k}             val_mse of the samples whose action is k (0 STAY, 1 MOVE+, 2 MOVE-)
val_mse_static / _dynamic      squared error pooled over the pixels that are unchanged / changed
                               between the last context frame and the target (NaN if none)
motor_position_mae_mean        mean |decoded position - true position| over samples and joints
motor_position_mae_per_joint   the same per joint, J0..J5 (MLflow: ``...per_joint.J0`` etc.)
motor_position_mae_action_{k}  motor_position_mae_mean of the samples whose action is k
motor_velocity_mae_mean        the same for the decoded velocities
motor_direction_accuracy       how often the sign of the predicted pan velocity equals the true
                               one, signs taken with a dead band of DIRECTION_DEADBAND
                               (|v| below it counts as 0, i.e. STAY)
motor_consistency_error        mean |(predicted position - last context position) - predicted
                               velocity| over samples and joints: the strip's two halves agree
action_discrimination_score    mean over samples and pairs of distinct actions of the mean
                               absolute pixel difference between the two predictions
motor_discrimination_score     the same over the strip rows
val_mse_teacher_forced         GPT: val_mse of the teacher-forced frames; tf_fr_gap = val_mse - it
=============================  ==================================================================
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from pact_ray.data.arm.dataset import SampleSet
from pact_ray.data.arm.strip import ACTIONS, JOINT_LABELS, PAN, MotorStrip
from pact_ray.metrics import names as M
from pact_ray.models.world_model import AutoregressiveWorldModel, WorldModel

PSNR_CAP = 100.0  # dB for an exact prediction (PSNR is infinite there)
DIRECTION_DEADBAND = 1.0  # degrees per frame
STATIC_TOLERANCE = 0.5 / 255  # a pixel is unchanged when every channel moved less than half a level

Metrics = dict[str, float | list[float]]


@dataclass
class Evaluation:
    """Validation samples and their predictions, as [..., H, W, 3] float32 arrays in [0, 1].

    last_context: [N, H, W, 3]; target: [N, H, W, 3]; action: [N] recorded action ids;
    counterfactual: [N, A, H, W, 3], the prediction under each action a;
    teacher_forced: [N, H, W, 3] (GPT, under the recorded action) or None;
    ids: [N] sample ids in the split.
    """

    last_context: np.ndarray
    target: np.ndarray
    action: np.ndarray
    counterfactual: np.ndarray
    teacher_forced: np.ndarray | None
    ids: np.ndarray

    @property
    def prediction(self) -> np.ndarray:
        """[N, H, W, 3] the prediction under the recorded action."""
        return self.counterfactual[np.arange(len(self.action)), self.action]


def _hwc(x: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] tensor -> [..., H, W, 3] float32 array, clamped to [0, 1]."""
    return x.detach().float().clamp(0, 1).movedim(-3, -1).cpu().numpy()


@torch.no_grad()
def evaluate_model(model: WorldModel, samples: SampleSet, ids: Sequence[int] | np.ndarray, device: torch.device,
                   batch_size: int = 64, autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Evaluation:
    """Predict samples ``ids`` under every action (and teacher-forced for a GPT), ``batch_size``
    samples (times the actions) per pass; ``autocast``: the trainer's precision context."""
    model.eval()
    num_actions = model.cfg.num_actions
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("last", "target", "action", "cf", "tf")}
    ids = np.asarray(ids, dtype=np.int64)
    for start in range(0, len(ids), batch_size):
        b = samples.batch(ids[start : start + batch_size]).to(device)
        n = b.action.shape[0]
        # Every sample under every action in one batch: rows are (sample, action) pairs.
        context = b.context.repeat_interleave(num_actions, dim=0)
        actions = torch.arange(num_actions, device=device).repeat(n)
        with autocast():
            cf = model.predict(context, actions)
            tf = model.predict_teacher_forced(b.context, b.action, b.target) if isinstance(model, AutoregressiveWorldModel) else None
        parts["cf"].append(_hwc(cf.reshape(n, num_actions, *cf.shape[1:])))
        parts["last"].append(_hwc(b.context[:, -1]))
        parts["target"].append(_hwc(b.target))
        parts["action"].append(b.action.cpu().numpy())
        if tf is not None:
            parts["tf"].append(_hwc(tf))
    return Evaluation(
        last_context=np.concatenate(parts["last"]), target=np.concatenate(parts["target"]),
        action=np.concatenate(parts["action"]), counterfactual=np.concatenate(parts["cf"]),
        teacher_forced=np.concatenate(parts["tf"]) if parts["tf"] else None, ids=ids,
    )


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b) ** 2))


def _psnr(target: np.ndarray, pred: np.ndarray) -> float:
    from skimage.metrics import (
        peak_signal_noise_ratio,  # imported here: skimage pulls in scipy.stats (0.6 s) for every trial kind
    )

    if np.array_equal(target, pred):
        return PSNR_CAP
    return min(PSNR_CAP, float(peak_signal_noise_ratio(target, pred, data_range=1.0)))


def _signs(v: np.ndarray) -> np.ndarray:
    return np.where(v > DIRECTION_DEADBAND, 1, np.where(v < -DIRECTION_DEADBAND, -1, 0))


def compute_metrics(ev: Evaluation, strip: MotorStrip) -> Metrics:
    """Every metric of the module docstring (per-joint values as a list, in joint order)."""
    from skimage.metrics import structural_similarity  # see _psnr

    pred, target = ev.prediction, ev.target
    rows = strip.rows
    out: Metrics = {
        M.VAL_MSE: _mse(pred, target),
        M.VAL_MSE_VISUAL: _mse(pred[:, :-rows], target[:, :-rows]),
        M.VAL_MSE_MOTOR_STRIP: _mse(pred[:, -rows:], target[:, -rows:]),
        M.SSIM: float(np.mean([structural_similarity(t, p, channel_axis=-1, data_range=1.0) for t, p in zip(target, pred)])),
        M.PSNR: float(np.mean([_psnr(t, p) for t, p in zip(target, pred)])),
    }
    sq = ((pred.astype(np.float64) - target) ** 2).mean(axis=-1)  # [N, H, W] per-pixel squared error
    static = np.all(np.abs(target - ev.last_context) < STATIC_TOLERANCE, axis=-1)
    out[M.VAL_MSE_STATIC] = float(sq[static].mean()) if static.any() else math.nan
    out[M.VAL_MSE_DYNAMIC] = float(sq[~static].mean()) if (~static).any() else math.nan

    pos_pred, vel_pred = strip.decode(pred)
    pos_true, vel_true = strip.decode(target)
    pos_last, _ = strip.decode(ev.last_context)
    pos_err = np.abs(pos_pred - pos_true)  # [N, 6]
    out[M.MOTOR_POSITION_MAE_MEAN] = float(pos_err.mean())
    out[M.MOTOR_POSITION_MAE_PER_JOINT] = [float(v) for v in pos_err.mean(axis=0)]
    out[M.MOTOR_VELOCITY_MAE_MEAN] = float(np.abs(vel_pred - vel_true).mean())
    out[M.MOTOR_DIRECTION_ACCURACY] = float(np.mean(_signs(vel_pred[:, PAN]) == _signs(vel_true[:, PAN])))
    out[M.MOTOR_CONSISTENCY_ERROR] = float(np.abs((pos_pred - pos_last) - vel_pred).mean())
    for k in range(len(ACTIONS)):
        sel = ev.action == k
        if sel.any():
            out[M.VAL_MSE_ACTION.format(k=k)] = _mse(pred[sel], target[sel])
            out[M.MOTOR_POSITION_MAE_ACTION.format(k=k)] = float(pos_err[sel].mean())

    pairs = list(itertools.combinations(range(ev.counterfactual.shape[1]), 2))
    cf = ev.counterfactual.astype(np.float64)
    out[M.ACTION_DISCRIMINATION_SCORE] = float(np.mean([np.abs(cf[:, a] - cf[:, b]).mean() for a, b in pairs]))
    out[M.MOTOR_DISCRIMINATION_SCORE] = float(np.mean([np.abs(cf[:, a, -rows:] - cf[:, b, -rows:]).mean() for a, b in pairs]))
    if ev.teacher_forced is not None:
        out[M.VAL_MSE_TEACHER_FORCED] = _mse(ev.teacher_forced, target)
        out[M.TF_FR_GAP] = out[M.VAL_MSE] - out[M.VAL_MSE_TEACHER_FORCED]
    out[M.VAL_SAMPLES] = float(len(target))
    return out


def loggable(metrics: Metrics) -> dict[str, float]:
    """Scalars only: a per-joint list becomes one entry per joint (``name.J0`` ...)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, list):
            out.update({M.PER_JOINT.format(name=name, joint=j): float(v) for j, v in zip(JOINT_LABELS, value)})
        else:
            out[name] = float(value)
    return out
