"""Bad input to the sweep script: one sentence on stderr, exit status 2, nothing created or overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pact_ray.data.objects.synthetic import generate_dataset
from pact_ray.common.presets import CONDITION_PRESETS, STAGE1_PRESETS
from pact_ray.tune.sweep import run_sweep


def base(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", "tiny", "--profile", "smoke", "--name", "bad", "--storage-path", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]


def assert_rejected(tmp_path: Path, capsys, args: list[str], *fragments: str) -> str:
    try:
        rc = run_sweep("stage1", args)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    assert not (tmp_path / "runs" / "bad").exists()
    assert not (tmp_path / "mlflow.db").exists()
    return err


@pytest.mark.parametrize("extra,fragment", [
    (["--variants", "baseline,nope"], "unknown variant 'nope'"),
    (["--profile", "nope"], "invalid choice: 'nope'"),
    (["--model", "huge"], "unknown model preset 'huge'"),
    (["--set", "router.eps=0", "--variants", "ot_first"], "router eps must be > 0"),
    (["--set", "router.eps=-1", "--variants", "ot_first"], "router eps must be > 0"),
    (["--set", "router.m_v=1.5", "--variants", "virtual_patch"], "m_v must be in (0, 1)"),
    (["--set", "router.m_v=0", "--variants", "virtual_patch"], "m_v must be in (0, 1)"),
    (["--set", "router.blocks=9", "--variants", "ot_first"], "outside 0..3"),
    (["--set", "router.eps=0.1", "--variants", "baseline"], "has no OT router"),
    (["--set", "nonsense=1"], "unknown stage1 config key 'nonsense'"),
    (["--set", "novalue"], "is not KEY=VALUE"),
    (["--set", "router.eps=abc", "--variants", "ot_first"], "router.eps must be a number"),
    (["--set", "steps=2.5"], "steps must be an integer"),
    (["--set", "router.mask_prior=maybe", "--variants", "ot_first"], "router.mask_prior must be true or false"),
    (["--seeds", "a,b"], "--seeds"),
    (["--max-concurrent", "abc"], "'abc' is not an integer"),
    (["--cpus-per-trial", "0"], "must be > 0"),
    (["--gpus-per-trial", "-1"], "must be >= 0"),
    (["--search", "optuna"], "needs --variant"),
    (["--search", "optuna", "--variant", "baseline"], "no continuous knobs"),
    (["--profile", "official-full"], "needs the official Stage1 weights"),
    (["--name", "../escape"], "plain folder name"),
    (["--name", ".hidden"], "plain folder name"),
    (["--name", "x" * 101], "keep it to 100"),
    (["--resume"], "nothing to resume"),
    (["--resume", "maybe"], "--resume takes no value or 'auto', not 'maybe'"),
    (["--seeds", "0,,1"], "--seeds '0,,1' is not a comma-separated list of integers"),
    (["--seeds", "0,"], "--seeds '0,' is not a comma-separated list of integers"),
    (["--name", ""], "--name '' must be a plain folder name"),
    (["--checkpoint", "/tmp/stage1.safetensors"], "--checkpoint is read only by the official-full profile"),
    (["--seeds", "-1"], "--seeds must be in 0..4294967295"),
    (["--seeds", "4294967296"], "--seeds must be in 0..4294967295"),
    (["--set", "lr=nan"], "lr must be a finite number"),
    (["--set", "router.eps=inf", "--variants", "ot_first"], "router.eps must be a finite number"),
    (["--set", "data_seed=-3"], "data_seed must be in 0..4294967295"),
    (["--cpus-per-trial", "inf"], "is not a finite number"),
    (["--summary-dir", "/proc/1/summary"], "--summary-dir /proc/1/summary is not writable"),
    (["--margin", "abc"], "--margin 'abc' is not a number or a percentage"),
    (["--margin", "0%"], "--margin must be positive"),
    (["--metric", "val_art_l2"], "invalid choice: 'val_art_l2'"),  # Stage1 does not log it
    (["--until-conclusive", "3", "--variants", "baseline,ot_first"], "not meant for conclusions"),
])
def test_bad_flags_and_values(tmp_path, capsys, extra, fragment):
    assert_rejected(tmp_path, capsys, base(tmp_path, *extra), fragment)


def test_relative_and_unusable_storage_paths(tmp_path, capsys):
    args = base(tmp_path)
    i = args.index("--storage-path")
    assert_rejected(tmp_path, capsys, args[:i + 1] + ["relative/runs"] + args[i + 2:], "must be an absolute path")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert_rejected(tmp_path, capsys, args[:i + 1] + [str(blocker / "runs")] + args[i + 2:], "is not a folder")


@pytest.mark.parametrize("uri,fragment", [
    ("http://127.0.0.1:9", "does not answer"),
    ("sqlite:///relative.db", "absolute path"),
    ("file:///tmp/mlruns", "neither an absolute sqlite:/// file nor an http(s):// server"),
])
def test_tracking_uri_that_cannot_be_used(tmp_path, capsys, uri, fragment):
    args = base(tmp_path)
    args[args.index("--tracking-uri") + 1] = uri
    assert_rejected(tmp_path, capsys, args, fragment)


def test_tracking_db_that_is_not_sqlite(tmp_path, capsys):
    db = tmp_path / "other.db"
    db.write_text("not a database, keep me")
    args = base(tmp_path)
    args[args.index("--tracking-uri") + 1] = f"sqlite:///{db}"
    assert_rejected(tmp_path, capsys, args, "is not an SQLite database")
    assert db.read_text() == "not a database, keep me"


def test_existing_sweep_is_not_overwritten(tmp_path, capsys):
    existing = tmp_path / "runs" / "bad"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("precious")
    rc = run_sweep("stage1", base(tmp_path))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already exists" in err and "--resume" in err and "\n" not in err
    assert (existing / "keep.txt").read_text() == "precious" and len(list(existing.iterdir())) == 1
    assert not (tmp_path / "mlflow.db").exists()


def _tiny_dataset(folder: Path) -> Path:
    p, c = STAGE1_PRESETS["tiny"], CONDITION_PRESETS["tiny"]
    generate_dataset(folder, 4, seed=0, resolution=p["resolution"], image_size=c["image_size"], grid=c["grid"],
                     cond_channels=p["cond_channels"], prefix_tokens=c["prefix_tokens"])
    return folder


def test_data_folder_with_a_bad_sample(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    bad = data / "samples" / "sample_000002.npz"
    with np.load(bad) as z:
        arrays = dict(z)
    arrays["latents"] = arrays["latents"][:, :, :4]
    np.savez(bad, **arrays)
    err = assert_rejected(tmp_path, capsys, base(tmp_path, "--data", str(data)), "sample_000002.npz", "latents")
    assert "shape" in err


def test_data_folder_for_another_model_and_missing_folder(tmp_path, capsys):
    data = _tiny_dataset(tmp_path / "data")
    assert_rejected(tmp_path, capsys, base(tmp_path, "--data", str(data)).__iadd__(["--model", "small"]) or [], "cond_channels")
    shutil.rmtree(data)
    assert_rejected(tmp_path, capsys, base(tmp_path, "--data", str(data)), str(data))


def test_official_checkpoint_of_the_wrong_kind(tmp_path, capsys):
    ckpt = tmp_path / "wrong.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, ckpt)
    assert_rejected(tmp_path, capsys, base(tmp_path, "--profile", "official-full", "--checkpoint", str(ckpt)),
                    "does not fit the Stage1 'tiny' preset", "missing keys")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(b"\x00\x01")
    assert_rejected(tmp_path, capsys, base(tmp_path, "--profile", "official-full", "--checkpoint", str(truncated)),
                    "could not be read")


def _default_variants(kind_name: str, tmp_path: Path, *flags: str) -> tuple[list[str], dict[str, dict]]:
    """The variants ``--variants all`` (the default) trains, and each one's config less its name."""
    from pact_ray.kinds import get_kind
    from pact_ray.tune.flags import build_parser
    from pact_ray.tune.plan import make_plan

    kind = get_kind(kind_name)
    args = build_parser(kind, "").parse_args([*flags, "--storage-path", str(tmp_path / "runs"),
                                              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    plan = make_plan(kind, args)
    seed = plan.trial_configs[0]["seed"]
    variants = [tc["variant"] for tc in plan.trial_configs if tc["seed"] == seed]
    configs = {}
    for tc, (_, cfg) in zip(plan.trial_configs, plan.configs):
        if tc["seed"] == seed:
            flat = cfg.flat()
            flat.pop("variant")
            configs[tc["variant"]] = {"kind": cfg.kind, **flat}
    return variants, configs


@pytest.mark.parametrize("model", ["tiny", "small", "reference"])
@pytest.mark.parametrize("profile", ["smoke", "quick", "full"])
def test_the_world_models_default_variants_are_distinct(tmp_path, model, profile):
    """--variants all never trains one setting twice: a sized variant at the preset --model
    names (mae_small beside mae at --model small) is the same run, and is left out."""
    variants, configs = _default_variants("world_model", tmp_path, "--model", model, "--profile", profile)
    for i, a in enumerate(variants):
        for b in variants[i + 1:]:
            assert configs[a] != configs[b], (a, b)
    assert {"mae", "mae_random", "gpt"} <= set(variants)  # the plain variants always stay
    assert f"mae_{model}" not in variants
    if model in ("small", "reference"):
        assert f"gpt_{model}" not in variants
    others = {"tiny": {"mae_small", "mae_reference", "gpt_small", "gpt_reference"},
              "small": {"mae_tiny", "mae_reference", "gpt_reference"},
              "reference": {"mae_tiny", "mae_small", "gpt_small"}}[model]
    assert others <= set(variants)  # the sizes that differ from --model stay


@pytest.mark.parametrize("kind", ["stage1", "stage2", "matrix"])
def test_the_other_kinds_default_variants_are_all_distinct_already(tmp_path, kind):
    from pact_ray.kinds import get_kind

    variants, configs = _default_variants(kind, tmp_path, "--model", "tiny")
    assert variants == list(get_kind(kind).variants)
    assert len({json.dumps(c, sort_keys=True, default=str) for c in configs.values()}) == len(variants)
