"""PAct's training layout: `pact-object-data from-pact` against what PAct's own dataset
classes derive from the fixture object (tests/fixtures/pact_layout_tiny*, copies of
../shared/fixtures), its refusals of bad input, resuming and the process pool.

Every comparison with the fixture is exact: the converter performs PAct's operations in
PAct's precision (float32 codes and centres, float64 transforms, integer crops and cell
votes, one float32 mean of at most two features per shared voxel, which no order changes),
so a difference is a defect, not rounding."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_path

from pact_ray.data.cache import OBJECTS_FORMAT
from pact_ray.data.objects import pact
from pact_ray.data.objects.articulation import ENCODING, validity_mask
from pact_ray.data.objects.format import FORMAT_VERSION
from pact_ray.data.objects.loader import ArticulatedDataset
from pact_ray.data.objects.synthetic import main as object_data_main
from pact_ray.errors import DataError

LAYOUT = fixture_path("pact_layout_tiny_expected.pt").parent / "pact_layout_tiny"
ROOT = LAYOUT / "data" / "StorageFurniture"
OBJECT = ROOT / "40001"
EXPECTED = torch.load(fixture_path("pact_layout_tiny_expected.pt"), weights_only=True)
OBJ = EXPECTED["objects"]["StorageFurniture/40001"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pact") / "out"
    pact.convert(ROOT, out, workers=1, log=lambda line: None)
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- PAct's values

def test_parts_geometry_and_articulation_are_pacts():
    parts, json_ids = pact.read_parts(OBJECT)
    assert json_ids == [0, 1, 2]
    assert [p.id for p in parts] == OBJ["part_ids"].tolist() == [0, 2, 1]  # sorted by aabb min (z, y, x)
    assert [p.name for p in parts] == OBJ["part_names"]
    for key, attr in (("aabb_min_xyz", "aabb_min"), ("aabb_max_xyz", "aabb_max"), ("axis_origin", "origin"),
                      ("axis_direction", "direction")):
        assert torch.equal(torch.from_numpy(np.stack([getattr(p, attr) for p in parts])), OBJ[key]), key
    arti = torch.from_numpy(pact.articulation(parts))
    assert torch.equal(arti, OBJ["x_0_arti"])
    # Signed zeros too (the flip negates the unused slots): PAct's vector bit for bit.
    assert torch.equal(arti.view(torch.int32), OBJ["x_0_arti"].view(torch.int32))
    ids = torch.tensor([p.joint_type for p in parts])
    assert torch.equal(validity_mask(ids).float(), OBJ["x_0_arti_mask"])
    assert torch.equal(torch.from_numpy(pact.structure_latents(OBJECT, parts)), OBJ["x_0"])


def test_views_are_pacts():
    ids = OBJ["json_list_ids"]
    for view, exp in OBJ["views"].items():
        from PIL import Image

        rgba = np.array(Image.open(OBJECT / "imgs" / f"{view}.png"))
        box = pact.crop_box(rgba[..., 3])
        assert list(box) == exp["aug_bbox_xyxy"]
        crop = pact.padded_crop(rgba, box)
        assert np.array_equal(np.where(crop[..., 3:] == 0, 0, crop[..., :3]), exp["crop_rgb_black_bg_uint8"].numpy())
        image, cells = pact.read_view(OBJECT, view, ids)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        assert hashlib.sha256(chw.tobytes()).hexdigest() == exp["cond_uint8_sha256"]
        assert np.array_equal(cells, exp["masks_unsorted"].numpy())


def test_converted_samples_are_pacts(converted):
    dataset = ArticulatedDataset(converted)  # every sample validated on loading
    spec = dataset.spec
    assert (spec.resolution, spec.image_size, spec.grid, spec.voxel_resolution) == (16, (518, 518), (37, 37), 64)
    assert spec.generator["pact_commit"] == pact.PACT_COMMIT and len(dataset) == 3
    stage2 = OBJ["stage2"]
    ids = OBJ["part_ids"].tolist()
    for i in range(len(dataset)):
        s = dataset[i]
        view = f"{int(s['view']):02d}"
        assert str(s["source"]) == "StorageFurniture/40001"
        assert str(s["split"]) == ("test" if view == "18" else "train")
        assert torch.equal(torch.from_numpy(s["latents"]), OBJ["x_0"])
        assert torch.equal(torch.from_numpy(s["articulation"]), OBJ["x_0_arti"])
        assert s["part_labels"].tolist() == OBJ["label_ids"].tolist()
        assert s["joint_types"].tolist() == OBJ["joint_type_ids"].tolist()
        exp = OBJ["views"][view]
        assert hashlib.sha256(np.ascontiguousarray(s["image"].transpose(2, 0, 1)).tobytes()).hexdigest() == exp["cond_uint8_sha256"]
        # The grid mask the loader derives is PAct's 37x37 mask, labels id + 1 -> position + 1.
        to_pact = np.array([0] + [k + 1 for k in ids])
        assert np.array_equal(to_pact[s["grid_mask"]], exp["masks_unsorted"].numpy())
        # Stage2: row k + 1 = part k's SLat voxels (sorted), row 0 = PAct's merge without noise.
        coords, feats = s["voxel_coords"].astype(np.int64), s["voxel_feats"]
        for k, (raw_c, raw_f) in enumerate(zip(stage2["part_raw_coords"], stage2["part_raw_feats"])):
            order = np.lexsort(raw_c.numpy().T[::-1])
            row = coords[:, 0] == k + 1
            assert np.array_equal(coords[row, 1:], raw_c.numpy()[order]) and np.array_equal(feats[row], raw_f.numpy()[order])
        whole = coords[:, 0] == 0
        no_noise = stage2["no_noise"]
        start, stop = no_noise["part_layouts"][0]
        assert np.array_equal(coords[whole, 1:], no_noise["coords"][start:stop].numpy())
        _, counts = np.unique(coords[~whole, 1:], axis=0, return_counts=True)
        assert counts.max() == 2  # the module docstring's exactness argument: shared by two parts at most
        assert np.array_equal(feats[whole], no_noise["feats"][start:stop, :8].numpy())


def test_split_file_chooses_pacts_views(tmp_path):
    """The fixture's split lists the object for training: PAct reads views 00-17 only."""
    out = tmp_path / "out"
    pact.convert(ROOT, out, split_file=LAYOUT / "split.json", workers=1, log=lambda line: None)
    dataset = ArticulatedDataset(out)
    assert [(int(dataset[i]["view"]), str(dataset[i]["split"])) for i in range(len(dataset))] == [(0, "train"), (1, "train")]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [], "test": ["StorageFurniture/40001"]}))
    pact.convert(ROOT, tmp_path / "test", split_file=split, workers=1, log=lambda line: None)
    assert [int(s["view"]) for s in ArticulatedDataset(tmp_path / "test")] == [18]
    split.write_text(json.dumps({"train": ["Other/1"], "test": []}))
    with pytest.raises(DataError, match="lists none of the 1 objects"):
        pact.convert(ROOT, tmp_path / "none", split_file=split, workers=1, log=lambda line: None)


