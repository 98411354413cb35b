"""World-model training: the masked (MAE) or teacher-forced (GPT) pixel loss every step, the
validation metrics every ``eval_every`` steps, and the best weights by val_mse.

The best weights travel inside every checkpoint (``state["best"]``: model state dict, step,
val_mse), so the final checkpoint of a trial holds the best model of the whole run and
:func:`load_checkpoint` (the evaluation report's loader) finds it there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pact_ray.data.arm.dataset import WorldModelData
from pact_ray.data.arm.synthetic import ensure_arm_dataset
from pact_ray.errors import first_line
from pact_ray.metrics import names as M
from pact_ray.metrics.world_model import compute_metrics, evaluate_model, loggable
from pact_ray.models.checkpoint import CheckpointError, describe_mismatch
from pact_ray.models.world_model import WorldModel, build_world_model
from pact_ray.runs.world_model import WorldModelRunConfig
from pact_ray.training.base import Trainer, step_generator
from pact_ray.training.validation import eval_sample_ids

KIND = WorldModelRunConfig.kind


def build_model(cfg: WorldModelRunConfig) -> WorldModel:
    """The world model of a run config (preset + size overrides)."""
    return build_world_model(cfg.model_config())


def dataset_for(cfg: WorldModelRunConfig, folder: str | os.PathLike | None = None) -> WorldModelData:
    """The run's samples: ``folder`` or ``cfg.data`` if given, else the cached synthetic arm data."""
    if folder is None:
        folder = cfg.data or ensure_arm_dataset(cfg.synthetic_episodes, cfg.episode_length, cfg.data_seed)
    return WorldModelData(folder, image_size=cfg.image_size, context=cfg.context_frames,
                          val_fraction=cfg.val_fraction, split_seed=cfg.data_seed)


class WorldModelTrainer(Trainer):
    def __init__(self, cfg: WorldModelRunConfig, device=None, data: WorldModelData | None = None):
        super().__init__(cfg, device)
        self.data = data if data is not None else dataset_for(cfg)
        if len(self.data.train) < cfg.batch_size:
            raise ValueError(f"the training split has {len(self.data.train)} samples, fewer than batch_size {cfg.batch_size}")
        self.model = build_model(cfg).to(self.device)
        self.build_optimizer(self.model.parameters())
        self.eval_ids = eval_sample_ids(len(self.data.val), cfg.eval_samples)
        self.best: dict[str, Any] | None = None  # {"model": state dict, "step": int, "val_mse": float}

    def loss_and_metrics(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of ``step``'s batch: a seeded draw of training samples and masking noise (resume-exact)."""
        cfg = self.cfg
        ids = torch.randperm(len(self.data.train), generator=step_generator(cfg.seed, step, stream=0))[: cfg.batch_size]
        b = self.data.train.batch(ids.numpy()).to(self.device)
        loss = self.model.training_loss(b.context, b.action, b.target, generator=step_generator(cfg.seed, step, stream=1))
        return loss, {}

    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the current weights (and keep them if they are the best so far)."""
        t0 = time.perf_counter()
        ev = evaluate_model(self.model, self.data.val, self.eval_ids, self.device, autocast=self.autocast)
        metrics = loggable(compute_metrics(ev, self.data.strip))
        if self.best is None or metrics[M.VAL_MSE] < self.best["val_mse"]:
            weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.best = {"model": weights, "step": self.step, "val_mse": metrics[M.VAL_MSE]}
        metrics.update({M.BEST_VAL_MSE: self.best["val_mse"], M.BEST_STEP: float(self.best["step"]),
                        M.EVAL_TIME_S: time.perf_counter() - t0})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.best is not None:
            state["best"] = self.best
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.best = state.get("best")


# ------------------------------------------------------------------ loading

@dataclass
class LoadedWorldModel:
    """A world model read back from a checkpoint, with the run config it was trained under."""

    cfg: WorldModelRunConfig
    model: WorldModel  # in eval mode, on the CPU
    step: int  # the training step the checkpoint was written at
    weights_step: int  # the step of the weights loaded (the best ones where the checkpoint has them)
    val_mse: float | None  # their val_mse, where known
    source: str  # the file or folder read


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state dict of a trial checkpoint folder (``state.pt`` + ``meta.json``, checksum
    verified) or of a ``.pt``/``.pth`` file, loaded with ``weights_only=True``."""
    from pact_ray.training.checkpoints import STATE_FILE, read_checkpoint

    p = Path(path)
    if p.is_dir():
        try:
            return read_checkpoint(p, KIND)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - an unreadable state.pt is the same user error
            raise CheckpointError(f"checkpoint {p / STATE_FILE} could not be read ({first_line(e, 200)})") from None
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files, pickles with objects, non-torch files
        raise CheckpointError(f"checkpoint {p} could not be read as weights ({first_line(e, 200)})") from None



def load_checkpoint(path: str | os.PathLike) -> LoadedWorldModel:
    """The world model of a checkpoint (its best weights where it keeps them). Raises
    CheckpointError for a file of another kind, a config that does not validate, or
    weights that do not fit the model type and size the config names."""
    state = read_state(path)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} holds no run config: it is not a world-model checkpoint")
    if state.get("kind") != KIND:
        raise CheckpointError(f"checkpoint {path} is a {state.get('kind')!r} checkpoint, not a world-model one")
    try:
        cfg = WorldModelRunConfig.from_flat(state["config"])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} has an invalid world-model config ({first_line(e, 200)})") from None
    best = state.get("best")
    weights = best["model"] if best else state.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    model = build_model(cfg)
    problem = describe_mismatch({k: v.shape for k, v in model.state_dict().items()}, weights)
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit the {cfg.model_type} '{cfg.model}' world model its config names: {problem}")
    model.load_state_dict(weights)
    step = int(state.get("step", 0))
    return LoadedWorldModel(cfg=cfg, model=model.eval(), step=step, weights_step=int(best["step"]) if best else step,
                            val_mse=float(best["val_mse"]) if best else None, source=str(path))
