"""The Stage2 voxel sets: format and validation, the synthetic generator with voxels, and
the sparse voxel batches with PAct's 9-channel latents (collate_voxels)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pact_ray.data.objects.format import DATASET_FILE, DatasetSpec, load_sample, read_dataset_spec, sample_path, write_sample
from pact_ray.data.objects.loader import OWNERSHIP, ArticulatedDataset, collate_voxels
from pact_ray.data.objects.synthetic import PRESETS, SyntheticGenerator, generate_dataset, main
from pact_ray.errors import DataError

TINY = PRESETS["tiny"]
G = 32  # the tiny Stage2 preset's voxel grid


@pytest.fixture(scope="module")
def voxel_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("voxels") / "tiny"
    generate_dataset(out, 8, seed=3, occlusion_prob=0.5, voxel_resolution=G, **TINY)
    return out


def cell_set(coords: np.ndarray) -> set[tuple[int, int, int]]:
    return set(map(tuple, coords[:, 1:].tolist()))


# ---------------------------------------------------------------- generator and format

def test_dataset_with_voxels_validates_and_follows_the_rules(voxel_dir):
    spec = read_dataset_spec(voxel_dir)
    assert (spec.voxel_resolution, spec.voxel_channels) == (G, 8) and spec.has_voxels
    record = json.loads((voxel_dir / DATASET_FILE).read_text())
    assert record["voxel_resolution"] == G and record["voxel_channels"] == 8
    dataset = ArticulatedDataset(voxel_dir, expect={"voxel_resolution": G, "voxel_channels": 8})
    dataset.validate_all()
    for i in range(len(dataset)):
        item = dataset[i]
        coords, feats = item["voxel_coords"], item["voxel_feats"]
        k = len(item["part_labels"])
        assert coords.dtype == np.int16 and feats.dtype == np.float16 and feats.shape == (len(coords), 8)
        rows = coords[:, 0]
        assert rows.min() == 0 and rows.max() == k and (np.bincount(rows) > 0).all()
        union = set().union(*(cell_set(coords[rows == r]) for r in range(1, k + 1)))
        assert cell_set(coords[rows == 0]) == union  # the whole-object row
        assert (coords[:, 1:] >= 0).all() and (coords[:, 1:] < G).all()


def test_voxels_leave_every_other_array_unchanged(tmp_path):
    plain = DatasetSpec(name="t", num_samples=1, max_parts=8, prefix_tokens=5, **TINY)
    voxel = DatasetSpec(name="t", num_samples=1, max_parts=8, prefix_tokens=5, voxel_resolution=G, voxel_channels=8, **TINY)
    a = SyntheticGenerator(plain, seed=1, occlusion_prob=0.3).sample(4)
    b = SyntheticGenerator(voxel, seed=1, occlusion_prob=0.3).sample(4)
    assert set(b) - set(a) == {"voxel_coords", "voxel_feats"}
    for key, value in a.items():
        np.testing.assert_array_equal(b[key], value)
    # Stage1 datasets keep their dataset.json: no voxel keys at all.
    assert "voxel_resolution" not in plain.to_json() and DatasetSpec.from_json(voxel.to_json()) == voxel


def test_surface_voxels_and_feature_scale(voxel_dir):
    dataset = ArticulatedDataset(voxel_dir)
    feats = np.concatenate([dataset[i]["voxel_feats"].astype(np.float32) for i in range(len(dataset))])
    std = feats.std(axis=0)
    assert np.all((std > 0.5) & (std < 1.5)), std
    # Surface, not solid: the body's row is a thin shell (far fewer voxels than its box volume).
    coords = dataset[0]["voxel_coords"]
    body = coords[coords[:, 0] == 1, 1:]
    volume = np.prod(body.max(0) - body.min(0) + 1)
    assert len(body) < 0.6 * volume


def hand_made_voxels(num_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid voxel arrays: part k owns cells (k, 0, 0) and (k, 1, 0); part 0 also (1, 0, 0), shared with part 1."""
    rows = {k + 1: [(k, 0, 0), (k, 1, 0)] for k in range(num_parts)}
    rows[1].append((1, 0, 0))
    rows[0] = sorted(set().union(*rows.values()))
    coords = np.array([(r, *c) for r in sorted(rows) for c in sorted(rows[r])], dtype=np.int16)
    return coords, np.random.default_rng(0).standard_normal((len(coords), 8)).astype(np.float16)


def _voxel_sample(spec: DatasetSpec) -> dict[str, np.ndarray]:
    sample = SyntheticGenerator(spec, seed=0).sample(0)
    sample["voxel_coords"], sample["voxel_feats"] = hand_made_voxels(len(sample["part_labels"]))
    return sample