def test_versions_agree():
    assert OBJECTS_FORMAT == FORMAT_VERSION == 2 and ENCODING == f"pact-{pact.PACT_COMMIT}"


# ---------------------------------------------------------------- bad input


def _root_with(tmp_path: Path, edit) -> Path:
    root = tmp_path / "src" / "StorageFurniture"
    shutil.copytree(ROOT, root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    edit(root / "40001")
    return root


def _add_node(obj: Path) -> None:
    path = obj / pact.OBJECT_JSON
    record = json.loads(path.read_text())
    node = dict(record["diffuse_tree"][1], id=7, name="handle")
    record["diffuse_tree"].append(node)
    path.write_text(json.dumps(record))


def _mask_label(obj: Path) -> None:
    path = obj / pact.MASKS / "01.npz"
    mask = np.load(path)["semantic_mask"].copy()
    mask[30, 30] = 5
    np.savez(path, semantic_mask=mask)


BAD_INPUT = {
    "not PAct's layout": (lambda obj: shutil.rmtree(obj / pact.PREPROCESS), "StorageFurniture: not a PAct dataset root"),
    "no object json": (lambda obj: (obj / pact.OBJECT_JSON).unlink(), "40001/object_merge_fixed.json: file not found"),
    "missing full latent": (lambda obj: (obj / pact.SS_LATENTS / "full.npz").unlink(), "full.npz: missing latent"),
    "missing SLat latent": (lambda obj: (obj / pact.SLAT_LATENTS / "part_1_door.npz").unlink(),
                            "part_1_door.npz: missing latent of part id 1 (door)"),
    "part id not on disk": (_add_node, "part_7_handle.npz: missing latent of part id 7 (handle), which object_merge_fixed.json lists"),
    "mask label beyond the parts": (_mask_label, "semantic_masks_merge_fixed/01.npz: holds labels [5] beyond the parts (ids [0, 1, 2])"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_sentence_exit_2_and_nothing_written(tmp_path, capsys, case):
    edit, expected = BAD_INPUT[case]
    root = _root_with(tmp_path, edit)
    out = tmp_path / "out"
    assert object_data_main(["from-pact", str(root), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1] and err[-1].count(". ") == 0, err
    assert not out.exists() and not out.with_name(".out.partial").exists()  # nothing to resume either


def test_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    assert object_data_main(["from-pact", str(ROOT), "--out", str(tmp_path / "out")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "x").read_text() == "keep"


# ---------------------------------------------------------------- scale: resume and the pool


def _two_objects(tmp_path: Path) -> Path:
    root = _root_with(tmp_path, lambda obj: None)
    shutil.copytree(root / "40001", root / "40002")
    return root


def test_resume_skips_finished_objects(tmp_path, converted):
    root = _two_objects(tmp_path)
    full = root / "40002" / pact.SS_LATENTS / "full.npz"
    full.rename(full.with_suffix(".bak"))  # the second object fails after the first is done
    out, lines = tmp_path / "out", []
    with pytest.raises(DataError, match="40002/.*full.npz: missing latent"):
        pact.convert(root, out, workers=1, log=lines.append)
    assert not out.exists() and lines == [lines[0]] and lines[0].startswith("[1/2] StorageFurniture/40001: 3 views")
    full.with_suffix(".bak").rename(full)
    lines.clear()
    pact.convert(root, out, workers=1, log=lines.append)
    assert lines[0] == "resuming: 1 of 2 objects already converted" and lines[1].startswith("[2/2] StorageFurniture/40002")
    dataset = ArticulatedDataset(out)
    assert [str(s["source"]) for s in dataset] == ["StorageFurniture/40001"] * 3 + ["StorageFurniture/40002"] * 3
    assert dataset.groups.tolist() == [0, 0, 0, 1, 1, 1]  # the trainers' held-out split keeps objects whole
    assert not out.with_name(".out.partial").exists()
    # The first object's samples are those of a one-object conversion, byte for byte.
    mine, reference = files_of(out / "samples"), files_of(converted / "samples")
    assert all(mine[name] == reference[name] for name in reference)


def test_a_process_pool_gives_the_same_files(tmp_path):
    root = _two_objects(tmp_path)
    pact.convert(root, tmp_path / "one", workers=1, log=lambda line: None)
    pact.convert(root, tmp_path / "two", workers=2, log=lambda line: None)
    assert files_of(tmp_path / "one" / "samples") == files_of(tmp_path / "two" / "samples")


def test_old_stage2_checkpoints_are_refused(tmp_path):
    from pact_ray.training.checkpoints import META_FILE, STATE_FILE, read_checkpoint

    torch.save({"step": 1}, tmp_path / STATE_FILE)
    (tmp_path / META_FILE).write_text(json.dumps({"step": 1, "kind": "stage2", "sha256": "x", "config": {}}))
    with pytest.raises(ValueError, match="articulation vectors in the project's first encoding"):
        read_checkpoint(tmp_path, "stage2", articulation=True)
    # What decides is the config's own flag, which the trial passes (Stage2 predicts articulation).
    from pact_ray.runs.stage1 import Stage1RunConfig
    from pact_ray.runs.stage2 import Stage2RunConfig

    assert Stage2RunConfig.predicts_articulation and not Stage1RunConfig.predicts_articulation


# ---------------------------------------------------------------- sweeps on converted data


@pytest.mark.slow
def test_sweeps_run_on_the_converted_fixture(tmp_path, ray_address, capsys):
    """`--data DST` of the converted fixture (shrunk to the tiny preset, --preset tiny) trains
    Stage1, Stage2 and the OT matrix end to end (smoke profile: one step, one seed)."""
    from pact_ray.report.summary import JSON_NAME
    from pact_ray.tune.sweep import run_sweep

    data = tmp_path / "pact-tiny"
    # Two objects: the trainers hold out whole objects (a view's object is never trained on).
    pact.convert(_two_objects(tmp_path), data, preset="tiny", workers=1, log=lambda line: None)
    for kind, variants in (("stage1", "baseline"), ("stage2", "spatial_adapter"), ("matrix", "stage1_ot_first,stage2_baseline")):
        rc = run_sweep(kind, ["--model", "tiny", "--profile", "smoke", "--name", kind, "--storage-path", str(tmp_path / "runs"),
                              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet", "--variants", variants,
                              "--data", str(data)])
        out = capsys.readouterr().out
        assert rc == 0, out
        rows = json.loads((tmp_path / "runs" / kind / "summary" / JSON_NAME).read_text())
        assert len(rows) == len(variants.split(",")) and all(r["status"] == "finished" and r["loss"] is not None for r in rows), rows
        assert all((r["art_l2"] is not None) == (r["kind"] == "stage2") for r in rows)


def test_a_node_without_aabb_is_dropped_as_pact_drops_it(tmp_path):
    """PAct silently drops a node with no aabb; its id stays a legal mask value, read as background."""
    def drop_door_aabb(obj: Path) -> None:
        path = obj / pact.OBJECT_JSON
        record = json.loads(path.read_text())
        del record["diffuse_tree"][1]["aabb"]  # the door (id 1)
        path.write_text(json.dumps(record))

    root = _root_with(tmp_path, drop_door_aabb)
    parts, json_ids = pact.read_parts(root / "40001")
    assert [p.id for p in parts] == [0, 2] and json_ids == [0, 1, 2]
    pact.convert(root, tmp_path / "out", workers=1, log=lambda line: None)
    sample = ArticulatedDataset(tmp_path / "out")[0]
    keep = [0, 1]  # base and drawer rows of PAct's x_0_arti
    assert torch.equal(torch.from_numpy(sample["articulation"]), OBJ["x_0_arti"][keep])
    pact_cells = OBJ["views"]["00"]["masks_unsorted"].numpy()
    expected = np.select([pact_cells == 1, pact_cells == 3], [1, 2], 0)  # base -> 1, drawer -> 2, door -> background
    assert np.array_equal(sample["grid_mask"], expected)


def test_the_trainers_hold_out_whole_objects(tmp_path):
    """On converted data the held-out split is by object: no view of a validation object is
    trained on (views of one object are near-duplicates; scoring them would flatter a model)."""
    import dataclasses

    from pact_ray.runs.stage1 import Stage1RunConfig
    from pact_ray.training.stage1 import Stage1Trainer

    root = _two_objects(tmp_path)
    shutil.copytree(root / "40001", root / "40003")
    data = tmp_path / "data"
    pact.convert(root, data, preset="tiny", workers=1, log=lambda line: None)
    cfg = dataclasses.replace(Stage1RunConfig.for_variant("baseline", "smoke", "tiny", seed=0), data=str(data),
                              batch_size=2, val_fraction=0.3)
    trainer = Stage1Trainer(cfg)
    groups = trainer.dataset.groups
    assert len(trainer.val_ids) == 3 and not set(groups[trainer.train_ids]) & set(groups[trainer.val_ids])
