"""Stand-in encoders: deterministic, seeded, nothing to download.

PAct conditions on DINOv2-L/14-with-registers tokens of the input image (518 px:
1 cls + 4 register tokens + 37x37 patch tokens of width 1024) and generates the
TRELLIS sparse-structure VAE latents of each part ([8, 16, 16, 16] from a 64^3
occupancy). Real users precompute both with those encoders and store them in the
dataset format of format.py. The synthetic generator uses the stand-ins below, which
keep the shapes and the locality (a patch token depends on its patch, a latent cell on
its 4x4x4 block) but are fixed random projections, not learned features.
"""

import math

import numpy as np

IMAGE_ENCODER_SEED = 1234
STRUCTURE_ENCODER_SEED = 4321
# Scale of the structure latents: with it, every latent channel of the synthetic
# generator's objects has a standard deviation of about 1 over a dataset (0.95-1.05,
# measured on the "small" and "pact" presets; tests/test_data.py checks 0.7..1.4).
STRUCTURE_LATENT_SCALE = 1.7

class StandInImageEncoder:
    """Image -> DINOv2-shaped tokens: [prefix_tokens + h*w, cond_channels].

    Patch tokens: the patch's pixels (scaled to [-1, 1]) and a 2D sin/cos code of the
    patch centre, each through a fixed Gaussian projection (unit variance before the
    non-linearity), summed, then tanh. Prefix tokens (stand-ins for cls + registers):
    global image statistics (mean and std colour, mean colour of the four quadrants)
    through one fixed projection plus bias per token, then tanh. Stands in for
    DINOv2-L/14-reg at 518 px (prefix_tokens=5, grid (37, 37), patch 14, C = 1024).
    """

    def __init__(
        self,
        cond_channels: int,
        grid: tuple[int, int],
        prefix_tokens: int = 5,
        patch: int = 14,
        pos_freqs: int = 4,
        seed: int = IMAGE_ENCODER_SEED,
    ) -> None:
        self.cond_channels = cond_channels
        self.grid = (int(grid[0]), int(grid[1]))
        self.prefix_tokens = prefix_tokens
        self.patch = patch
        rng = np.random.Generator(np.random.PCG64(seed))
        pixel_dim = patch * patch * 3
        h, w = self.grid
        ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        angles = np.pi * np.stack([ys.ravel(), xs.ravel()], axis=1)[:, :, None] * 2.0 ** np.arange(pos_freqs)
        pos = np.concatenate([np.sin(angles), np.cos(angles)], axis=2).reshape(h * w, -1)  # [h*w, 4F]
        w_pixel = rng.standard_normal((pixel_dim, cond_channels)) / math.sqrt(pixel_dim)
        w_pos = rng.standard_normal((pos.shape[1], cond_channels)) / math.sqrt(pos.shape[1] / 2)
        self._w_pixel = w_pixel.astype(np.float32)
        self._pos_term = (pos @ w_pos).astype(np.float32)  # [h*w, C], fixed per grid cell
        stats_dim = 3 + 3 + 12
        w_prefix = rng.standard_normal((stats_dim, prefix_tokens * cond_channels)) / math.sqrt(stats_dim)
        self._w_prefix = w_prefix.astype(np.float32)
        self._b_prefix = rng.standard_normal((prefix_tokens, cond_channels)).astype(np.float32)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the encoder takes: grid times patch."""
        return self.grid[0] * self.patch, self.grid[1] * self.patch

    @property
    def num_tokens(self) -> int:
        """L = prefix_tokens + h * w."""
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """image: uint8 [H, W, 3] with (H, W) = image_size -> float32 [L, C], prefix tokens first."""
        if image.dtype != np.uint8 or image.shape != self.image_size + (3,):
            raise ValueError(
                f"the image encoder takes uint8 images of shape {self.image_size + (3,)}, "
                f"got {image.dtype} {image.shape}."
            )
        h, w = self.grid
        p = self.patch
        pixels = image.astype(np.float32) / 127.5 - 1.0
        patches = pixels.reshape(h, p, w, p, 3).transpose(0, 2, 1, 3, 4).reshape(h * w, p * p * 3)
        patch_tokens = np.tanh(patches @ self._w_pixel + self._pos_term)
        halves = np.array_split(pixels, 2, axis=0)
        quadrants = [q.mean(axis=(0, 1)) for half in halves for q in np.array_split(half, 2, axis=1)]
        stats = np.concatenate([pixels.mean(axis=(0, 1)), pixels.std(axis=(0, 1)), *quadrants])
        prefix = np.tanh((stats @ self._w_prefix).reshape(self.prefix_tokens, self.cond_channels) + self._b_prefix)
        return np.concatenate([prefix, patch_tokens], axis=0).astype(np.float32)


class StandInStructureEncoder:
    """Per-part occupancy [K, sub*R, sub*R, sub*R] -> structure latents [K, C, R, R, R].

    Each sub^3 block of the occupancy (64 sub-voxels for sub = 4), as a 0/1 vector, is
    projected with a fixed matrix with orthonormal columns (sub^3 -> C) times
    STRUCTURE_LATENT_SCALE: empty space maps to 0. The matrix is a seeded random
    orthonormal basis of a C-dim subspace that contains the all-ones direction, rotated so
    that every column has the same all-ones component: each channel sees a block's
    occupied fraction with the same weight (so all channels have about the same spread)
    plus its own random sub-voxel pattern. Stands in for the TRELLIS sparse-structure VAE
    encoder (64^3 occupancy -> [8, 16, 16, 16]). Occupancy index order is [k, x, y, z];
    the latents keep it: [k, c, x, y, z].
    """

    def __init__(
        self,
        resolution: int,
        latent_channels: int = 8,
        sub: int = 4,
        scale: float = STRUCTURE_LATENT_SCALE,
        seed: int = STRUCTURE_ENCODER_SEED,
    ) -> None:
        if latent_channels > sub**3:
            raise ValueError(f"latent_channels {latent_channels} exceeds the {sub**3} sub-voxels of a block.")
        self.resolution = resolution
        self.latent_channels = latent_channels
        self.sub = sub
        self.scale = scale
        rng = np.random.Generator(np.random.PCG64(seed))
        basis = rng.standard_normal((sub**3, latent_channels))
        basis[:, 0] = 1.0
        q, r = np.linalg.qr(basis)
        q = q * np.sign(np.diag(r))  # column 0 is +ones / |ones|, the others orthogonal to it
        # Householder reflection with a constant first row: spreads column 0 over all columns.
        v = np.eye(latent_channels)[0] - 1.0 / math.sqrt(latent_channels)
        reflect = np.eye(latent_channels) - 2.0 * np.outer(v, v) / max(v @ v, 1e-12)
        self._proj = (q @ reflect * scale).astype(np.float32)  # [sub^3, C]

    @property
    def occupancy_size(self) -> int:
        """Side of the occupancy grid: sub * R."""
        return self.sub * self.resolution

    def __call__(self, occupancy: np.ndarray) -> np.ndarray:
        """occupancy: bool [K, sub*R, sub*R, sub*R] -> float32 [K, C, R, R, R]."""
        n = self.occupancy_size
        if occupancy.ndim != 4 or occupancy.shape[1:] != (n, n, n):
            raise ValueError(f"occupancy must have shape (K, {n}, {n}, {n}), got {occupancy.shape}.")
        k, r, s = occupancy.shape[0], self.resolution, self.sub
        blocks = occupancy.reshape(k, r, s, r, s, r, s).transpose(0, 1, 3, 5, 2, 4, 6).reshape(k, r, r, r, s**3)
        return np.ascontiguousarray((blocks.astype(np.float32) @ self._proj).transpose(0, 4, 1, 2, 3))
