"""PAct's image encoder: DINOv2 ViT-L/14 with registers, loaded from a local weights file.

PAct (pact_i23d_gen_pipe.py, commit d974309) conditions on
``torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14_reg")``: the conditioning image
(the 518 px alpha-box crop on black, ``/ 255``) is normalised with ImageNet's mean and std,
run through the ViT, and the tokens before its final norm (``x_prenorm``) are layer-normed
without affine parameters. At 518 px that is [1374, 1024]: cls, 4 registers, 37 x 37 patches.

The architecture is Hugging Face transformers' ``Dinov2WithRegistersModel`` (timm has it
too, but timm imports torchvision, whose only wheels that match this project's CPU torch
link CUDA libraries). Nothing is fetched at run time: the user gives the weights file, either

- Meta's release, ``dinov2_vitl14_reg4_pretrain.pth`` (what ``torch.hub`` downloads for
  PAct; https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth), or
- Hugging Face's ``model.safetensors`` of ``facebook/dinov2-with-registers-large``.

Both are read into Meta's key names, checked against the expected architecture (one
sentence naming the file and the first key that does not fit), then renamed for the model.
The renaming is written here because neither library ships it as an API (transformers'
conversion script is a download-and-compare script, not a function to call).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pact_ray.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # PAct's image_cond_model_transform
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dinov2Arch:
    """A DINOv2 ViT with registers, at the one image size it is run at (no interpolation)."""

    width: int
    depth: int
    heads: int
    registers: int
    patch: int
    grid: int
    mlp_ratio: int = 4

    @property
    def image_size(self) -> int:
        return self.patch * self.grid

    @property
    def prefix_tokens(self) -> int:
        return 1 + self.registers

    @property
    def num_tokens(self) -> int:
        return self.prefix_tokens + self.grid * self.grid

    @property
    def name(self) -> str:
        if self == PACT_ARCH:
            return "DINOv2 ViT-L/14 with 4 registers at 518 px (dinov2_vitl14_reg)"
        return (f"a DINOv2 ViT with {self.registers} registers (width {self.width}, {self.depth} blocks, "
                f"patch {self.patch}) at {self.image_size} px")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Meta's key names -> shapes (``mask_token``, used only in pre-training, is optional)."""
        c, h = self.width, self.width * self.mlp_ratio
        shapes: dict[str, tuple[int, ...]] = {
            "cls_token": (1, 1, c),
            "pos_embed": (1, 1 + self.grid * self.grid, c),
            "register_tokens": (1, self.registers, c),
            "patch_embed.proj.weight": (c, 3, self.patch, self.patch),
            "patch_embed.proj.bias": (c,),
            "norm.weight": (c,),
            "norm.bias": (c,),
        }
        block = {"norm1.weight": (c,), "norm1.bias": (c,), "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,),
                 "attn.proj.weight": (c, c), "attn.proj.bias": (c,), "ls1.gamma": (c,), "norm2.weight": (c,),
                 "norm2.bias": (c,), "mlp.fc1.weight": (h, c), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (c, h),
                 "mlp.fc2.bias": (c,), "ls2.gamma": (c,)}
        for i in range(self.depth):
            shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
        return shapes


PACT_ARCH = Dinov2Arch(width=1024, depth=24, heads=16, registers=4, patch=14, grid=37)
OPTIONAL_KEYS = ("mask_token",)


