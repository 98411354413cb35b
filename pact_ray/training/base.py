"""What every trainer shares: device, optimiser, precision, seeded per-step randomness,
the held-out split, checkpoint state and the timed, clipped optimisation step followed by
validation when it is due."""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from pact_ray.errors import ConfigError
from pact_ray.metrics import names as M
from pact_ray.training.validation import split_indices


class InjectedFault(RuntimeError):
    """Raised by the test-only ``fail_at_step`` knob."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): a resumed run draws exactly
    the batches, timesteps and noise that the uninterrupted run would have drawn."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and ints only, so the checkpoint loads with weights_only=True."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Base trainer: subclasses build ``self.model`` and implement :meth:`loss_and_metrics`
    and :meth:`evaluate` (the validation metrics of the current weights)."""

    def __init__(self, cfg, device=None):
        self.cfg = cfg
        self.device = pick_device(device)
        self.step = 0
        self.resumed = False
        self.nonfinite_steps = 0  # steps whose training loss was NaN or infinite
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

    def setup(self, dataset, build_model, title: str) -> None:
        """The construction every trainer shares: the run's dataset (at least one batch of it),
        its model (strictly initialised from ``init_checkpoint`` for official runs) on the
        device, and the optimiser."""
        from pact_ray.models.checkpoint import load_core_weights

        cfg = self.cfg
        self.dataset = dataset
        # The held-out split: fixed by the data seed, never drawn for training.
        # Views of one object (PAct's data) stay on one side of it: `groups` names each sample's object.
        self.train_ids, self.val_ids = split_indices(len(dataset), cfg.val_fraction, cfg.data_seed,
                                                     min_train=cfg.batch_size, groups=getattr(dataset, "groups", None))
        model = build_model(cfg)
        if cfg.init == "official":
            load_core_weights(model, cfg.init_checkpoint, model.core_state_dict_keys(), what=f"the {title} '{cfg.model}' preset")
        self.model = model.to(self.device)
        self.build_optimizer(self.model.parameters())

    def draw_batch(self, step: int, collate, keys) -> dict[str, torch.Tensor]:
        """The batch of ``step``: a seeded draw of ``batch_size`` objects (resume-exact), collated
        by ``collate(items, generator)`` and moved to the device (pinned, non-blocking on CUDA)."""
        g = step_generator(self.cfg.seed, step, stream=0)
        pick = torch.randperm(len(self.train_ids), generator=g)[: self.cfg.batch_size].tolist()
        batch = collate([self.dataset[int(self.train_ids[i])] for i in pick], g)
        pin = self.device.type == "cuda"
        return {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=pin) for k, v in batch.items() if k in keys}

    def build_optimizer(self, params) -> None:
        cfg = self.cfg
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")

    def autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def loss_and_metrics(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """The validation metrics of the current weights (``val_*``; pact_ray.training.validation)."""
        raise NotImplementedError

    def check_fault(self) -> None:
        cfg = self.cfg
        targets = [v.strip() for v in getattr(cfg, "fail_variants", "").split(",") if v.strip()]
        if targets and cfg.variant not in targets:
            return
        if self.step == cfg.fail_at_step and (cfg.fail_mode == "always" or not self.resumed):
            raise InjectedFault(f"injected fault at step {self.step} (fail_at_step={cfg.fail_at_step})")

    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns the step's metrics as floats (one host sync, at the end)."""
        self.check_fault()
        model = self.model
        model.train()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, extra = self.loss_and_metrics(self.step)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])) if params else torch.zeros(())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step += 1
        loss_value = float(loss.detach())
        self.nonfinite_steps += not math.isfinite(loss_value)
        metrics = {M.STEP: self.step, M.LOSS: loss_value, M.GRAD_NORM: float(grad_norm),
                   M.LR: self.optimizer.param_groups[0]["lr"], M.STEP_TIME_S: time.perf_counter() - t0,
                   M.NONFINITE_STEPS: float(self.nonfinite_steps)}
        metrics.update({k: float(v) for k, v in extra.items()})
        if self.cfg.eval_due(self.step):
            metrics.update(self.evaluate())
        return metrics

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "nonfinite_steps": self.nonfinite_steps,
            "rng": rng_state(),
            "config": self.cfg.flat(),
            "kind": self.cfg.kind,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        set_rng_state(state["rng"])
        self.resumed = True


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
