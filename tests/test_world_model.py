"""World models (shapes, masking, GPT teacher forcing vs free running), their metrics on
known cases, the run config, the trainer's evaluation and best checkpoint, checkpoint
loading and the evaluation report's bad-input errors."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import assert_within_rounding, pairwise_sum_ops, rounding_bound, transformer_ops
from skimage.metrics import structural_similarity

from pact_ray.data.arm.dataset import WorldModelData
from pact_ray.data.arm.strip import MotorStrip
from pact_ray.data.arm.synthetic import ArmEpisodeConfig, generate_arm_dataset
from pact_ray.errors import ConfigError
from pact_ray.metrics import names as M
from pact_ray.metrics.world_model import PSNR_CAP, Evaluation, compute_metrics, loggable
from pact_ray.models.checkpoint import CheckpointError
from pact_ray.models.world_model import (
    AutoregressiveWorldModel,
    MaskedWorldModel,
    build_world_model,
    mae_reference,
    preset_config,
    random_masking,
)
from pact_ray.runs.registry import WM_VARIANTS
from pact_ray.runs.world_model import WorldModelRunConfig
from pact_ray.training.checkpoints import write_checkpoint
from pact_ray.training.validation import eval_sample_ids
from pact_ray.training.world_model import WorldModelTrainer, load_checkpoint

SMALL = dict(image_size=32, patch_size=8, context_frames=2)  # 16 patches per frame


def _inputs(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, 3, 32, 32, generator=g), torch.tensor([0, 1, 2][:n]), torch.rand(n, 3, 32, 32, generator=g)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is faster than two fighting for shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> WorldModelData:
    folder = generate_arm_dataset(tmp_path_factory.mktemp("wm") / "arm", episodes=4, seed=1, cfg=ArmEpisodeConfig(length=10))
    return WorldModelData(folder, image_size=64, context=2)


# ------------------------------------------------------------------ models

def test_mae_step_shapes_and_presets():
    torch.manual_seed(0)
    model = build_world_model(preset_config("mae", "tiny", mask="target_random", context_mask_ratio=0.25, **SMALL))
    assert isinstance(model, MaskedWorldModel) and model.num_patches == 16 and model.patch_dim == 192
    context, action, target = _inputs()
    latent, mask, restore = model.forward_encoder(context, action, 0.25, torch.Generator().manual_seed(1))
    assert latent.shape == (3, 1 + 24, 64) and mask.shape == (3, 32) and restore.shape == (3, 32)
    assert mask.sum(1).tolist() == [8.0] * 3  # a quarter of the 32 context patches
    pred = model.forward_decoder(latent, restore)
    assert pred.shape == (3, 48, 192)
    loss, pred, mask = model(context, action, target, 0.25, torch.Generator().manual_seed(1))
    assert loss.ndim == 0 and mask.shape == (3, 48) and mask[:, 32:].eq(1).all()
    assert model.predict(context, action).shape == (3, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(target)), target)
    reference = mae_reference()
    assert (reference.embed_dim, reference.depth, reference.decoder_embed_dim, reference.decoder_depth) == (384, 8, 192, 4)


def test_random_masking_keeps_the_unmasked_tokens_in_place():
    x = torch.arange(2 * 10 * 4, dtype=torch.float32).reshape(2, 10, 4)
    kept, mask, restore = random_masking(x, 0.3, torch.Generator().manual_seed(0))
    assert kept.shape == (2, 7, 4) and mask.sum(1).tolist() == [3.0, 3.0]
    for n in range(2):
        assert sorted(kept[n, :, 0].tolist()) == x[n, mask[n] == 0, 0].tolist()
    padded = torch.cat([kept, torch.full((2, 3, 4), -1.0)], dim=1)
    unshuffled = torch.gather(padded, 1, restore[..., None].expand(-1, -1, 4))
    assert torch.equal(unshuffled[mask == 0], x[mask == 0]) and unshuffled[mask == 1].eq(-1).all()
    same, none, _ = random_masking(x, 0.0)
    assert torch.equal(same, x) and none.sum() == 0


def test_mae_masks_the_whole_target_and_scores_only_masked_patches():
    torch.manual_seed(0)
    model = build_world_model(preset_config("mae", "tiny", **SMALL))
    context, action, target = _inputs()
    loss_a, pred_a, mask = model(context, action, target)
    loss_b, pred_b, _ = model(context, action, torch.rand_like(target))
    assert torch.equal(pred_a, pred_b) and loss_a != loss_b  # the target is never seen, only scored
    assert mask[:, :32].eq(0).all()  # "target": every context patch visible
    truth = torch.cat([model.patchify_context(context), model.patchify(target)], 1)
    want = ((pred_a - truth) ** 2).mean(-1)[:, 32:].mean()
    # The same mean of squares summed in another order: a subtraction, a square and the sums
    # over the patch's 192 values, the 16 target patches and the 3 samples.
    assert_within_rounding(loss_a, want, ops=2 + pairwise_sum_ops(192) + pairwise_sum_ops(16 * 3), what="loss")
    # The action changes the prediction (the action token reaches the decoder), by more than
    # rounding could: checked in float64, where the bound of the whole pass is far below it.
    model = model.double()
    with torch.no_grad():
        stay, move = (model.predict(context.double(), torch.tensor([k] * 3)) for k in (0, 1))
    cfg = model.cfg
    tokens = 1 + 3 * model.num_patches
    ops = transformer_ops(cfg.embed_dim, tokens, cfg.depth, cfg.mlp_ratio) + transformer_ops(
        cfg.decoder_embed_dim, tokens, cfg.decoder_depth, cfg.mlp_ratio)
    assert float((stay - move).abs().max()) > rounding_bound(1.0, ops, torch.float64, gain=10.0 ** (cfg.depth + cfg.decoder_depth))


def test_gpt_teacher_forcing_is_causal_and_free_running_feeds_itself():
    torch.manual_seed(0)
    model = build_world_model(preset_config("gpt", "tiny", **SMALL)).eval()
    assert isinstance(model, AutoregressiveWorldModel)
    context, action, target = _inputs()
    with torch.no_grad():
        patches = model.patchify(target)
        tf = model.forward_tokens(context, action, patches)
        assert tf.shape == (3, 16, 192)
        changed = patches.clone()
        changed[:, 9:] = torch.rand_like(changed[:, 9:])
        tf2 = model.forward_tokens(context, action, changed)
        # Patch i sees only patches < i: later patches get exactly zero attention weight, so
        # the earlier outputs are the same numbers (same shapes, same kernels).
        assert torch.equal(tf[:, :10], tf2[:, :10])
    loss, _ = model(context, action, target)
    assert_within_rounding(loss, ((tf - patches) ** 2).mean(), ops=2 + pairwise_sum_ops(tf.numel()), what="loss")
    # Free running, teacher forcing on its own output and the KV-cached generation compute the
    # same numbers in other orders (one pass vs one patch at a time): float64 and the rounding
    # bound of the whole pass.
    model = model.double()
    context, target = context.double(), target.double()
    cfg = model.cfg
    ops = transformer_ops(cfg.embed_dim, 1 + (cfg.context_frames + 1) * model.num_patches, cfg.depth, cfg.mlp_ratio)
    gain = 10.0 ** cfg.depth
    with torch.no_grad():
        patches = model.patchify(target)
        tf = model.forward_tokens(context, action, patches)
        later = (model.forward_tokens(context, action, changed.double()) - tf)[:, 10:].abs().max()
        assert float(later) > rounding_bound(float(tf.abs().max()), ops, torch.float64, gain)  # later patches do see them
        fr = model.predict(context, action)
        # Free running = teacher forcing on its own output; its first patch sees no target patch.
        assert_within_rounding(model.predict_teacher_forced(context, action, fr), fr, ops=ops, gain=gain, what="TF on FR")
        assert_within_rounding(model.patchify(fr)[:, 0], tf[:, 0], ops=ops, gain=gain, what="first patch")
        # The KV-cached generation equals the plain one-pass-per-patch loop.
        loop = torch.zeros_like(patches)
        for i in range(model.num_patches):
            loop[:, i] = model.forward_tokens(context, action, loop)[:, i]
        assert_within_rounding(model.unpatchify(loop), fr, ops=ops, gain=gain, what="KV cache")
        gap = (fr - model.predict_teacher_forced(context, action, target)).abs().max()
        assert float(gap) > rounding_bound(float(fr.abs().max()), ops, torch.float64, gain)  # a TF/FR gap


def test_model_config_errors():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        preset_config("mae", "tiny", image_size=30)
    with pytest.raises(ValueError, match="unknown world model preset"):
        preset_config("mae", "huge")
    with pytest.raises(ValueError, match="embed_dim 66 must be a multiple of 4"):
        preset_config("gpt", "tiny", embed_dim=66)


# ------------------------------------------------------------------ metrics

def _frames(strip: MotorStrip, pos: np.ndarray, vel: np.ndarray, camera: float = 0.5) -> np.ndarray:
    """[N, 16 + rows, W, 3] float frames: flat camera rows above the strip of (pos, vel)."""
    s = np.repeat(strip.encode(pos, vel)[..., None], 3, -1).astype(np.float32) / 255
    return np.concatenate([np.full((len(pos), 16, strip.width, 3), camera, np.float32), s], axis=1)


def _evaluation(last, target, cf, action, tf=None) -> Evaluation:
    return Evaluation(last_context=last, target=target, action=np.asarray(action), counterfactual=cf, teacher_forced=tf,
                      ids=np.arange(len(target)))


def test_metrics_of_a_perfect_model():
    strip = MotorStrip(64)
    pos = np.array([[-40.0, -90, 70, 39, 8, 10], [20.0, -88, 66, 40, 9, 12]])
    vel = np.array([[4.0, 0, 0, 0, 0, 0], [-4.0, 0, 0, 0, 0, 0]])
    last, target = _frames(strip, pos - vel, vel * 0), _frames(strip, pos, vel)
    ev = _evaluation(last, target, np.stack([target] * 3, axis=1), [1, 2])
    m = compute_metrics(ev, strip)
    assert m[M.VAL_MSE] == 0 and m[M.SSIM] == 1.0 and m[M.PSNR] == PSNR_CAP  # identical frames: exact
    assert m[M.MOTOR_POSITION_MAE_MEAN] == 0 and m[M.MOTOR_VELOCITY_MAE_MEAN] == 0
    assert m[M.MOTOR_DIRECTION_ACCURACY] == 1.0
    assert m[M.MOTOR_CONSISTENCY_ERROR] < max(strip.quantum()[0]) + max(strip.quantum()[1])  # quantisation only
    assert m[M.ACTION_DISCRIMINATION_SCORE] == 0 and m[M.MOTOR_DISCRIMINATION_SCORE] == 0
    assert set(m) >= {M.VAL_MSE_ACTION.format(k=1), M.VAL_MSE_ACTION.format(k=2), M.MOTOR_POSITION_MAE_ACTION.format(k=1)}
    assert M.VAL_MSE_ACTION.format(k=0) not in m and M.TF_FR_GAP not in m
    flat = loggable(m)
    assert flat[M.PER_JOINT.format(name=M.MOTOR_POSITION_MAE_PER_JOINT, joint="J5")] == 0
    assert all(isinstance(v, float) for v in flat.values())


def test_metrics_of_known_errors():
    strip = MotorStrip(64)
    pos = np.array([[-40.0, -90, 70, 39, 8, 10]])
    true_vel = np.array([[4.0, 0, 0, 0, 0, 0]])
    target = _frames(strip, pos, true_vel)
    last = _frames(strip, pos - true_vel, np.zeros_like(true_vel))
    # The prediction: camera rows 0.1 too bright, J0 3 degrees too far, pan velocity reversed.
    pred_pos = pos + np.array([[3.0, 0, 0, 0, 0, 0]])
    pred = _frames(strip, pred_pos, -true_vel, camera=0.6)
    cf = np.stack([pred, pred, np.clip(pred + 0.2, 0, 1)], axis=1)
    m = compute_metrics(_evaluation(last, target, cf, [0], tf=target), strip)
    rows = strip.rows
    visual = 16 / (16 + rows)
    pixels = target.size  # the metrics sum in float64 over every value of the frame
    f64 = lambda value, ops: rounding_bound(abs(value), ops, torch.float64)  # noqa: E731
    # Camera rows 0.6 vs 0.5 in float32: 0.6's rounding (u) is 6 u of their 0.1 difference,
    # doubled by the square; the float64 mean adds nothing at that scale.
    assert abs(m[M.VAL_MSE_VISUAL] - 0.01) <= rounding_bound(0.01, ops=2, dtype=torch.float32, gain=0.6 / 0.1)
    # val_mse is the pixel-weighted mean of its two parts (float64 sums over the frame).
    expect = visual * m[M.VAL_MSE_VISUAL] + (1 - visual) * m[M.VAL_MSE_MOTOR_STRIP]
    assert abs(m[M.VAL_MSE] - expect) <= f64(m[M.VAL_MSE], pairwise_sum_ops(pixels) + 4)
    # skimage's PSNR takes the MSE of float32 frames in float32: a relative error r of the MSE
    # is an absolute error of 10 r / ln 10 dB.
    mse_rel = rounding_bound(1.0, pairwise_sum_ops(pixels) + 2, torch.float32)
    assert abs(m[M.PSNR] - 10 * math.log10(1 / m[M.VAL_MSE])) <= 10 * mse_rel / math.log(10)
    assert m[M.SSIM] == structural_similarity(target[0], pred[0], channel_axis=-1, data_range=1.0)  # the same call
    # Decoded joints: every frame encodes a position or velocity rounded to the strip's
    # quantum q (error <= q / 2), and each error below compares two decoded frames.
    q_pos, q_vel = strip.quantum()
    per_joint = m[M.MOTOR_POSITION_MAE_PER_JOINT]
    assert abs(per_joint[0] - 3.0) <= q_pos[0] and all(e <= q for e, q in zip(per_joint[1:], q_pos[1:]))
    assert abs(m[M.MOTOR_POSITION_MAE_MEAN] - 3.0 / 6) <= q_pos.mean()
    assert abs(m[M.MOTOR_VELOCITY_MAE_MEAN] - 8.0 / 6) <= q_vel.mean()
    assert m[M.MOTOR_DIRECTION_ACCURACY] == 0.0
    # Decoded change of J0 is 4 + 3 = 7 degrees, the decoded velocity -4: 11 degrees off on J0
    # (three decoded values per joint: two positions and a velocity).
    assert abs(m[M.MOTOR_CONSISTENCY_ERROR] - 11.0 / 6) <= (q_pos + q_vel / 2).mean()
    # Actions 0 and 1 agree; action 2 differs by the clipped +0.2 everywhere.
    gap = np.abs(np.clip(pred + 0.2, 0, 1).astype(np.float64) - pred).mean()
    assert abs(m[M.ACTION_DISCRIMINATION_SCORE] - 2 * gap / 3) <= f64(gap, pairwise_sum_ops(pixels) + 4)
    # Static pixels: the camera rows and the unchanged strip cells; only the J0 cells moved.
    sq = ((pred.astype(np.float64) - target) ** 2).mean(-1)[0]
    static = np.all(np.abs(target - last)[0] < 0.5 / 255, axis=-1)
    assert abs(m[M.VAL_MSE_STATIC] - sq[static].mean()) <= f64(m[M.VAL_MSE_STATIC], pairwise_sum_ops(pixels) + 4)
    assert abs(m[M.VAL_MSE_DYNAMIC] - sq[~static].mean()) <= f64(m[M.VAL_MSE_DYNAMIC], pairwise_sum_ops(pixels) + 4)
    assert m[M.VAL_MSE_TEACHER_FORCED] == 0 and m[M.TF_FR_GAP] == m[M.VAL_MSE]  # val_mse - 0: exact


def test_eval_sample_ids_spread_over_the_split():
    assert eval_sample_ids(10, 0).tolist() == list(range(10))
    assert eval_sample_ids(10, 3).tolist() == [0, 4, 9]
    assert eval_sample_ids(2, 5).tolist() == [0, 1]


# ------------------------------------------------------------------ config

def test_run_config_from_variants_and_profiles():
    cfg = WorldModelRunConfig.for_variant("mae_random", "smoke", "tiny", 3)
    assert (cfg.model_type, cfg.mask, cfg.model, cfg.steps, cfg.eval_every, cfg.phase) == ("mae", "target_random", "tiny", 1, 1, "iter3")
    assert WorldModelRunConfig.from_flat(cfg.flat()) == cfg
    reference = WorldModelRunConfig.for_variant("mae_reference", "quick", "tiny")
    assert reference.model == "reference" and reference.model_config().embed_dim == 384 and reference.phase == "matrix"
    gpt = WorldModelRunConfig.for_variant("gpt", "smoke", "small", embed_dim=96, depth=2)
    assert asdict(gpt.model_config())["embed_dim"] == 96 and gpt.variant_info.phase == "iter2"
    assert all(v.knobs for v in WM_VARIANTS.values())


@pytest.mark.parametrize("overrides, message", [
    (dict(variant="gpt", mask="target_random"), "applies to MAE models only"),
    (dict(variant="mae", model_type="gpt"), "is a mae model"),
    (dict(variant="mae", model="huge"), "unknown world model preset 'huge'"),
    (dict(variant="mae", eval_every=0), "eval_every must be >= 1"),
    (dict(variant="mae", episode_length=2), "episode_length"),
    (dict(variant="mae", embed_dim=30), "embed_dim 30 must be a multiple of 4"),
    (dict(variant="nope"), "unknown variant 'nope'"),
])
def test_run_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        WorldModelRunConfig.for_variant(**{"profile": "smoke", "model": "tiny", **overrides})


# ------------------------------------------------------------------ trainer and checkpoints

def test_trainer_reports_val_metrics_and_keeps_the_best(data, tmp_path):
    cfg = WorldModelRunConfig.for_variant("mae", "smoke", "tiny", 0, steps=4, eval_every=2, batch_size=4, eval_samples=6,
                                          checkpoint_every=2)
    trainer = WorldModelTrainer(cfg, device="cpu", data=data)
    rows = [trainer.train_step() for _ in range(3)]
    assert M.VAL_MSE not in rows[0] and M.VAL_MSE in rows[1] and M.VAL_MSE not in rows[2]
    assert rows[1][M.VAL_SAMPLES] == 6 and M.PER_JOINT.format(name=M.MOTOR_POSITION_MAE_PER_JOINT, joint="J0") in rows[1]
    state = trainer.state_dict()
    assert state["best"]["step"] == 2 and state["best"]["val_mse"] == rows[1][M.VAL_MSE]
    write_checkpoint(tmp_path, state)
    # Resuming reproduces the uninterrupted run exactly, best weights included.
    last = trainer.train_step()
    resumed = WorldModelTrainer(cfg, device="cpu", data=data)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    again = resumed.train_step()
    assert again[M.VAL_MSE] == last[M.VAL_MSE] and again[M.LOSS] == last[M.LOSS]
    assert again[M.BEST_VAL_MSE] == min(rows[1][M.VAL_MSE], last[M.VAL_MSE])
    loaded = load_checkpoint(tmp_path)
    assert loaded.weights_step == 2 and loaded.step == 3 and loaded.cfg == cfg
    best = state["best"]["model"]
    assert all(torch.equal(v, best[k]) for k, v in loaded.model.state_dict().items())


def test_load_checkpoint_rejects_other_kinds_and_sizes(tmp_path):
    cfg = WorldModelRunConfig.for_variant("mae", "smoke", "tiny")
    tiny = build_world_model(cfg.model_config()).state_dict()
    good = {"kind": "world_model", "config": cfg.flat(), "model": tiny, "step": 1}
    torch.save(good, tmp_path / "good.pt")
    assert load_checkpoint(tmp_path / "good.pt").weights_step == 1
    cases = {
        "stage1.pt": ({**good, "kind": "stage1"}, "is a 'stage1' checkpoint, not a world-model one"),
        "size.pt": ({**good, "config": {**cfg.flat(), "model": "small"}}, "does not fit the mae 'small' world model its config names: .*mis-shaped"),
        "type.pt": ({**good, "config": WorldModelRunConfig.for_variant("gpt", "smoke", "tiny").flat()}, "does not fit the gpt 'tiny' world model"),
        "bare.pt": (tiny, "holds no run config"),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / name)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read as weights"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------ report CLI errors

def _report(capsys, *argv: str) -> tuple[int, str]:
    from analysis.eval_report import main

    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


def test_eval_report_bad_input_is_one_line(tmp_path, capsys, data):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("pact-ray/stage1_router")
    stage1_run = MlflowClient(uri).create_run(exp, tags={"kind": "stage1"}).info.run_id
    cfg = WorldModelRunConfig.for_variant("mae", "smoke", "tiny", data=str(data.folder))
    state = {"kind": "world_model", "config": cfg.flat(), "model": build_world_model(cfg.model_config()).state_dict(), "step": 1}
    torch.save(state, tmp_path / "ok.pt")
    small = {**state, "config": {**cfg.flat(), "model": "small"}}
    torch.save(small, tmp_path / "small.pt")
    broken = tmp_path / "broken"
    (broken / "data").mkdir(parents=True)
    out = tmp_path / "out"
    capsys.readouterr()
    cases = [
        (["--run", "0123456789abcdef0123456789abcdef"], "is neither a checkpoint path nor a run id"),
        (["--run", stage1_run], "is a 'stage1' run, not a world-model run"),
        (["--run", str(tmp_path / "small.pt")], "does not fit the mae 'small' world model"),
        (["--run", str(tmp_path / "nope" / "x.pt")], "does not exist"),
        (["--run", str(tmp_path / "ok.pt"), "--data", str(broken)], "has no camera frames under images/"),
        (["--run", str(tmp_path / "ok.pt"), "--samples", "x"], "argument --samples: invalid int value"),
    ]
    for argv, message in cases:
        rc, err = _report(capsys, *argv, "--tracking-uri", uri, "--out", str(out))
        assert rc == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert message in err, err
    assert not out.exists()  # nothing half-written


def test_sweep_rejects_a_bad_data_folder_before_starting(tmp_path, capsys, data):
    import pyarrow.parquet as pq

    from pact_ray.tune.sweep import run_sweep

    broken = Path(shutil.copytree(data.folder, tmp_path / "broken"))
    path = broken / "data" / "chunk-000" / "episode_000001.parquet"
    pq.write_table(pq.read_table(path).drop(["observation.state"]), path)
    rc = run_sweep("world_model", ["--data", str(broken), "--profile", "smoke", "--model", "tiny", "--name", "bad",
                                   "--storage-path", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "episode_000001.parquet lacks the column observation.state" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()