def arch_for(preset: str) -> Dinov2Arch:
    """The encoder that gives a preset's condition tokens: PAct's ViT-L for "pact"; for the
    CPU presets a two-block DINOv2 of the preset's width, grid and patch (random weights in
    tests and smoke runs, not a pretrained model)."""
    from pact_ray.common.presets import CONDITION_PRESETS, STAGE1_PRESETS

    if preset == "pact":
        return PACT_ARCH
    condition = CONDITION_PRESETS[preset]
    width, grid = STAGE1_PRESETS[preset]["cond_channels"], condition["grid"][0]
    return Dinov2Arch(width=width, depth=2, heads=max(1, width // 32), registers=condition["prefix_tokens"] - 1,
                      patch=condition["image_size"][0] // grid, grid=grid)


# ---------------------------------------------------------------- reading a weights file

# Hugging Face's names (transformers 4.x and 5.x) -> Meta's, per block.
_HF_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "attention.o_proj": "attn.proj", "attention.output.dense": "attn.proj",
}
_HF_QKV = {"attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
           "attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_META_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+\..+)$")  # block_chunks > 0: blocks.<chunk>.<i>.<rest>


def _read_file(path: Path) -> dict[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the file's fault here
        raise DataError(f"{path}: cannot be read as a PyTorch (weights_only) or safetensors weights file "
                        f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}).") from exc
    # A training checkpoint keeps the weights one level down (DINOv2's own: "teacher", with
    # "backbone." names); a released file is the state dict itself.
    for wrapper in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: holds no state dict of tensors, so it is not DINOv2 weights.")
    if all(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items()}
    return state


def _meta_names(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """A state dict in Meta's or Hugging Face's naming -> Meta's naming."""
    import torch

    if any(k.endswith("embeddings.cls_token") for k in state):  # Hugging Face
        prefix = next(k for k in state if k.endswith("embeddings.cls_token"))[: -len("embeddings.cls_token")]
        out: dict[str, Any] = {}
        qkv: dict[tuple[int, str], dict[int, Any]] = {}
        for key, value in state.items():
            if not key.startswith(prefix):
                out[key] = value  # reported as not DINOv2's below
                continue
            key = key[len(prefix):]
            if key in _HF_TOP:
                out[_HF_TOP[key]] = value
            elif (m := _HF_LAYER.match(key)) is not None:
                i, name, kind = m.groups()
                if name in _HF_QKV:
                    qkv.setdefault((int(i), kind), {})[_HF_QKV[name]] = value
                elif kind == "lambda1" and f"{name}.lambda1" in _HF_BLOCK:
                    out[f"blocks.{i}.{_HF_BLOCK[name + '.lambda1']}"] = value
                else:
                    out[f"blocks.{i}.{_HF_BLOCK.get(name, name)}.{kind}"] = value
            else:
                out[key] = value
        for (i, kind), parts in qkv.items():
            if sorted(parts) != [0, 1, 2]:
                raise DataError(f"{path}: block {i}'s attention lacks one of its query, key and value {kind}s.")
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], 0)
        return out
    return {f"blocks.{m.group(1)}" if (m := _META_CHUNKED.match(key)) else key: value for key, value in state.items()}


