"""PAct's image encoder (pact_ray/data/objects/dinov2.py): DINOv2 with registers from a local
weights file, at a small size with random weights.

The reference below is DINOv2's forward written from Meta's code (facebookresearch/dinov2,
models/vision_transformer.py and layers/: patch conv, cls + pos_embed, registers after the
position embedding, pre-norm blocks with fused qkv and LayerScale, exact GELU) followed by
PAct's ``F.layer_norm(x_prenorm)``; the encoder runs Hugging Face's implementation on the
renamed weights, so agreement checks the renaming, the token order and the preprocessing.
Both run in float64, where their different operation orders differ by rounding only
(tests/numerics.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_path
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import FLOAT64, assert_within_rounding, transformer_ops
from safetensors.torch import save_file

from pact_ray.data.objects import dinov2, pact
from pact_ray.data.objects.dinov2 import IMAGENET_MEAN, IMAGENET_STD, PACT_ARCH, Dinov2Arch, Dinov2ImageEncoder
from pact_ray.data.objects.format import load_sample, read_dataset_spec, sample_path
from pact_ray.data.objects.synthetic import main as object_data_main
from pact_ray.errors import DataError

TINY = dinov2.arch_for("tiny")


def random_meta_weights(arch: Dinov2Arch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in Meta's key names (LayerScale and norms away from 1 so that a swapped
    or dropped tensor shows)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(shape, generator=g) * (0.5 if k.endswith(("gamma", "norm1.weight", "norm2.weight")) else 0.2)
           for k, shape in arch.shapes().items()}
    out["mask_token"] = torch.zeros(1, arch.width)
    return out


def reference_tokens(w: dict[str, torch.Tensor], arch: Dinov2Arch, images: np.ndarray) -> torch.Tensor:
    """Meta's DINOv2 forward (x_prenorm), then PAct's affine-free layer norm; float64."""
    w = {k: v.double() for k, v in w.items()}
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    x = (x - torch.tensor(IMAGENET_MEAN, dtype=FLOAT64).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD, dtype=FLOAT64).view(1, 3, 1, 1)
    x = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=arch.patch).flatten(2).transpose(1, 2)
    b, c, heads = x.shape[0], arch.width, arch.heads
    x = torch.cat([w["cls_token"].expand(b, -1, -1), x], 1) + w["pos_embed"]
    x = torch.cat([x[:, :1], w["register_tokens"].expand(b, -1, -1), x[:, 1:]], 1)
    n = x.shape[1]
    for i in range(arch.depth):
        p = lambda name: w[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (c,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + p("ls1.gamma") * F.linear(a.transpose(1, 2).reshape(b, n, c), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (c,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        x = x + p("ls2.gamma") * h
    return F.layer_norm(x, (c,))


def images_for(arch: Dinov2Arch, count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, arch.image_size, arch.image_size, 3), dtype=np.uint8)


def hf_names(meta: dict[str, torch.Tensor], arch: Dinov2Arch, *, v4: bool = False, prefix: str = "") -> dict[str, torch.Tensor]:
    """The same weights in Hugging Face's names (transformers 5, or 4 with fused-module names)."""
    out = dinov2.hf_state_dict(meta, arch)
    if v4:
        renames = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
                   "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}
        for old, new in renames.items():
            out = {k.replace(old, new): v for k, v in out.items()}
    return {prefix + k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- the forward pass


def test_tokens_are_meta_dinov2s_x_prenorm_layer_normed():
    weights = random_meta_weights(TINY)
    images = images_for(TINY, 3)
    encoder = Dinov2ImageEncoder(weights, TINY, dtype=FLOAT64, batch_size=2)  # two batches: 2 + 1
    actual = torch.from_numpy(encoder.encode(images))
    expected = reference_tokens(weights, TINY, images)
    assert actual.shape == (3, TINY.num_tokens, TINY.width) == (3, 1 + 4 + 6 * 6, 64)
    assert_within_rounding(actual, expected, ops=transformer_ops(TINY.width, TINY.num_tokens, TINY.depth),
                           gain=10.0 ** TINY.depth, what="DINOv2 tokens")
    # Order: cls, registers, then patches row by row: a change in the top-left patch moves
    # patch token 0 (index 5) most among the patches.
    changed = images.copy()
    changed[0, : TINY.patch, : TINY.patch] = 255 - changed[0, : TINY.patch, : TINY.patch]
    delta = (torch.from_numpy(encoder.encode(changed[:1])) - actual[:1]).abs().sum(-1)[0]
    assert int(delta[TINY.prefix_tokens:].argmax()) == 0


def test_float32_tokens_are_normed_per_token():
    encoder = Dinov2ImageEncoder(random_meta_weights(TINY), TINY)
    tokens = torch.from_numpy(encoder(images_for(TINY, 1)[0]))
    assert tokens.dtype == torch.float32 and tokens.shape == (TINY.num_tokens, TINY.width)
    # F.layer_norm without affine: per token mean 0 and (biased) variance 1 / (1 + eps / var).
    assert float(tokens.mean(-1).abs().max()) < 1e-5
    assert float((tokens.var(-1, unbiased=False) - 1).abs().max()) < 1e-3


def test_pacts_architecture_and_token_count():
    assert (PACT_ARCH.image_size, PACT_ARCH.num_tokens, PACT_ARCH.width) == (518, 1374, 1024)
    from pact_ray.common.presets import CONDITION_PRESETS, STAGE1_PRESETS

    for preset in ("tiny", "small", "pact"):
        arch, condition = dinov2.arch_for(preset), CONDITION_PRESETS[preset]
        assert (arch.grid, arch.grid) == tuple(condition["grid"])
        assert (arch.image_size,) * 2 == tuple(condition["image_size"])
        assert arch.prefix_tokens == condition["prefix_tokens"]
        assert arch.width == STAGE1_PRESETS[preset]["cond_channels"]


# ---------------------------------------------------------------- weights files


@settings(max_examples=15, deadline=None)
@given(width_heads=st.sampled_from([(8, 1), (16, 2), (24, 3)]), depth=st.integers(1, 3), registers=st.integers(1, 4),
       flavour=st.sampled_from(["meta", "meta-chunked", "meta-teacher", "hf5", "hf4", "hf5-prefixed"]))
def test_every_file_flavour_reads_back_metas_tensors(tmp_path_factory, width_heads, depth, registers, flavour):
    arch = Dinov2Arch(width=width_heads[0], depth=depth, heads=width_heads[1], registers=registers, patch=2, grid=2)
    meta = random_meta_weights(arch, seed=depth)
    folder = tmp_path_factory.mktemp("w")
    if flavour.startswith("meta"):
        state = dict(meta)
        if flavour == "meta-chunked":  # block_chunks=2: blocks.<chunk>.<i>.
            state = {(f"blocks.{int(k.split('.')[1]) % 2}.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
                     for k, v in meta.items()}
        if flavour == "meta-teacher":  # a DINOv2 training checkpoint
            state = {"teacher": {f"backbone.{k}": v for k, v in meta.items()}, "iteration": torch.tensor(5)}
        path = folder / "w.pth"
        torch.save(state, path)
    else:
        path = folder / "model.safetensors"
        save_file(hf_names(meta, arch, v4=flavour == "hf4", prefix="dinov2." if "prefixed" in flavour else ""), str(path))
    back = dinov2.read_weights(path, arch)
    assert set(back) == set(arch.shapes())
    for key, value in back.items():
        assert torch.equal(value, meta[key]), key


def _save(tmp_path: Path, state) -> Path:
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    return path


WRONG = {
    "not DINOv2": (lambda: {"blocks.0.weight": torch.zeros(2), "head.weight": torch.zeros(3)},
                   "is not a DINOv2 checkpoint"),
    "no registers": (lambda: {k: v for k, v in random_meta_weights(TINY).items() if k != "register_tokens"},
                     "is DINOv2 without register tokens"),
    "other width": (lambda: random_meta_weights(Dinov2Arch(32, 2, 1, 4, TINY.patch, TINY.grid)),
                    "'cls_token' has shape [1, 1, 32], but a DINOv2 ViT with 4 registers (width 64"),
    "other depth": (lambda: random_meta_weights(Dinov2Arch(TINY.width, 3, 2, 4, TINY.patch, TINY.grid)),
                    "has 3 transformer blocks"),
    "other size": (lambda: random_meta_weights(Dinov2Arch(TINY.width, 2, 2, 4, TINY.patch, TINY.grid + 1)),
                   "'pos_embed' has shape [1, 50, 64]"),
    "SwiGLU MLP": (lambda: {**random_meta_weights(TINY), "blocks.0.mlp.w12.weight": torch.zeros(4, 4)},
                   "holds 'blocks.0.mlp.w12.weight', which"),
    "not finite": (lambda: {**random_meta_weights(TINY), "norm.weight": torch.full((TINY.width,), math.nan)},
                   "'norm.weight' is not finite floating point"),
    "not tensors": (lambda: {"epoch": 3}, "holds no state dict of tensors"),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrong_weights_are_one_sentence_naming_the_file(tmp_path, case):
    make, expected = WRONG[case]
    path = _save(tmp_path, make())
    with pytest.raises(DataError) as info:
        dinov2.read_weights(path, TINY)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, message


def test_unreadable_and_pickled_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="garbage.pth: cannot be read as a PyTorch"):
        dinov2.read_weights(garbage, TINY)
    pickled = tmp_path / "pickled.pth"
    torch.save({"cls_token": Path("x")}, pickled)  # weights_only refuses arbitrary objects
    with pytest.raises(DataError, match="pickled.pth: cannot be read"):
        dinov2.read_weights(pickled, TINY)
    with pytest.raises(DataError, match="missing.pth: no such weights file"):
        dinov2.read_weights(tmp_path / "missing.pth", TINY)


# ---------------------------------------------------------------- from-pact --image-encoder dinov2


ROOT = fixture_path("pact_layout_tiny_expected.pt").parent / "pact_layout_tiny" / "data" / "StorageFurniture"


def test_from_pact_encodes_views_with_the_given_dinov2(tmp_path, capsys):
    weights = random_meta_weights(TINY, seed=3)
    path = _save(tmp_path, weights)
    out = tmp_path / "out"
    argv = ["from-pact", str(ROOT), "--out", str(out), "--preset", "tiny", "--workers", "1",
            "--image-encoder", "dinov2", "--encoder-weights", str(path)]
    assert object_data_main(argv) == 0, capsys.readouterr().err
    spec = read_dataset_spec(out)
    recorded = spec.generator["image_encoder"]
    assert recorded["name"] == "dinov2" and recorded["sha256"] == dinov2.file_digest(path)
    assert recorded["weights"] == str(path.resolve()) and "registers" in recorded["architecture"]
    encoder = Dinov2ImageEncoder(weights, TINY)
    for index in (0, spec.num_samples - 1):
        sample = load_sample(sample_path(out, index), spec)
        assert np.array_equal(sample["cond"], encoder(sample["image"]).astype(np.float16))


@pytest.mark.parametrize("case", ["wrong model", "no weights", "weights without dinov2"])
def test_from_pact_refuses_encoder_input_before_writing(tmp_path, capsys, case):
    wrong = _save(tmp_path, random_meta_weights(Dinov2Arch(32, 2, 1, 4, TINY.patch, TINY.grid)))
    flags = {"wrong model": ["--image-encoder", "dinov2", "--encoder-weights", str(wrong)],
             "no weights": ["--image-encoder", "dinov2"],
             "weights without dinov2": ["--encoder-weights", str(wrong)]}[case]
    expected = {"wrong model": f"{wrong}: 'cls_token' has shape", "no weights": "needs --encoder-weights FILE",
                "weights without dinov2": "--encoder-weights goes with --image-encoder dinov2"}[case]
    out = tmp_path / "out"
    assert object_data_main(["from-pact", str(ROOT), "--out", str(out), "--preset", "tiny", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1], err
    assert not out.exists() and not out.with_name(".out.partial").exists()


def test_the_pact_preset_wants_vit_l(tmp_path):
    """A tiny model's file is refused for PAct's preset, naming ViT-L (no ViT-L is built)."""
    path = _save(tmp_path, random_meta_weights(TINY))
    with pytest.raises(DataError, match="DINOv2 ViT-L/14 with 4 registers at 518 px"):
        pact.check_encoder("dinov2", str(path), "pact")


def test_other_encoder_weights_restart_a_partial_conversion(tmp_path):
    """The weights' digest is part of a partial conversion's settings: other weights do not
    resume tokens of the first."""
    first, second = _save(tmp_path, random_meta_weights(TINY, seed=1)), tmp_path / "second.pth"
    torch.save(random_meta_weights(TINY, seed=2), second)
    settings = [pact._settings(ROOT, None, "tiny", pact.check_encoder("dinov2", str(p), "tiny")) for p in (first, second)]
    assert settings[0] != settings[1]
    assert json.loads(json.dumps(settings[0])) == settings[0]


def test_synthetic_data_can_take_dinov2_tokens(tmp_path, capsys):
    """`pact-object-data --image-encoder dinov2` (the stand-in stays the default): the same
    objects, the tokens from the given weights, recorded in dataset.json."""
    weights = random_meta_weights(TINY, seed=4)
    path = _save(tmp_path, weights)
    common = ["--preset", "tiny", "--num-samples", "2", "--seed", "3"]
    assert object_data_main(["--out", str(tmp_path / "stand-in"), *common]) == 0
    assert object_data_main(["--out", str(tmp_path / "dino"), *common, "--image-encoder", "dinov2",
                             "--encoder-weights", str(path)]) == 0, capsys.readouterr().err
    plain, dino = read_dataset_spec(tmp_path / "stand-in"), read_dataset_spec(tmp_path / "dino")
    assert "image_encoder" not in plain.generator and dino.generator["image_encoder"]["sha256"] == dinov2.file_digest(path)
    encoder = Dinov2ImageEncoder(weights, TINY)
    for index in range(2):
        a, b = (load_sample(sample_path(tmp_path / name, index), spec) for name, spec in (("stand-in", plain), ("dino", dino)))
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["latents"], b["latents"])
        assert np.array_equal(b["cond"], encoder(b["image"]).astype(np.float16))
    assert object_data_main(["--out", str(tmp_path / "bad"), *common, "--grid", "3", "3", "--image-encoder", "dinov2",
                             "--encoder-weights", str(path)]) == 1
    assert "drop --grid" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_pool_of_dinov2_workers_writes_the_same_samples(tmp_path):
    """Each worker process loads the encoder once and encodes its objects as one process does."""
    root = tmp_path / "src" / "StorageFurniture"
    root.mkdir(parents=True)
    for name in ("40001", "40002"):
        shutil.copytree(ROOT / "40001", root / name)
    path = _save(tmp_path, random_meta_weights(TINY, seed=5))
    for workers in (1, 2):
        pact.convert(root, tmp_path / f"w{workers}", preset="tiny", workers=workers, image_encoder="dinov2",
                     encoder_weights=str(path), log=lambda line: None)
    specs = [read_dataset_spec(tmp_path / f"w{w}") for w in (1, 2)]
    assert specs[0].num_samples == specs[1].num_samples == 6
    for index in range(6):
        one, two = (load_sample(sample_path(tmp_path / f"w{w}", index), spec) for w, spec in zip((1, 2), specs))
        assert set(one) == set(two) and all(np.array_equal(one[k], two[k]) for k in one if k != "cond")
        # The workers run torch with fewer threads: float32 rounding may differ, which can move
        # a float16 token by one unit in the last place, never more.
        a, b = one["cond"].astype(np.float32), two["cond"].astype(np.float32)
        assert float(np.abs(a - b).max()) <= float(np.finfo(np.float16).eps) * float(np.abs(a).max())