VOXEL_SPEC = DatasetSpec(name="t", num_samples=1, max_parts=8, prefix_tokens=5, voxel_resolution=G, voxel_channels=8, **TINY)


def _coords(fn):
    def edit(s):
        s["voxel_coords"] = fn(s["voxel_coords"].copy())
    return edit


def _swap_first_two(c):
    c[[0, 1]] = c[[1, 0]]
    return c


def _poke(index, value):
    def fn(c):
        c[index] = value
        return c
    return fn


# (edit of a valid sample, text the message must contain)
BAD_VOXELS = {
    "missing": (lambda s: s.pop("voxel_feats"), "missing key 'voxel_feats'"),
    "coords dtype": (lambda s: s.update(voxel_coords=s["voxel_coords"].astype(np.int32)), "voxel_coords has dtype int32, expected int16"),
    "coords shape": (_coords(lambda c: c[:, :3]), "voxel_coords has shape"),
    "feats shape": (lambda s: s.update(voxel_feats=s["voxel_feats"][:, :4]), "expected (V, 8) with V ="),
    "row above K": (_coords(_poke((-1, 0), 99)), "expected 0..K"),
    "cell outside grid": (_coords(_poke((-1, 3), G)), f"expected 0..{G - 1}"),
    "not sorted": (_coords(_swap_first_two), "not in canonical order"),
    "duplicate": (_coords(lambda c: np.concatenate([c[:1], c[:-1]])), "not in canonical order"),
    "whole row not the union": (_coords(_poke((0, 3), 5)), "is not the union of the part rows"),
    "empty row": (lambda s: _drop_row(s, 2), "voxel row 2 has no voxel"),
    "nan feats": (lambda s: s["voxel_feats"].__setitem__((0, 0), np.nan), "voxel_feats contains 1 non-finite values"),
}


def _drop_row(sample, row):
    keep = sample["voxel_coords"][:, 0] != row
    sample["voxel_coords"], sample["voxel_feats"] = sample["voxel_coords"][keep], sample["voxel_feats"][keep]


@pytest.mark.parametrize("case", sorted(BAD_VOXELS))
def test_invalid_voxels_raise_data_error_naming_the_file(tmp_path, case):
    edit, expected = BAD_VOXELS[case]
    sample = _voxel_sample(VOXEL_SPEC)
    load_sample(write_sample(tmp_path, 0, sample), VOXEL_SPEC)  # valid before the edit
    edit(sample)
    path = sample_path(tmp_path, 1)
    np.savez(path, **sample)  # a foreign writer: no key check
    with pytest.raises(DataError) as info:
        load_sample(path, VOXEL_SPEC)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert message.count(". ") == 0 and message.endswith(".")


def test_write_sample_takes_both_voxel_keys_or_neither(tmp_path):
    sample = _voxel_sample(VOXEL_SPEC)
    del sample["voxel_feats"]
    with pytest.raises(ValueError, match="missing keys \\['voxel_feats'\\]"):
        write_sample(tmp_path, 0, sample)


def test_expecting_voxels_of_a_dataset_without_them(tmp_path):
    generate_dataset(tmp_path / "plain", 2, seed=0, **TINY)
    with pytest.raises(DataError, match="has no voxel sets but the Stage2 model needs them \\(generate it with --voxel-resolution 32\\)"):
        ArticulatedDataset(tmp_path / "plain", expect={"voxel_resolution": G})
    generate_dataset(tmp_path / "v", 1, seed=0, voxel_resolution=G, **TINY)
    with pytest.raises(DataError, match="voxel_resolution is 32 but the model needs 64"):
        ArticulatedDataset(tmp_path / "v", expect={"voxel_resolution": 64})