def read_weights(path: str | Path, arch: Dinov2Arch = PACT_ARCH) -> dict[str, Any]:
    """The weights of `arch` from `path` (Meta's .pth or Hugging Face's .safetensors), in
    Meta's key names, float32. A file of another model raises DataError naming the file and
    the first key that does not fit."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such weights file.")
    state = _meta_names(_read_file(path), path)
    expected = arch.shapes()
    if "patch_embed.proj.weight" not in state or not any(k.startswith("blocks.") for k in state):
        some = ", ".join(repr(k) for k in list(state)[:3])
        raise DataError(f"{path}: is not a DINOv2 checkpoint (no 'patch_embed.proj.weight' or blocks; it holds {some}, ...).")
    if "register_tokens" not in state:
        raise DataError(f"{path}: is DINOv2 without register tokens, but the encoder is {arch.name}.")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit())
    if depth != arch.depth:
        raise DataError(f"{path}: has {depth} transformer blocks, but {arch.name} has {arch.depth}.")
    for key, shape in expected.items():
        if key not in state:
            raise DataError(f"{path}: lacks {key!r}, which {arch.name} has.")
        if tuple(state[key].shape) != shape:
            raise DataError(f"{path}: {key!r} has shape {list(state[key].shape)}, but {arch.name} needs {list(shape)}.")
    extra = sorted(set(state) - set(expected) - set(OPTIONAL_KEYS))
    if extra:
        raise DataError(f"{path}: holds {extra[0]!r}, which {arch.name} does not have.")
    out = {}
    for key in expected:
        value = state[key]
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise DataError(f"{path}: {key!r} is not finite floating point.")
        out[key] = value.float()
    return out


def file_digest(path: str | Path) -> str:
    """sha256 of a file (recorded with the data it encoded)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hf_state_dict(meta: dict[str, Any], arch: Dinov2Arch) -> dict[str, Any]:
    """Meta's key names -> transformers 5's ``Dinov2WithRegistersModel`` names."""
    top = {v: k for k, v in _HF_TOP.items()}
    out = {top[k]: v for k, v in meta.items() if not k.startswith("blocks.")}
    out.setdefault("embeddings.mask_token", meta["cls_token"].new_zeros(1, arch.width))
    block = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "attn.proj": "attention.o_proj"}
    for i in range(arch.depth):
        p, q = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for meta_name, hf_name in block.items():
                out[f"{q}{hf_name}.{kind}"] = meta[f"{p}{meta_name}.{kind}"]
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{q}attention.{name}.{kind}"] = meta[f"{p}attn.qkv.{kind}"].chunk(3, 0)[j]
        out[f"{q}layer_scale1.lambda1"] = meta[f"{p}ls1.gamma"]
        out[f"{q}layer_scale2.lambda1"] = meta[f"{p}ls2.gamma"]
    return out


# ---------------------------------------------------------------- the encoder


class Dinov2ImageEncoder:
    """Image -> PAct's condition tokens: uint8 [H, W, 3] at ``image_size`` -> float32
    [num_tokens, width], cls and registers first (``F.layer_norm`` of ``x_prenorm``).

    ``weights``: a file (read_weights) or a state dict in Meta's names; ``dtype`` float64 is
    for tests; ``batch_size`` images go through the ViT at once.
    """

    def __init__(self, weights: str | Path | dict[str, Any], arch: Dinov2Arch = PACT_ARCH, *,
                 device: str = "cpu", dtype: Any = None, batch_size: int = 4) -> None:
        import torch
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        meta = weights if isinstance(weights, dict) else read_weights(weights, arch)
        config = Dinov2WithRegistersConfig(
            hidden_size=arch.width, num_hidden_layers=arch.depth, num_attention_heads=arch.heads,
            mlp_ratio=arch.mlp_ratio, num_register_tokens=arch.registers, patch_size=arch.patch,
            image_size=arch.image_size, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
            use_swiglu_ffn=False, attn_implementation="sdpa")
        with torch.device("meta"):
            model = Dinov2WithRegistersModel(config)
        model.load_state_dict(hf_state_dict(meta, arch), strict=True, assign=True)
        self.dtype = dtype or torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.arch, self.device, self.batch_size = arch, device, int(batch_size)
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=self.dtype, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=self.dtype, device=device).view(1, 3, 1, 1)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.arch.image_size, self.arch.image_size

    @property
    def num_tokens(self) -> int:
        return self.arch.num_tokens

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 (or the encoder's dtype) [B, num_tokens, width]."""
        import torch
        import torch.nn.functional as F

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.image_size + (3,):
            raise ValueError(f"the DINOv2 encoder takes uint8 images of shape [B, {self.image_size[0]}, "
                             f"{self.image_size[1]}, 3], got {images.dtype} {list(images.shape)}.")
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                x = torch.tensor(images[start:start + self.batch_size], device=self.device)
                x = (x.permute(0, 3, 1, 2).to(self.dtype) / 255 - self._mean) / self._std
                prenorm = self.model.encoder(self.model.embeddings(x)).last_hidden_state
                out.append(F.layer_norm(prenorm, prenorm.shape[-1:]).cpu())
        dtype = np.float64 if self.dtype == torch.float64 else np.float32
        return torch.cat(out).numpy().astype(dtype, copy=False)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> [num_tokens, width]."""
        return self.encode(np.asarray(image)[None])[0]
