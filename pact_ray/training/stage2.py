"""Stage2 training: the rectified-flow step on the voxel latents plus PAct's articulation
regression, with the articulation metrics every step and the spatial variants' mask
diagnostics.

The objective of one step, for the batch's voxels V (every row, the whole object's too;
9 latent channels) and part articulation slots A (validity mask of the joint type):

    loss     = flow_loss + art_weight * art_l2
    flow     = mean_{(i, c), i in V} (v_pred - ((1 - sigma_min) eps - x0))^2     (flow.py)
    art_l2   = mean_{(p, s) in A} (a_pred - a)^2

Each object draws one timestep, shared by all its rows (PAct).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pact_ray.data.objects.articulation import SLOT_GROUPS, decode_articulation
from pact_ray.data.objects.loader import ArticulatedDataset, collate_voxels
from pact_ray.data.objects.synthetic import ensure_synthetic
from pact_ray.metrics import names as M
from pact_ray.common.presets import STAGE2_MAX_TOKENS, STAGE2_PRESETS
from pact_ray.models.stage2 import PART_SLOTS, ArticulatedSLatFlow, FeatureAverage, VoxelLayout, build_stage2, mask_moments
from pact_ray.runs.stage2 import Stage2RunConfig
from pact_ray.training import flow
from pact_ray.training.base import Trainer, step_generator
from pact_ray.training.validation import eval_sample_ids, stratified_timesteps, validation_generator

BATCH_KEYS_TO_DEVICE = ("latents", "coords", "num_rows", "cond", "masks", "pixel_masks", "num_parts",
                        "articulation", "art_valid", "part_labels", "joint_types")


def build_model(cfg: Stage2RunConfig) -> ArticulatedSLatFlow:
    """The Stage2 model of a run config (preset + its spatial adapter)."""
    preset = STAGE2_PRESETS[cfg.model]["flow"]
    use_ckpt = preset["use_checkpoint"] if cfg.grad_checkpointing is None else cfg.grad_checkpointing
    return build_stage2(cfg.model, spatial_adapter=cfg.spatial_adapter, use_checkpoint=use_ckpt)


def token_cap(cfg: Stage2RunConfig) -> int | None:
    """Voxel tokens kept per row: the config's max_tokens, else the preset's (None: all)."""
    return cfg.max_tokens or STAGE2_MAX_TOKENS[cfg.model]


def dataset_for(cfg: Stage2RunConfig) -> ArticulatedDataset:
    """The run's dataset (with voxel sets): ``cfg.data`` if given, else the preset's synthetic data (cached)."""
    preset = STAGE2_PRESETS[cfg.model]["flow"]
    # The model's latents are the stored channels plus the ownership channel (collate_voxels).
    expect = {"cond_channels": preset["cond_channels"], "voxel_resolution": preset["resolution"],
              "voxel_channels": preset["in_channels"] - 1, "max_parts": PART_SLOTS}
    folder = Path(cfg.data) if cfg.data else ensure_synthetic(**cfg.synthetic_settings())
    return ArticulatedDataset(folder, expect=expect)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (pred - target)^2 over the True entries of ``mask`` (same shape); 0 when none."""
    sq = (pred - target).pow(2).masked_fill(~mask, 0)
    return sq.sum() / mask.sum().clamp(min=1)


