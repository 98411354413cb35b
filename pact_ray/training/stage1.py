"""Stage1 training: the rectified-flow step of PAct's structure model, with the OT router's
diagnostics reported every step and the held-out flow loss at the evaluation steps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pact_ray.data.objects.loader import ArticulatedDataset, collate_parts
from pact_ray.data.objects.synthetic import ensure_synthetic
from pact_ray.metrics import names as M
from pact_ray.models.stage1 import STAGE1_PRESETS, PartStructureFlow, build_stage1
from pact_ray.runs.stage1 import Stage1RunConfig
from pact_ray.training import flow
from pact_ray.training.base import Trainer, step_generator
from pact_ray.training.validation import eval_sample_ids, stratified_timesteps, validation_generator

BATCH_KEYS_TO_DEVICE = ("x", "cond", "masks", "num_parts", "part_idx", "images", "pixel_masks")


def build_model(cfg: Stage1RunConfig) -> PartStructureFlow:
    """The Stage1 model of a run config (preset + variant's router)."""
    preset = STAGE1_PRESETS[cfg.model]
    use_ckpt = preset["use_checkpoint"] if cfg.grad_checkpointing is None else cfg.grad_checkpointing
    mask_condition = "none" if cfg.router is not None and cfg.router.mask_prior else "hard"
    return build_stage1(cfg.model, router=cfg.router, mask_condition=mask_condition, use_checkpoint=use_ckpt)


def dataset_for(cfg: Stage1RunConfig) -> ArticulatedDataset:
    """The run's dataset: ``cfg.data`` if given, else the preset's synthetic data (cached)."""
    preset = STAGE1_PRESETS[cfg.model]
    expect = {"resolution": preset["resolution"], "cond_channels": preset["cond_channels"], "latent_channels": preset["in_channels"]}
    folder = Path(cfg.data) if cfg.data else ensure_synthetic(**cfg.synthetic_settings())
    return ArticulatedDataset(folder, expect=expect)


class Stage1Trainer(Trainer):
    def __init__(self, cfg: Stage1RunConfig, device=None, dataset: ArticulatedDataset | None = None):
        super().__init__(cfg, device)
        self.setup(dataset if dataset is not None else dataset_for(cfg), build_model, "Stage1")
        self.eval_ids = self.val_ids[eval_sample_ids(len(self.val_ids), cfg.eval_samples)]
        self.eval_t = stratified_timesteps(cfg.eval_timesteps)
        self._val_items: list[dict[str, Any]] | None = None  # loaded on the first evaluation, then kept

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of ``step``: a seeded draw of ``batch_size`` objects (resume-exact)."""
        return self.draw_batch(step, lambda items, g: collate_parts(items), BATCH_KEYS_TO_DEVICE)

    def loss_and_metrics(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        b = self.batch(step)
        g = step_generator(cfg.seed, step, stream=1)
        num_parts = b["num_parts"]
        n_obj = num_parts.shape[0]
        t_obj = flow.sample_t(n_obj, g)
        noise = torch.randn(b["x"].shape, generator=g).to(self.device)
        cond, masks = b["cond"], b["masks"]
        if cfg.p_uncond > 0:
            drop_obj = torch.rand(n_obj, generator=g) < cfg.p_uncond
            drop = torch.repeat_interleave(drop_obj, num_parts.cpu()).to(self.device)
            cond = torch.where(drop[:, None, None], torch.zeros_like(cond), cond)
            masks = torch.where(drop[:, None, None], torch.zeros_like(masks), masks)
        t = torch.repeat_interleave(t_obj, num_parts.cpu()).to(self.device)
        x0 = b["x"]
        x_t = flow.diffuse(x0, t, noise)
        pred = self.model(x_t, t * flow.T_SCALE, cond, masks, num_parts, b["part_idx"],
                          images=b["images"], pixel_masks=b["pixel_masks"])
        loss = F.mse_loss(pred.float(), flow.velocity_target(x0, noise))
        return loss, self.model.router_diagnostics()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The rectified-flow MSE on the validation samples (conditional, no CFG dropout), at
        the stratified timesteps, with noise fixed per (sample, timestep): the same numbers
        for every variant and seed (``pact_ray.training.validation``). Each sample weighs
        the same whatever its part count: the loss is the mean over samples and timesteps
        of the sample's MSE."""
        t0 = time.perf_counter()
        cfg = self.cfg
        if self._val_items is None:
            self._val_items = [self.dataset[int(i)] for i in self.eval_ids]
        self.model.eval()
        losses = []
        for start in range(0, len(self._val_items), cfg.batch_size):
            items = self._val_items[start : start + cfg.batch_size]
            b = {k: v.to(self.device) for k, v in collate_parts(items).items() if k in BATCH_KEYS_TO_DEVICE}
            x0, num_parts = b["x"], b["num_parts"].cpu()
            for j, t in enumerate(self.eval_t.tolist()):
                noise = torch.cat([torch.randn((len(item["part_labels"]), *x0.shape[1:]),
                                               generator=validation_generator(cfg.data_seed, item["index"], j))
                                   for item in items]).to(self.device)
                t_rows = torch.full((x0.shape[0],), t, device=self.device)
                with self.autocast():
                    pred = self.model(flow.diffuse(x0, t_rows, noise), t_rows * flow.T_SCALE, b["cond"], b["masks"], b["num_parts"],
                                      b["part_idx"], images=b["images"], pixel_masks=b["pixel_masks"])
                sq = (pred.float() - flow.velocity_target(x0, noise)).pow(2).flatten(1).mean(1)  # [N] per part
                per_object = torch.stack([rows.mean() for rows in sq.split(num_parts.tolist())])
                losses.append(per_object)
        val = torch.cat(losses).mean()
        self.model.train()
        return {M.VAL_LOSS: float(val), M.VAL_FLOW_LOSS: float(val), M.VAL_SAMPLES: float(len(self._val_items)),
                M.EVAL_TIME_S: time.perf_counter() - t0}

    @torch.no_grad()
    def sample(self, batch: dict[str, torch.Tensor], steps: int = 25, guidance: float = 7.0, seed: int = 0) -> torch.Tensor:
        """Euler sampling with classifier-free guidance (negative: zeroed image and mask condition)."""
        self.model.eval()
        noise = torch.randn(batch["x"].shape, generator=torch.Generator().manual_seed(seed)).to(self.device)
        kw = dict(num_parts=batch["num_parts"], part_idx=batch["part_idx"], images=batch["images"], pixel_masks=batch["pixel_masks"])

        def velocity(x, t, conditional):
            if conditional:
                return self.model(x, t, batch["cond"], batch["masks"], **kw)
            return self.model(x, t, torch.zeros_like(batch["cond"]), torch.zeros_like(batch["masks"]), **kw)

        return flow.euler_sample(velocity, noise, steps=steps, guidance=guidance)