def test_cli_voxel_resolution(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--num-samples", "2", "--preset", "tiny", "--voxel-resolution", "16"]) == 0
    dataset = ArticulatedDataset(out, expect={"voxel_resolution": 16})
    assert dataset[1]["voxel_coords"][:, 1:].max() < 16


# ---------------------------------------------------------------- collate_voxels

def brute_force_rows(item) -> list[dict[tuple[int, int, int], np.ndarray]]:
    """PAct's rows of one object from their definition (loader.pact_latents), with sets:
    {cell: 9-channel latent} per row, whole object first."""
    coords, feats = item["voxel_coords"], item["voxel_feats"].astype(np.float32)
    k = len(item["part_labels"])
    own = [{tuple(c): f for c, f in zip(coords[coords[:, 0] == r, 1:].tolist(), feats[coords[:, 0] == r])} for r in range(k + 1)]
    rows, votes = [], {cell: [0, 0] for cell in own[0]}
    for r in range(1, k + 1):
        lo, hi = np.array(list(own[r])).min(0), np.array(list(own[r])).max(0)
        context = {c for q in range(1, k + 1) if q != r for c in own[q]
                   if all(lo[a] < c[a] < hi[a] for a in range(3)) and c not in own[r]}
        row = {c: np.append(f, OWNERSHIP) for c, f in own[r].items()}
        row.update({c: np.append(np.zeros(8, np.float32), -OWNERSHIP) for c in context})
        for c in own[r]:
            votes[c][0] += 1
        for c in context:
            votes[c][1] += 1
        rows.append(row)
    whole = {c: np.append(f, OWNERSHIP * (votes[c][0] - votes[c][1]) / sum(votes[c])) for c, f in own[0].items()}
    return [whole] + rows


def test_collate_voxels_layout(voxel_dir):
    dataset = ArticulatedDataset(voxel_dir)
    items = [dataset[i] for i in range(3)]
    counts = [len(item["part_labels"]) for item in items]
    batch = collate_voxels(items)  # no cap: every voxel
    expected_rows = [row for item in items for row in brute_force_rows(item)]
    t, b, p = sum(len(r) for r in expected_rows), len(items), sum(counts)
    shapes = {
        "coords": (t, 4), "latents": (t, 9), "num_rows": (b,), "cond": (b, 41, 64), "masks": (b, 6, 6),
        "pixel_masks": (b, 48, 48), "num_parts": (b,), "articulation": (p, 24), "art_valid": (p, 24),
        "part_labels": (p,), "joint_types": (p,), "index": (b,),
    }
    assert {k: tuple(v.shape) for k, v in batch.items()} == shapes
    assert batch["num_rows"].tolist() == [c + 1 for c in counts]
    rows = batch["coords"][:, 0]
    assert (rows.diff() >= 0).all() and rows.max() == len(expected_rows) - 1
    for r, expected in enumerate(expected_rows):
        xyz = batch["coords"][rows == r, 1:]
        keys = (xyz[:, 0] * G + xyz[:, 1]) * G + xyz[:, 2]
        assert (keys.diff() > 0).all()  # (x, y, z) order, each cell once
        assert [tuple(c) for c in xyz.tolist()] == sorted(expected)
        np.testing.assert_allclose(batch["latents"][rows == r].numpy(), np.stack([expected[c] for c in sorted(expected)]),
                                   rtol=1e-6, atol=0)
    ownership = batch["latents"][:, -1]
    assert (ownership == -OWNERSHIP).any()  # context voxels: a drawer's tray inside its body's box
    whole_rows = torch.cat([torch.tensor([0]), torch.cumsum(batch["num_rows"], 0)[:-1]])
    whole = torch.isin(rows, whole_rows)
    assert ((ownership[whole] > -OWNERSHIP) & (ownership[whole] <= OWNERSHIP)).all() and (ownership[whole] < OWNERSHIP).any()


def test_collate_voxels_cap_is_a_seeded_subset(voxel_dir):
    dataset = ArticulatedDataset(voxel_dir)
    items = [dataset[0], dataset[1]]
    full = collate_voxels(items)
    a = collate_voxels(items, 16, torch.Generator().manual_seed(5))
    b = collate_voxels(items, 16, torch.Generator().manual_seed(5))
    c = collate_voxels(items, 16, torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["coords"], c["coords"])
    rows = int(full["num_rows"].sum())
    assert torch.bincount(a["coords"][:, 0], minlength=rows).tolist() == torch.bincount(full["coords"][:, 0]).clamp(max=16).tolist()
    for row in range(rows):  # a subset of the row, kept in order, with its latents
        kept = a["coords"][a["coords"][:, 0] == row]
        everything = {tuple(v): lat for v, lat in zip(full["coords"][full["coords"][:, 0] == row].tolist(),
                                                       full["latents"][full["coords"][:, 0] == row])}
        keys = (kept[:, 1] * G + kept[:, 2]) * G + kept[:, 3]
        assert (keys.diff() > 0).all()
        for v, lat in zip(kept.tolist(), a["latents"][a["coords"][:, 0] == row]):
            assert torch.equal(everything[tuple(v)], lat)
    with pytest.raises(ValueError, match="needs samples with voxel sets"):
        collate_voxels([{k: v for k, v in items[0].items() if k != "voxel_coords"}])
