"""Stage1 core: official compatibility (key set, golden forward), presets, precision, checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import fixture_path
from pact_ray.models.checkpoint import CheckpointError, load_core_weights, read_weights
from pact_ray.models.layers import absolute_position_embedding, patchify, unpatchify
from pact_ray.models.stage1 import CONDITION_PRESETS, STAGE1_PRESETS, PartStructureFlow, build_stage1
from pact_ray.ot.router import RouterConfig


@pytest.fixture(scope="module")
def golden():
    return torch.load(fixture_path("pact_stage1_golden_tiny.pt"), weights_only=False)


def test_official_config_has_exact_key_set_and_shapes():
    ref = json.loads(fixture_path("pact_stage1_official_state_dict.json").read_text())
    with torch.device("meta"):
        model = PartStructureFlow(**ref["config"])
    sd = model.state_dict()
    assert set(sd) == set(ref["state_dict"])
    assert {k: list(v.shape) for k, v in sd.items()} == ref["state_dict"]
    # The shared mask embedding is the part embedding registered twice.
    assert model.mask_group_emb is model.part_pe and model.mask_group_emb_proj is model.part_pe_proj


def test_golden_forward_reproduced(golden):
    model = PartStructureFlow(**golden["config"])
    model.load_state_dict(golden["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(**golden["inputs"])
    assert out.shape == golden["output"].shape
    torch.testing.assert_close(out, golden["output"], atol=1e-5, rtol=0)


def test_position_embedding_matches_reference_buffer(golden):
    cfg = golden["config"]
    ours = absolute_position_embedding(cfg["resolution"], cfg["model_channels"])
    torch.testing.assert_close(ours, golden["state_dict"]["pos_emb"], atol=1e-6, rtol=0)


def test_global_blocks_mix_parts_of_one_object_only(golden):
    """Changing object 1's latents changes nothing in object 0's rows (and vice versa does)."""
    model = PartStructureFlow(**golden["config"])
    model.load_state_dict(golden["state_dict"])
    model.eval()
    inp = dict(golden["inputs"])
    x2 = inp["x"].clone()
    x2[3:] += 1.0  # object 1 = rows 3, 4 (num_parts = [3, 2])
    with torch.no_grad():
        a = model(**inp)
        b = model(**{**inp, "x": x2})
    torch.testing.assert_close(a[:3], b[:3], atol=0, rtol=0)
    x3 = inp["x"].clone()
    x3[1] += 1.0
    with torch.no_grad():
        c = model(**{**inp, "x": x3})
    assert (c[0] - a[0]).abs().max() > 1e-4  # global blocks: part 1 influences part 0


def test_mixed_part_counts_equal_per_object_runs(golden):
    model = PartStructureFlow(**golden["config"])
    model.load_state_dict(golden["state_dict"])
    model.eval()
    inp = golden["inputs"]
    with torch.no_grad():
        whole = model(**inp)
        first = model(inp["x"][:3], inp["t"][:3], inp["cond"][:3], inp["masks"][:3], torch.tensor([3]))
        second = model(inp["x"][3:], inp["t"][3:], inp["cond"][3:], inp["masks"][3:], torch.tensor([2]))
    torch.testing.assert_close(whole, torch.cat([first, second]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_presets_build_and_train_one_step(preset):
    torch.manual_seed(0)
    model = build_stage1(preset)
    cfg = STAGE1_PRESETS[preset]
    grid = CONDITION_PRESETS[preset]["grid"]
    n, r = 3, cfg["resolution"]
    x = torch.randn(n, cfg["in_channels"], r, r, r)
    cond = torch.randn(n, 5 + grid[0] * grid[1], cfg["cond_channels"])
    masks = torch.randint(0, 4, (n, *grid))
    out = model(x, torch.rand(n) * 1000, cond, masks, torch.tensor([2, 1]))
    assert out.shape == x.shape
    # Zero-initialised output layer: the untrained model predicts 0.
    assert out.abs().max() == 0
    out.sum().backward()
    assert model.out_layer.weight.grad is not None and model.out_layer.weight.grad.abs().sum() > 0


def test_pact_preset_constructs_on_meta_with_official_size():
    with torch.device("meta"):
        model = build_stage1("pact")
    n_params = sum(p.numel() for p in model.parameters())
    assert 550e6 < n_params < 560e6  # 556.6M unique (the shared embedding counted once)


def _random_inputs(model, n_parts=(2, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(n_parts)
    r = model.resolution
    x = torch.randn(n, model.in_channels, r, r, r, generator=g)
    cond = torch.randn(n, 41, model.cond_channels, generator=g)
    masks = torch.randint(0, 3, (n, 6, 6), generator=g)
    return x, torch.rand(n, generator=g) * 1000, cond, masks, torch.tensor(n_parts)


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = build_stage1("tiny")
    _randomise(plain)
    ckpt = build_stage1("tiny", use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    inputs = _random_inputs(plain)
    grads = []
    for m in (plain, ckpt):
        m.train()
        m.zero_grad()
        m(*inputs).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_runs_and_stays_close():
    model = build_stage1("tiny")
    _randomise(model)
    inputs = _random_inputs(model)
    with torch.no_grad():
        ref = model(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(*inputs)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 8, 8, 8)
    p = patchify(x, 2)
    assert p.shape == (2, 24, 4, 4, 4)
    torch.testing.assert_close(unpatchify(p, 2), x)


def test_unknown_config_key_rejected():
    cfg = dict(STAGE1_PRESETS["tiny"], not_a_key=1)
    with pytest.raises(TypeError, match="not_a_key"):
        PartStructureFlow(**cfg)


# ------------------------------------------------------------- official init

def test_official_init_from_safetensors_and_pt(tmp_path, golden):
    model_sd = golden["state_dict"]
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous().clone() for k, v in model_sd.items()}, str(st))
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": model_sd}, pt)
    for path in (st, pt):
        # A router variant loads the official core strictly; the router's own parameters stay new.
        model = PartStructureFlow(**golden["config"], router=RouterConfig(blocks="first", virtual_patch=True, mask_prior=True, edge="mask"))
        load_core_weights(model, path, model.core_state_dict_keys())
        for k, v in model_sd.items():
            assert torch.equal(model.state_dict()[k], v), k


def test_official_init_errors_name_keys(tmp_path, golden):
    model = PartStructureFlow(**golden["config"])
    sd = dict(golden["state_dict"])
    sd.pop("out_layer.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["input_layer.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_core_weights(model, path, model.core_state_dict_keys())
    msg = str(e.value)
    assert "out_layer.bias" in msg and "extra.weight" in msg and "input_layer.weight (3, 3) vs (64, 8)" in msg
    assert str(path) in msg and "\n" not in msg


class NotWeights:
    """An arbitrary object: a weights-only load must refuse to unpickle it."""


def test_checkpoint_reader_rejects_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_weights(tmp_path / "missing.pt")
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="could not be read"):
        read_weights(bad)
    wrong = tmp_path / "w.txt"
    wrong.write_text("x")
    with pytest.raises(CheckpointError, match="suffix"):
        read_weights(wrong)

    evil = tmp_path / "pickle.pt"
    torch.save({"obj": NotWeights()}, evil)
    with pytest.raises(CheckpointError, match="could not be read"):
        read_weights(evil)  # weights_only=True refuses arbitrary objects
