"""Action-conditioned next-frame world models of the arm (``docs/specs/world_model.md``).

Both models see C context frames and a discrete action (STAY, MOVE+, MOVE-) and predict
the next frame patch by patch. Frames are ``[N, 3, H, W]`` floats in [0, 1], the motor
strip included; patches are ``[N, L, p*p*3]`` in raster order (MAE's ``patchify`` layout),
``L = (H / p)^2``.

- :class:`MaskedWorldModel` (the evaluation report's iteration 3, after facebookresearch/mae): a ViT
  encoder over the context frames' patches plus an action token; a decoder gets the
  encoded tokens, a mask token at every target patch (and at every masked context patch)
  and reconstructs all of them at once. Mask strategies: ``target`` masks the whole
  target frame; ``target_random`` also masks a random ``context_mask_ratio`` of the
  context patches while training (MAE's per-sample random masking), so that the model
  cannot copy the last frame patch for patch. At inference the whole context is visible.
  The loss is the pixel MSE over every masked patch.
- :class:`AutoregressiveWorldModel` (the evaluation report's iteration 2, the comparison target): a
  prefix-LM transformer over [action, context patches, target patches]; the prefix sees
  itself, target patch i sees the prefix and the target patches before it and predicts
  patch i. Trained teacher-forced; :meth:`~AutoregressiveWorldModel.predict` generates
  free-running (its own patches fed back), which is what the metrics score, and
  :meth:`~AutoregressiveWorldModel.predict_teacher_forced` gives the teacher-forced
  frame for the TF/FR gap.

Sizes are named presets (factory functions below): ``tiny`` for tests, ``small`` for
CPU sweeps, ``reference`` the sizes of the evaluation report (``docs/design/world_model_eval_report.txt``;
MAE: embed 384, depth 8, decoder 192 x 4; GPT: 384 x 12).
The :class:`WorldModelConfig` is saved in every checkpoint, so a model is rebuilt exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pact_ray.models.world_model_config import (  # noqa: F401 - the config lives there, torch-free
    MASKS,
    MODEL_TYPES,
    PRESET_NAMES,
    PRESETS,
    WorldModelConfig,
    gpt_reference,
    gpt_small,
    gpt_tiny,
    mae_reference,
    mae_small,
    mae_tiny,
    preset_config,
)

# ---------------------------------------------------------------------- blocks

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x: [N, S, D]; attn_mask: [S, S] bool, True where query i may attend to key j.

        cache: keys and values of earlier tokens ([N, heads, S', D/heads] under "k" and "v",
        empty at first); x's own are appended to it and x attends to all of them (incremental
        decoding: every cached token comes before x).
        """
        n, s, d = x.shape
        q, k, v = self.qkv(x).reshape(n, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [N, heads, S, D/heads]
        return self.proj(out.transpose(1, 2).reshape(n, s, d))


class Block(nn.Module):
    """Pre-norm transformer block (ViT / timm layout)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask, cache)
        return x + self.mlp(self.norm2(x))


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding of a grid x grid patch raster: [grid^2, dim]
    (MAE's ``get_2d_sincos_pos_embed``: half the channels encode the row, half the column)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    r, c = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()


def _init_weights(m: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linear layers, zero biases, unit layer norms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by shuffling (MAE's ``random_masking``).

    x: [N, L, D] -> (kept tokens [N, K, D] with K = int(L * (1 - mask_ratio)),
    mask [N, L] with 1 = masked, ids_restore [N, L] that un-shuffles [kept, masked]).
    The noise is drawn on the CPU from ``generator`` (resume-exact), then moved to x's device.
    """
    n, length, d = x.shape
    if mask_ratio == 0:
        restore = torch.arange(length, device=x.device).expand(n, length)
        return x, torch.zeros(n, length, device=x.device), restore
    keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, generator=generator).to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


# ---------------------------------------------------------------------- models