def articulation_metrics(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, joint_types: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Errors of predicted articulation vectors.

    pred, target: [P, 24]; valid: [P, 24] bool (articulation.validity_mask); joint_types,
    labels: [P] target ids. Returns ART_L2 (MSE over valid slots), the MSE of each slot
    group (ART_GROUP_ERRORS; a group with no valid slot, e.g. axis in a batch of fixed
    joints, gives 0) and the accuracies of the decoded joint type and label.
    """
    out = {M.ART_L2: masked_mse(pred, target, valid)}
    for group, name in M.ART_GROUP_ERRORS.items():
        s = SLOT_GROUPS[group]
        out[name] = masked_mse(pred[:, s], target[:, s], valid[:, s])
    decoded = decode_articulation(pred.detach().float())
    out[M.ART_TYPE_ACC] = (decoded["joint_type"] == joint_types).float().mean()
    out[M.ART_LABEL_ACC] = (decoded["label"] == labels).float().mean()
    return out


class Stage2Trainer(Trainer):
    def __init__(self, cfg: Stage2RunConfig, device=None, dataset: ArticulatedDataset | None = None):
        super().__init__(cfg, device)
        self.setup(dataset if dataset is not None else dataset_for(cfg), build_model, "Stage2")
        self.eval_ids = self.val_ids[eval_sample_ids(len(self.val_ids), cfg.eval_samples)]
        self.eval_t = stratified_timesteps(cfg.eval_timesteps)
        self._val_items: list[dict[str, Any]] | None = None  # loaded on the first evaluation, then kept

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of ``step``: a seeded draw of ``batch_size`` objects and of their voxel
        subsample (resume-exact)."""
        return self.draw_batch(step, lambda items, g: collate_voxels(items, token_cap(self.cfg), g), BATCH_KEYS_TO_DEVICE)

    def loss_and_metrics(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg
        b = self.batch(step)
        g = step_generator(cfg.seed, step, stream=1)
        layout = self.model.layout(b["coords"], b["num_rows"])
        num_parts = b["num_parts"].cpu()
        n_obj = num_parts.shape[0]
        t_obj = flow.sample_t(n_obj, g)
        x0 = b["latents"]
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        cond, masks = b["cond"], b["masks"]
        moments, visible = mask_moments(b["pixel_masks"], b["num_parts"])
        if cfg.p_uncond > 0:  # CFG training: drop the image, its mask and the moments derived from it
            drop = (torch.rand(n_obj, generator=g) < cfg.p_uncond).to(self.device)
            cond = torch.where(drop[:, None, None], torch.zeros_like(cond), cond)
            masks = torch.where(drop[:, None, None], torch.zeros_like(masks), masks)
            moments = moments * ~torch.repeat_interleave(drop, num_parts.to(self.device))[:, None]
        flow_loss, art = self.objective(b, layout, t_obj, noise, cond, masks, moments)
        art_loss = cfg.art_weight * art[M.ART_L2]
        metrics = {M.FLOW_LOSS: flow_loss, M.ART_LOSS: art_loss, **art,
                   M.MASK_PARTS: visible.sum(), M.EMPTY: (~visible).sum()}
        if cfg.spatial_moments:  # the spatial rows: mean moments of the batch's visible parts
            mean = (moments * visible[:, None]).sum(0) / visible.sum().clamp(min=1)
            metrics.update(zip(M.MASK_MOMENTS, mean))
        return flow_loss + art_loss, {k: v.detach() for k, v in metrics.items()}

    def objective(self, b: dict[str, torch.Tensor], layout: VoxelLayout, t_obj: torch.Tensor, noise: torch.Tensor,
                  cond: torch.Tensor, masks: torch.Tensor, moments: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The flow MSE over the batch's voxels and the articulation metrics of batch ``b``
        (its ``layout``) noised at per-object timesteps ``t_obj`` [B] with ``noise`` [T, 9]
        (training and validation)."""
        x0 = b["latents"]
        t_obj = t_obj.to(self.device)
        x_t = flow.diffuse(x0, t_obj[layout.voxel_obj], noise)
        out = self.model(x_t, t_obj * flow.T_SCALE, cond, layout, masks)
        flow_loss = (out.velocity.float() - flow.velocity_target(x0, noise)).pow(2).mean()
        pred = self.model.articulate(out.features, layout, moments if self.cfg.spatial_adapter else None).float()
        return flow_loss, articulation_metrics(pred, b["articulation"], b["art_valid"], b["joint_types"], b["part_labels"])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective on the validation samples (conditional, no CFG dropout), object by
        object, at the stratified timesteps with noise and voxel subsample fixed per sample
        (``pact_ray.training.validation``): the same draws for every variant and seed."""
        t0 = time.perf_counter()
        cfg = self.cfg
        if self._val_items is None:
            self._val_items = [self.dataset[int(i)] for i in self.eval_ids]
        self.model.eval()
        sums = {M.VAL_FLOW_LOSS: 0.0, M.VAL_ART_L2: 0.0, M.VAL_ART_TYPE_ACC: 0.0, M.VAL_ART_LABEL_ACC: 0.0}
        for item in self._val_items:
            subsample = validation_generator(cfg.data_seed, item["index"], len(self.eval_t))  # its own stream
            b = {k: v.to(self.device) for k, v in collate_voxels([item], token_cap(cfg), subsample).items() if k in BATCH_KEYS_TO_DEVICE}
            layout = self.model.layout(b["coords"], b["num_rows"])  # built once, used at every timestep
            moments = mask_moments(b["pixel_masks"], b["num_parts"])[0]
            for j, t in enumerate(self.eval_t.tolist()):
                noise = torch.randn(b["latents"].shape, generator=validation_generator(cfg.data_seed, item["index"], j)).to(self.device)
                with self.autocast():
                    flow_loss, art = self.objective(b, layout, torch.tensor([t]), noise, b["cond"], b["masks"], moments)
                for key, value in ((M.VAL_FLOW_LOSS, flow_loss), (M.VAL_ART_L2, art[M.ART_L2]),
                                   (M.VAL_ART_TYPE_ACC, art[M.ART_TYPE_ACC]), (M.VAL_ART_LABEL_ACC, art[M.ART_LABEL_ACC])):
                    sums[key] += float(value)
        self.model.train()
        out = {k: v / (len(self._val_items) * len(self.eval_t)) for k, v in sums.items()}
        out[M.VAL_LOSS] = out[M.VAL_FLOW_LOSS] + cfg.art_weight * out[M.VAL_ART_L2]
        out.update({M.VAL_SAMPLES: float(len(self._val_items)), M.EVAL_TIME_S: time.perf_counter() - t0})
        return out

    @torch.no_grad()
    def sample(self, batch: dict[str, torch.Tensor], steps: int = 25, guidance: float = 3.0, aggregate_last: int = 20,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the voxel latents of ``batch`` (a collate_voxels batch on the device) and
        predict the parts' articulation with multi-step feature aggregation.

        Euler sampling over ``steps`` with classifier-free guidance (negative: zeroed image
        and mask condition; TRELLIS's SLat default strength 3); the conditional pass's
        last-block features are averaged over the last ``aggregate_last`` steps (PAct: 20
        of 25) and the head runs once on the mean. The batch's layout (neighbour maps,
        downsampling) is built once for all the steps. Returns latents [T, 9] and
        articulation [P, 24].
        """
        self.model.eval()
        layout = self.model.layout(batch["coords"], batch["num_rows"])
        average = FeatureAverage(steps, aggregate_last)
        n_obj = batch["num_rows"].shape[0]
        noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(seed)).to(self.device)

        def velocity(x: torch.Tensor, t: torch.Tensor, conditional: bool) -> torch.Tensor:
            cond, masks = batch["cond"], batch["masks"]
            if not conditional:
                cond, masks = torch.zeros_like(cond), torch.zeros_like(masks)
            with self.autocast():  # t: [T], one value for all voxels; the model takes one per object
                out = self.model(x, t[:n_obj], cond, layout, masks)
            if conditional:
                average.add(out.features)
            return out.velocity.float()

        latents = flow.euler_sample(velocity, noise, steps=steps, guidance=guidance)
        moments = mask_moments(batch["pixel_masks"], batch["num_parts"])[0] if self.cfg.spatial_adapter else None
        with self.autocast():
            articulation = self.model.articulate(average.mean, layout, moments)
        return latents, articulation.float()
