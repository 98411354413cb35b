"""Stage2 core: shapes, masking and padding, the whole-object row, the articulation head and
its metrics, the spatial adapter and moments, sampling with multi-step aggregation,
checkpoints, precision, the Stage2 config, and a real Ray sweep of the three variants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from numerics import assert_within_rounding, transformer_ops

from pact_ray.data.articulation import SLOT_GROUPS, encode_articulation_batch, validity_mask
from pact_ray.data.loader import ArticulatedDataset, collate_voxels
from pact_ray.data.synthetic import PRESETS, generate_dataset
from pact_ray.errors import ConfigError
from pact_ray.metrics import names as M
from pact_ray.models.checkpoint import CheckpointError, load_core_weights
from pact_ray.models.layers import absolute_position_embedding
from pact_ray.models.presets import STAGE2_PRESETS
from pact_ray.models.stage2 import (
    ArticulationHead,
    FeatureAverage,
    TokenLayout,
    build_stage2,
    mask_moments,
    voxel_position_embedding,
)
from pact_ray.runs.registry import STAGE2_VARIANTS
from pact_ray.runs.stage2 import Stage2RunConfig
from pact_ray.training.stage2 import Stage2Trainer, articulation_metrics, model_input


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> ArticulatedDataset:
    out = tmp_path_factory.mktemp("s2") / "tiny"
    generate_dataset(out, 6, seed=11, occlusion_prob=0.5, voxel_resolution=32, **PRESETS["tiny"])
    return ArticulatedDataset(out)


@pytest.fixture(scope="module")
def batch(dataset) -> dict[str, torch.Tensor]:
    return collate_voxels([dataset[0], dataset[1], dataset[2]], 12, torch.Generator().manual_seed(0))


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (the zero-initialised layers would make outputs trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def run(model, b, x=None):
    x = model_input(b["feats"], b["shared"]) if x is None else x
    t = torch.linspace(100, 900, len(b["num_rows"]))
    return model(x, t, b["cond"], b["coords"], b["valid"], b["num_rows"], b["masks"])


def pad(b: dict[str, torch.Tensor], extra: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """More padding tokens per row, filled with garbage (they are masked out)."""
    g = torch.Generator().manual_seed(seed)
    n = b["valid"].shape[0]
    out = dict(b)
    out["feats"] = torch.cat([b["feats"], torch.randn(n, extra, 8, generator=g) * 50], 1)
    out["shared"] = torch.cat([b["shared"], torch.ones(n, extra)], 1)
    out["coords"] = torch.cat([b["coords"], torch.randint(0, 32, (n, extra, 3), generator=g)], 1)
    out["valid"] = torch.cat([b["valid"], torch.zeros(n, extra, dtype=torch.bool)], 1)
    return out


# ---------------------------------------------------------------- the core

def test_shapes_and_parameter_count(batch):
    model = build_stage2("tiny")
    out = run(model, batch)
    n, m = batch["valid"].shape
    assert out.velocity.shape == (n, m, 8) and out.features.shape == (n, m, 64)
    art = model.articulate(out.features, out.layout)
    assert art.shape == (int(batch["num_parts"].sum()), 24)
    # Fresh model: zero-init output and head's last layer -> zero velocity and articulation.
    assert not out.velocity.any() and not art.any()
    with torch.device("meta"):  # the PAct size, built without memory
        big = build_stage2("pact")
    assert 550e6 < sum(p.numel() for p in big.parameters()) < 560e6


def in_float64(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}


def test_padding_does_not_change_outputs(batch):
    """Padding tokens are masked out, so padded and unpadded rows give the same outputs in
    real arithmetic; in floating point the attention over a longer key set sums in another
    order. Checked in float64 with the rounding bound of the whole forward pass (numerics.py):
    a padded token that leaked through attention (its features are 50x the data's) would
    move the outputs by O(1), 10^5 times the bound."""
    model = randomized(build_stage2("tiny", spatial_adapter=True)).double()
    b64, padded = in_float64(batch), in_float64(pad(batch, 7))
    moments = mask_moments(b64["pixel_masks"], b64["num_parts"])[0]
    with torch.no_grad():
        a = run(model, b64)
        b = run(model, padded)
        art_a = model.articulate(a.features, a.layout, moments)
        art_b = model.articulate(b.features, b.layout, moments)
    preset = STAGE2_PRESETS["tiny"]
    width, blocks = preset["model_channels"], preset["num_blocks"]
    tokens = int(batch["num_rows"].max()) * padded["valid"].shape[1]  # keys of one object's rows
    ops = transformer_ops(width, tokens, blocks, preset["mlp_ratio"], cond_tokens=batch["cond"].shape[1])
    head_ops = 3 * preset["head_channels"] + tokens  # pooling and the head's three Linear layers
    gain = 10.0 ** (blocks + 1)  # a bound on the amplification per block (random weights), and the head
    m = batch["valid"].shape[1]
    keep = batch["valid"]
    assert_within_rounding(b.velocity[:, :m][keep], a.velocity[keep], ops=ops, gain=gain, what="velocity")
    assert_within_rounding(b.features[:, :m][keep], a.features[keep], ops=ops, gain=gain, what="features")
    assert_within_rounding(art_b, art_a, ops=ops + head_ops, gain=gain, what="articulation")
    assert not b.velocity[:, m:].any()  # padding outputs are zero


def test_objects_attend_within_themselves_across_their_rows(batch):
    """Self-attention spans all rows of an object (whole object included) and no other object."""
    model = randomized(build_stage2("tiny"))
    rows = batch["num_rows"].tolist()
    with torch.no_grad():
        base = run(model, batch)
        x = model_input(batch["feats"], batch["shared"]).clone()
        x[0] += 1.0  # object 0's whole-object row
        moved = run(model, batch, x)
    obj0 = slice(1, rows[0])  # object 0's part rows
    others = slice(rows[0], None)
    valid = batch["valid"]
    assert not torch.allclose(moved.features[obj0][valid[obj0]], base.features[obj0][valid[obj0]])
    torch.testing.assert_close(moved.features[others][valid[others]], base.features[others][valid[others]])


def test_whole_object_row_is_the_union_and_has_no_articulation(dataset):
    items = [dataset[3], dataset[4]]
    b = collate_voxels(items)  # every voxel
    layout = TokenLayout.build(b["num_rows"], b["valid"])
    assert layout.row_idx.tolist() == [r for item in items for r in range(len(item["part_labels"]) + 1)]
    start = 0
    for item in items:
        k = len(item["part_labels"])
        cells = [set(map(tuple, b["coords"][start + r][b["valid"][start + r]].tolist())) for r in range(k + 1)]
        assert cells[0] == set().union(*cells[1:])
        start += k + 1
    model = build_stage2("tiny")
    out = run(model, collate_voxels(items, 8, torch.Generator().manual_seed(0)))
    assert model.articulate(out.features, out.layout).shape[0] == sum(len(i["part_labels"]) for i in items)


def test_position_embedding_matches_the_grid_embedding():
    grid = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    torch.testing.assert_close(voxel_position_embedding(grid, 64), absolute_position_embedding(4, 64))


def test_forward_rejects_rows_without_voxels(batch):
    b = dict(batch)
    b["valid"] = batch["valid"].clone()
    b["valid"][2] = False
    with pytest.raises(ValueError, match="every row needs at least one valid voxel"):
        run(build_stage2("tiny"), b)


# ---------------------------------------------------------------- head, adapter, moments

def test_head_pools_over_valid_tokens_only():
    torch.manual_seed(0)
    head = ArticulationHead(16, 8)
    randomized(head)
    feats = torch.randn(3, 5, 16)
    valid = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = head(feats, valid)
    garbage = feats.masked_fill(~valid[..., None], 1e4)
    assert torch.equal(head(garbage, valid), out)
    for r in range(3):  # by hand: the mean and the max of g over the valid tokens
        g = head.in_layers(feats[r][valid[r]])
        torch.testing.assert_close(out[r], head.out_layers(torch.cat([g.mean(0), g.amax(0)])))
    assert not ArticulationHead(16, 8)(feats, valid).any()  # last Linear zero-initialised
    with pytest.raises(ValueError, match="even"):
        ArticulationHead(16, 7)


def test_zero_initialised_adapter_gives_the_baseline_exactly(batch, dataset):
    baseline = randomized(build_stage2("tiny"))
    adapted = build_stage2("tiny", spatial_adapter=True)
    missing = adapted.load_state_dict(baseline.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("spatial_adapter.") for k in missing)
    moments = mask_moments(batch["pixel_masks"], batch["num_parts"])[0]
    with torch.no_grad():
        out = run(baseline, batch)
        assert torch.equal(adapted.eval().articulate(out.features, out.layout, moments), baseline.articulate(out.features, out.layout))
    with pytest.raises(ValueError, match="needs the parts' mask moments"):
        adapted.articulate(out.features, out.layout)
    # In training: the same seed builds the same base weights and the first step reports the same numbers.
    cfg = dict(profile="smoke", model="tiny", seed=3)
    trainers = {v: Stage2Trainer(Stage2RunConfig.for_variant(v, **cfg), dataset=dataset) for v in ("baseline", "spatial_adapter")}
    base_sd = trainers["baseline"].model.state_dict()
    assert all(torch.equal(base_sd[k], v) for k, v in trainers["spatial_adapter"].model.state_dict().items() if k in base_sd)
    first = {v: t.train_step() for v, t in trainers.items()}
    for key in (M.LOSS, M.FLOW_LOSS, M.ART_L2, M.MASK_PARTS, M.EMPTY):
        assert first["baseline"][key] == first["spatial_adapter"][key]
    assert trainers["spatial_adapter"].model.spatial_adapter.mlp[-1].weight.abs().sum() > 0  # and it learns


def test_moments_of_a_known_mask():
    masks = torch.zeros(1, 10, 20, dtype=torch.long)
    masks[0, 2:6, 4:10] = 1  # part 0: a 4 x 6 rectangle
    masks[0, 7, 0] = 2  # part 1: one pixel
    masks[0, 8, 1] = 2
    moments, visible = mask_moments(masks, torch.tensor([3]))  # part 2 is empty (occluded)
    assert visible.tolist() == [True, True, False]
    u = (torch.arange(4, 10) + 0.5) / 20
    v = (torch.arange(2, 6) + 0.5) / 10
    expected = [24 / 200, u.mean(), v.mean(), u.var(unbiased=False), v.var(unbiased=False), 0.0, 4 / 20, 2 / 10, 10 / 20, 6 / 10]
    torch.testing.assert_close(moments[0], torch.tensor(expected, dtype=torch.float32))
    # Two diagonal pixels: xy = +1/4 of (du dv) products: du = -/+ 0.025, dv = -/+ 0.05.
    torch.testing.assert_close(moments[1, 5], torch.tensor(0.025 * 0.05))
    torch.testing.assert_close(moments[1, 6:], torch.tensor([0.0, 0.7, 0.1, 0.9]))
    assert not moments[2].any()


def test_mask_parts_and_empty_are_counted_per_batch(dataset):
    trainer = Stage2Trainer(Stage2RunConfig.for_variant("spatial_diag", "smoke", "tiny", batch_size=4), dataset=dataset)
    b = trainer.batch(0)
    assert len(b["num_parts"]) == len(trainer.train_ids) == 4  # every training object (2 of the 6 are held out)
    starts = torch.cumsum(b["num_parts"], 0) - b["num_parts"]
    visible = [bool((b["pixel_masks"][o] == k + 1).any()) for o in range(len(starts)) for k in range(int(b["num_parts"][o]))]
    metrics = trainer.train_step()
    assert metrics[M.MASK_PARTS] == sum(visible) and metrics[M.EMPTY] == len(visible) - sum(visible)
    assert metrics[M.EMPTY] >= 1  # the training objects hold an occluded part
    assert set(M.MASK_MOMENTS) <= set(metrics) and 0 < metrics["mask_area"] < 1
    baseline = Stage2Trainer(Stage2RunConfig.for_variant("baseline", "smoke", "tiny", batch_size=4), dataset=dataset).train_step()
    assert not set(M.MASK_MOMENTS) & set(baseline) and baseline[M.MASK_PARTS] == metrics[M.MASK_PARTS]


# ---------------------------------------------------------------- metrics and decoding

def test_articulation_metrics_decode_and_mask():
    types = np.array([1, 2, 3, 2])
    labels = np.array([2, 0, 1, 3])
    target = torch.from_numpy(encode_articulation_batch(types, [[0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]],
                                                        np.zeros((4, 3)) + 0.3, [[0, 0], [90, 0], [0, 0.4], [120, 0]], labels))
    valid = validity_mask(torch.from_numpy(types))
    exact = articulation_metrics(target.clone(), target, valid, torch.from_numpy(types), torch.from_numpy(labels))
    assert exact[M.ART_L2] == 0 and exact[M.ART_TYPE_ACC] == 1 and exact[M.ART_LABEL_ACC] == 1
    pred = target.clone()
    pred[0, SLOT_GROUPS["axis"]] = 5.0  # a fixed joint's axis: hidden by the validity mask
    pred[1, SLOT_GROUPS["type"]] += 0.2  # one type step: decodes to 3 instead of 2
    pred[2, SLOT_GROUPS["origin"]] += 0.1
    out = articulation_metrics(pred, target, valid, torch.from_numpy(types), torch.from_numpy(labels))
    assert out[M.ART_TYPE_ACC] == 0.75 and out[M.ART_LABEL_ACC] == 1
    assert out[M.ART_GROUP_ERRORS["axis"]] == 0 and out[M.ART_GROUP_ERRORS["label"]] == 0
    torch.testing.assert_close(out[M.ART_GROUP_ERRORS["type"]], torch.tensor(0.04 * 6 / 24))
    torch.testing.assert_close(out[M.ART_GROUP_ERRORS["origin"]], torch.tensor(0.01 * 3 / 9))
    torch.testing.assert_close(out[M.ART_L2], (0.04 * 6 + 0.01 * 3) / valid.sum())


# ---------------------------------------------------------------- sampling

def test_feature_average_keeps_the_last_steps():
    avg = FeatureAverage(25, 20)
    for step in range(25):
        avg.add(torch.full((2,), float(step)))
    assert avg.count == 20 and torch.equal(avg.mean, torch.full((2,), 14.5))  # mean of steps 5..24
    with pytest.raises(ValueError):
        FeatureAverage(5, 6)


def test_sampling_aggregates_the_last_steps_features(dataset):
    trainer = Stage2Trainer(Stage2RunConfig.for_variant("spatial_adapter", "smoke", "tiny"), dataset=dataset)
    randomized(trainer.model)
    b = trainer.batch(0)
    seen = []
    forward = trainer.model.forward

    def spy(x, t, cond, *args):
        out = forward(x, t, cond, *args)
        if cond.any():  # the conditional pass
            seen.append(out.features)
        return out

    trainer.model.forward = spy
    latents, art = trainer.sample(b, steps=4, guidance=2.0, aggregate_last=2, seed=0)
    del trainer.model.forward
    assert len(seen) == 4 and latents.shape == b["feats"].shape and not latents[~b["valid"]].any()
    layout = TokenLayout.build(b["num_rows"], b["valid"])
    moments = mask_moments(b["pixel_masks"], b["num_parts"])[0]
    with torch.no_grad():
        expected = trainer.model.articulate((seen[2] + seen[3]) / 2, layout, moments)
        last_only = trainer.model.articulate(seen[3], layout, moments)
    torch.testing.assert_close(art, expected)
    assert not torch.allclose(art, last_only)


# ---------------------------------------------------------------- checkpoints, precision, resume, config

def test_checkpoint_with_another_head_is_named_by_its_head_keys(tmp_path, dataset):
    other = tmp_path / "other_head.pt"
    torch.save(build_stage2("tiny", head_channels=32).state_dict(), other)
    model = build_stage2("tiny")
    with pytest.raises(CheckpointError) as info:
        load_core_weights(model, other, model.core_state_dict_keys(), what="the Stage2 'tiny' preset")
    message = str(info.value)
    assert "does not fit the Stage2 'tiny' preset" in message and "mis-shaped" in message
    assert "art_head.in_layers.0.weight (32, 64) vs (64, 64)" in message and "\n" not in message
    # The whole run state of a trial (state.pt) holds the weights under "model"; its head fits.
    good = tmp_path / "state.pt"
    trainer = Stage2Trainer(Stage2RunConfig.for_variant("baseline", "smoke", "tiny"), dataset=dataset)
    torch.save(trainer.state_dict(), good)
    cfg = Stage2RunConfig.for_variant("spatial_adapter", "official-full", "tiny", init_checkpoint=str(good))
    assert Stage2Trainer(cfg, dataset=dataset).step == 0
    with pytest.raises(CheckpointError, match="art_head"):
        Stage2Trainer(Stage2RunConfig.for_variant("baseline", "official-full", "tiny", init_checkpoint=str(other)), dataset=dataset)


def test_sweep_rejects_a_checkpoint_with_another_head(tmp_path, capsys):
    from pact_ray.tune.sweep import run_sweep

    other = tmp_path / "other_head.pt"
    torch.save(build_stage2("tiny", head_channels=32).state_dict(), other)
    rc = run_sweep("stage2", ["--model", "tiny", "--profile", "official-full", "--checkpoint", str(other), "--name", "bad",
                              "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: checkpoint ") and "\n" not in err
    assert "does not fit the Stage2 'tiny' preset" in err and "art_head.in_layers.0.weight" in err
    assert not (tmp_path / "runs" / "bad").exists() and not (tmp_path / "mlflow.db").exists()


def test_bf16_autocast_trains(dataset):
    trainer = Stage2Trainer(Stage2RunConfig.for_variant("spatial_adapter", "stability", "tiny", precision="bf16"), dataset=dataset)
    b = trainer.batch(0)
    dtypes = []
    trainer.model.blocks[0].mlp.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with trainer.autocast():
        out = trainer.model(model_input(b["feats"], b["shared"]), torch.full((len(b["num_rows"]),), 500.0), b["cond"],
                            b["coords"], b["valid"], b["num_rows"], b["masks"])
    assert dtypes == [torch.bfloat16] and out.features.dtype == torch.float32  # bf16 matmuls, fp32 residual stream
    losses = [trainer.train_step()[M.LOSS] for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[0] != losses[2]


def test_resume_draws_the_same_batches(dataset):
    cfg = Stage2RunConfig.for_variant("spatial_diag", "stability", "tiny")
    straight = Stage2Trainer(cfg, dataset=dataset)
    expected = [straight.train_step()[M.LOSS] for _ in range(3)]
    first = Stage2Trainer(cfg, dataset=dataset)
    first.train_step()
    state = first.state_dict()
    resumed = Stage2Trainer(cfg, dataset=dataset)
    resumed.load_state_dict(state)
    assert [resumed.train_step()[M.LOSS] for _ in range(2)] == expected[1:]


@pytest.mark.parametrize("overrides,fragment", [
    (dict(variant="nope"), "unknown variant 'nope'"),
    (dict(model="huge"), "unknown model preset 'huge'"),
    (dict(max_tokens=-1), "max_tokens must be >= 0"),
    (dict(art_weight=-1.0), "art_weight must be >= 0"),
    (dict(profile="official-full"), "needs the Stage2 weights"),
    (dict(**{"router.eps": 0.1}), "unknown stage2 config key 'router.eps'"),
])
def test_config_errors(overrides, fragment):
    args = dict(variant="baseline", profile="smoke", model="tiny")
    args.update(overrides)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Stage2RunConfig.for_variant(**args)


def test_profiles_and_phases():
    steps = {p: Stage2RunConfig.for_variant("spatial_diag", p, "tiny", init_checkpoint="x").steps
             for p in ("smoke", "stability", "quick", "full", "official-full")}
    assert steps == {"smoke": 1, "stability": 5, "quick": 5, "full": 40, "official-full": 40}
    assert [Stage2RunConfig.for_variant(v, "smoke").phase for v in STAGE2_VARIANTS] == ["baseline", "phase4", "phase4"]
    assert Stage2RunConfig.for_variant("spatial_adapter", "quick").phase == "matrix"


# ---------------------------------------------------------------- a real sweep

@pytest.mark.slow
def test_stage2_smoke_sweep_of_every_variant(tmp_path, ray_address, capsys):
    from mlflow.tracking import MlflowClient

    from pact_ray.report.summary import JSON_NAME
    from pact_ray.tracking.tags import SWEEP_TAG
    from pact_ray.tune.manifest import MANIFEST
    from pact_ray.tune.sweep import run_sweep

    name = "s2-smoke"
    rc = run_sweep("stage2", ["--model", "tiny", "--profile", "smoke", "--name", name, "--storage-path", str(tmp_path / "runs"),
                              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    manifest = json.loads((tmp_path / "runs" / name / MANIFEST).read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment(manifest["experiment_id"]).name == "pact-ray/stage2_spatial"
    runs = client.search_runs([manifest["experiment_id"]], filter_string=f"tags.`{SWEEP_TAG}` = '{manifest['parent_run_id']}'")
    assert sorted(r.data.tags["variant"] for r in runs) == sorted(STAGE2_VARIANTS)
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["kind"] == "stage2" and r.data.tags["stage"] == "stage2"
        assert r.data.tags["note"] == STAGE2_VARIANTS[r.data.tags["variant"]].note
        assert {M.LOSS, M.ART_L2, M.MASK_PARTS, M.EMPTY, M.FLOW_LOSS, *M.ART_GROUP_ERRORS.values()} <= set(r.data.metrics)
        assert ("mask_area" in r.data.metrics) == (r.data.tags["variant"] != "baseline")
    rows = json.loads((tmp_path / "runs" / name / "summary" / JSON_NAME).read_text())
    assert [row["variant"] for row in rows] == list(STAGE2_VARIANTS)  # registry order
    for row in rows:
        assert row["status"] == "finished" and row["steps"] == 1 and row["kind"] == "stage2"
        assert row["art_l2"] is not None and row["mask_parts"] is not None and row["empty"] is not None
        assert row["gate"] is None and row["phase"] == STAGE2_VARIANTS[row["variant"]].phase
        assert row["run"].startswith("Smoke Stage2 ")
    # One seed: no interval, so no verdict and no "best"; the sweep says so (as for Stage1 in test_sweep.py).
    assert "No Stage2 variant beats the baseline at 1 seed(s)" in out and "Best" not in out