class WorldModel(nn.Module):
    """What both models share: the config, (un)patchify, and the predict / loss interface."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.grid = cfg.image_size // cfg.patch_size
        self.num_patches = self.grid**2
        self.patch_dim = cfg.patch_size**2 * cfg.in_chans

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, 3, H, W] -> [N, L, p*p*3]."""
        p, g = self.cfg.patch_size, self.grid
        x = imgs.reshape(imgs.shape[0], self.cfg.in_chans, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], g * g, self.patch_dim)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, p*p*3] -> [N, 3, H, W]."""
        p, g = self.cfg.patch_size, self.grid
        x = x.reshape(x.shape[0], g, g, p, p, self.cfg.in_chans)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.cfg.in_chans, g * p, g * p)

    def patchify_context(self, context: torch.Tensor) -> torch.Tensor:
        """context: [N, C, 3, H, W] -> [N, C*L, p*p*3] (frame-major)."""
        n, c = context.shape[:2]
        return self.patchify(context.flatten(0, 1)).reshape(n, c * self.num_patches, self.patch_dim)

    def training_loss(self, context: torch.Tensor, action: torch.Tensor, target: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The scalar training loss of a batch (context [N, C, 3, H, W], action [N], target [N, 3, H, W])."""
        raise NotImplementedError

    def predict(self, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The predicted next frame [N, 3, H, W] (unclamped) of context [N, C, 3, H, W] under action [N]."""
        raise NotImplementedError


class MaskedWorldModel(WorldModel):
    """The MAE world model; see the module docstring."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__(cfg)
        d, dd, c = cfg.embed_dim, cfg.decoder_embed_dim, cfg.context_frames
        # encoder
        self.patch_embed = nn.Linear(self.patch_dim, d)
        self.action_embed = nn.Embedding(cfg.num_actions, d)
        self.frame_embed = nn.Parameter(torch.zeros(c, d))  # which context frame a patch is from
        self.register_buffer("pos_embed", sincos_pos_embed(d, self.grid), persistent=False)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        # decoder
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(dd))
        self.decoder_frame_embed = nn.Parameter(torch.zeros(c + 1, dd))  # context frames, then the target
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dd, self.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, self.patch_dim)
        self.apply(_init_weights)
        for p in (self.frame_embed, self.mask_token, self.decoder_frame_embed, self.action_embed.weight):
            nn.init.normal_(p, std=0.02)

    def forward_encoder(self, context: torch.Tensor, action: torch.Tensor, mask_ratio: float,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """context: [N, C, 3, H, W], action: [N] -> (latent [N, 1 + K, D] (action token first),
        context mask [N, C*L] (1 = masked), ids_restore [N, C*L])."""
        n, c = context.shape[:2]
        x = self.patch_embed(self.patchify_context(context))  # [N, C*L, D]
        x = x + (self.pos_embed[None] + self.frame_embed[:, None]).reshape(1, c * self.num_patches, -1)
        x, mask, ids_restore = random_masking(x, mask_ratio, generator)
        x = torch.cat([self.action_embed(action)[:, None], x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: [N, 1 + K, D], ids_restore: [N, C*L] -> pixel predictions [N, (C+1)*L, p*p*3]
        of every context patch, then every target patch."""
        x = self.decoder_embed(latent)  # [N, 1 + K, Dd]
        n, kept = x.shape[0], x.shape[1] - 1
        n_ctx = ids_restore.shape[1]
        ctx = torch.cat([x[:, 1:], self.mask_token.expand(n, n_ctx - kept, -1)], dim=1)
        ctx = torch.gather(ctx, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # un-shuffle
        tokens = torch.cat([ctx, self.mask_token.expand(n, self.num_patches, -1)], dim=1)  # + the target
        frames = self.decoder_frame_embed.shape[0]
        tokens = tokens + (self.decoder_pos_embed[None] + self.decoder_frame_embed[:, None]).reshape(1, frames * self.num_patches, -1)
        x = torch.cat([x[:, :1], tokens], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x)[:, 1:])

    def forward_loss(self, context: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """context: [N, C, 3, H, W], target: [N, 3, H, W], pred: [N, (C+1)*L, p*p*3],
        mask: [N, (C+1)*L] (1 = masked) -> the mean over masked patches of their pixel MSE."""
        truth = torch.cat([self.patchify_context(context), self.patchify(target)], dim=1)
        per_patch = ((pred.float() - truth) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, context: torch.Tensor, action: torch.Tensor, target: torch.Tensor, mask_ratio: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, pred [N, (C+1)*L, p*p*3], mask [N, (C+1)*L]); mask_ratio masks that fraction
        of the context patches as well as the whole target."""
        latent, ctx_mask, ids_restore = self.forward_encoder(context, action, mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        mask = torch.cat([ctx_mask, torch.ones(ctx_mask.shape[0], self.num_patches, device=ctx_mask.device)], dim=1)
        return self.forward_loss(context, target, pred, mask), pred, mask

    def training_loss(self, context, action, target, generator=None):
        return self(context, action, target, self.cfg.train_mask_ratio, generator)[0]

    def predict(self, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        latent, _, ids_restore = self.forward_encoder(context, action, 0.0)
        return self.unpatchify(self.forward_decoder(latent, ids_restore)[:, -self.num_patches:])


class AutoregressiveWorldModel(WorldModel):
    """The GPT baseline; see the module docstring."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__(cfg)
        d, c, L = cfg.embed_dim, cfg.context_frames, self.num_patches
        self.patch_embed = nn.Linear(self.patch_dim, d)
        self.action_embed = nn.Embedding(cfg.num_actions, d)
        self.start_token = nn.Parameter(torch.zeros(d))  # fed at target position 0
        self.frame_embed = nn.Parameter(torch.zeros(c + 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed(d, self.grid), persistent=False)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.patch_dim)
        self.prefix = 1 + c * L  # action token + context patches
        s = self.prefix + L
        i, j = torch.arange(s)[:, None], torch.arange(s)[None]
        self.register_buffer("attn_mask", (j < self.prefix) | (j <= i), persistent=False)  # [S, S] prefix-LM
        self.apply(_init_weights)
        for p in (self.start_token, self.frame_embed, self.action_embed.weight):
            nn.init.normal_(p, std=0.02)

    def forward_tokens(self, context: torch.Tensor, action: torch.Tensor, target_patches: torch.Tensor) -> torch.Tensor:
        """context: [N, C, 3, H, W], action: [N], target_patches: [N, L, p*p*3] (the patches fed
        back; patch i only influences predictions of patches > i) -> predictions [N, L, p*p*3]."""
        n, c = context.shape[:2]
        pos = self.pos_embed[None] + self.frame_embed[:, None]  # [C+1, L, D]
        ctx = self.patch_embed(self.patchify_context(context)) + pos[:c].reshape(1, c * self.num_patches, -1)
        fed = torch.cat([self.start_token.expand(n, 1, -1), self.patch_embed(target_patches[:, :-1])], dim=1)
        x = torch.cat([self.action_embed(action)[:, None], ctx, fed + pos[c]], dim=1)
        for blk in self.blocks:
            x = blk(x, self.attn_mask)
        return self.head(self.norm(x)[:, self.prefix:])

    def forward(self, context: torch.Tensor, action: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: -> (loss, pred [N, L, p*p*3]); the loss is the pixel MSE of the target."""
        truth = self.patchify(target)
        pred = self.forward_tokens(context, action, truth)
        return F.mse_loss(pred.float(), truth), pred

    def training_loss(self, context, action, target, generator=None):
        return self(context, action, target)[0]

    def predict_teacher_forced(self, context: torch.Tensor, action: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Every patch predicted from the true patches before it: [N, 3, H, W]."""
        return self.unpatchify(self.forward_tokens(context, action, self.patchify(target)))

    def predict(self, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Free-running generation in raster order: [N, 3, H, W]. The prefix is encoded once,
        then one token per patch is decoded against the cached keys and values (the same
        attention pattern as :meth:`forward_tokens`)."""
        n, c = context.shape[:2]
        pos = self.pos_embed[None] + self.frame_embed[:, None]  # [C+1, L, D]
        ctx = self.patch_embed(self.patchify_context(context)) + pos[:c].reshape(1, c * self.num_patches, -1)
        x = torch.cat([self.action_embed(action)[:, None], ctx], dim=1)
        caches: list[dict[str, torch.Tensor]] = [{} for _ in self.blocks]
        for blk, cache in zip(self.blocks, caches):  # the prefix attends to itself only
            x = blk(x, cache=cache)
        token = (self.start_token + pos[c, 0]).expand(n, 1, -1)
        patches = []
        for i in range(self.num_patches):
            x = token
            for blk, cache in zip(self.blocks, caches):
                x = blk(x, cache=cache)
            patches.append(self.head(self.norm(x)))  # [N, 1, p*p*3]
            if i + 1 < self.num_patches:
                token = self.patch_embed(patches[-1]) + pos[c, i + 1]
        return self.unpatchify(torch.cat(patches, dim=1))


def build_world_model(cfg: WorldModelConfig) -> WorldModel:
    return {"mae": MaskedWorldModel, "gpt": AutoregressiveWorldModel}[cfg.validate().model_type](cfg)
