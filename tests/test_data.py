"""Tests of the data layer: articulation vectors, the on-disk format and its validation,
the stand-in encoders, the synthetic generator and the part-wise loader."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_path
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numerics import rounding_bound

from pact_ray.data.objects.articulation import (
    FIXED,
    JOINT_TYPES,
    LABELS,
    ROTATIONAL,
    SLIDING,
    SLOT_GROUPS,
    decode_articulation,
    encode_articulation,
    encode_articulation_batch,
    uses_origin,
    validity_mask,
)
from pact_ray.data.objects.encoder import StandInImageEncoder, StandInStructureEncoder
from pact_ray.data.objects.format import (
    DATASET_FILE,
    DatasetSpec,
    grid_mask,
    grid_mask_batch,
    load_sample,
    read_dataset_spec,
    sample_path,
    write_dataset_spec,
    write_sample,
)
from pact_ray.data.objects.loader import ArticulatedDataset, collate_parts, make_loader
from pact_ray.data.objects.synthetic import BACKGROUND, PRESETS, SyntheticGenerator, generate_dataset, main
from pact_ray.errors import DataError

TINY = PRESETS["tiny"]
PACT_EXPECTED = fixture_path("pact_layout_tiny_expected.pt")
TINY_SPEC = DatasetSpec(name="tiny", num_samples=1, max_parts=8, prefix_tokens=5, **TINY)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    generate_dataset(out, 24, seed=7, occlusion_prob=0.5, **TINY)
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hand_made_sample(spec: DatasetSpec, num_parts: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid sample with random contents: body + alternating doors and drawers."""
    rng = np.random.default_rng(seed)
    height, width = spec.image_size
    r = spec.resolution
    movable = [JOINT_TYPES["revolute"], JOINT_TYPES["prismatic"]] * num_parts
    joint_types = np.array([FIXED] + movable, dtype=np.int64)[:num_parts]
    labels = np.array([LABELS.index("base")] + [LABELS.index(n) for n in ("door", "drawer")] * num_parts, dtype=np.int64)
    labels = labels[:num_parts]
    return {
        "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "mask": rng.integers(0, num_parts + 1, (height, width), dtype=np.uint8),
        "latents": rng.standard_normal((num_parts, spec.latent_channels, r, r, r)).astype(np.float32),
        "articulation": encode_articulation_batch(
            joint_types, rng.standard_normal((num_parts, 3)), rng.uniform(-1, 1, (num_parts, 3)),
            rng.uniform(-1, 1, (num_parts, 3)), rng.uniform(0, 1, num_parts), labels,
        ),
        "cond": rng.standard_normal((spec.num_tokens, spec.cond_channels)).astype(np.float16),
        "part_labels": labels,
        "joint_types": joint_types,
    }


# ---------------------------------------------------------------- articulation

axis_strategy = st.tuples(*[st.one_of(st.just(0.0), st.floats(-2, 2, allow_nan=False))] * 3).filter(
    lambda a: np.linalg.norm(a) > 1e-2)
point = st.tuples(*[st.floats(-1, 1, allow_nan=False)] * 3)
f32 = lambda scale, ops: rounding_bound(scale, ops, torch.float32)  # noqa: E731


@settings(max_examples=200, deadline=None)
@given(
    joint_type=st.sampled_from(sorted(JOINT_TYPES.values())),
    axis=axis_strategy,
    origin=point,
    centre=point,
    limit=st.floats(-360, 360, allow_nan=False),
    label=st.integers(0, len(LABELS) - 1),
    noise=st.floats(-0.09, 0.09),
)
def test_articulation_round_trip(joint_type, axis, origin, centre, limit, label, noise):
    """PAct's encoding (fixture README section 4), slot by slot, and its decoding."""
    vec = encode_articulation(joint_type, axis, origin, centre, limit, label)
    assert vec.shape == (24,) and vec.dtype == np.float32
    out = decode_articulation(vec)
    assert out["joint_type"] == joint_type and out["label"] == label
    for group in ("type", "label"):
        assert (vec[SLOT_GROUPS[group]] == vec[SLOT_GROUPS[group]][0]).all()  # one code, repeated 6x
    turns, length = vec[12:15], vec[15:18]
    assert (turns == turns[0]).all() and (length == length[0]).all()  # [r, r, r, l, l, l]
    # The pivot slots hold the float32 origin (rotational joints, sliding doors) or aabb centre.
    pivot = origin if joint_type in ROTATIONAL or (joint_type in SLIDING and label == LABELS.index("door")) else centre
    assert np.array_equal(vec[SLOT_GROUPS["origin"]], np.float32(pivot))
    assert bool(uses_origin([joint_type], [label])[0]) == (pivot is origin)
    if joint_type == FIXED:
        assert not vec[SLOT_GROUPS["axis"]].any() and not vec[SLOT_GROUPS["range"]].any()
        return
    # Flip rule: more negative than positive components of 0.7 d (zeros not counted; ties kept).
    scaled = np.float32(0.7) * np.float32(axis)
    sign = -1.0 if (scaled > 0).sum() < (scaled < 0).sum() else 1.0
    stored = vec[SLOT_GROUPS["axis"]]
    # One float32 rounding of the input, one of the product (the negation is exact).
    assert np.abs(stored - sign * 0.7 * np.asarray(axis)).max() <= f32(0.7 * np.abs(axis).max(), 2)
    assert (stored > 0).sum() >= (stored < 0).sum()
    unit = np.asarray(axis) / np.linalg.norm(axis)
    # Decoding divides by 0.7 and normalises: squares, a sum of 3, a root and a division (6 ops).
    assert np.abs(out["axis"] - sign * unit).max() <= f32(1.0, 2 + 1 + 6) / np.linalg.norm(axis) * np.abs(axis).max() + f32(1.0, 9)
    degrees, metres = out["range"]
    if joint_type in ROTATIONAL:  # r = limit / 360 (two roundings), a mean of 3, times 360
        assert metres == 0 and abs(degrees - sign * limit) <= 360 * f32(abs(limit) / 360, 2 + 3 + 2)
    else:  # screw and prismatic: l = limit, raw
        assert degrees == 0 and abs(metres - sign * limit) <= f32(abs(limit), 1 + 3 + 1)
    # Re-encoding what was decoded gives the vector back (decoded axis at length 1, limit by its sign).
    again = encode_articulation(joint_type, out["axis"] * np.linalg.norm(axis), out["origin"], out["origin"],
                                degrees if joint_type in ROTATIONAL else metres, out["label"])
    assert np.abs(again - vec).max() <= f32(max(1.0, abs(limit)), 16)
    # Discrete slots survive noise below half an id step; torch decoding agrees with numpy.
    noisy = vec.copy()
    noisy[SLOT_GROUPS["type"]] += noise
    noisy[SLOT_GROUPS["label"]] -= noise
    decoded = decode_articulation(torch.from_numpy(noisy))
    assert decoded["joint_type"].item() == joint_type and decoded["label"].item() == label
    # torch and numpy normalise the same float32 axis, each in its own order (6 operations).
    assert np.abs(decoded["axis"].numpy() - out["axis"]).max() <= rounding_bound(1.0, 2 * 6, torch.float32)


def test_articulation_codes_are_pacts():
    """The type and label codes in float32, as PAct's loader computes them (the fixture's
    conventions), and the cases the fixture README works through."""
    expected = torch.load(PACT_EXPECTED, weights_only=True)["conventions"]
    types = list(JOINT_TYPES.values())
    vec = encode_articulation_batch(types, np.ones((5, 3)), np.zeros((5, 3)), np.zeros((5, 3)), np.zeros(5), np.zeros(5))
    assert vec[:, 0].tolist() == [expected["joint_type_code"][n] for n in JOINT_TYPES]
    vec = encode_articulation_batch(np.ones(8), np.zeros((8, 3)), np.zeros((8, 3)), np.zeros((8, 3)), np.zeros(8), range(8))
    assert vec[:, 18].tolist() == [expected["label_code"][n] for n in LABELS]
    door, drawer = LABELS.index("door"), LABELS.index("drawer")
    origin, centre = (0.1, 0.2, 0.3), (-0.4, -0.5, -0.6)
    # A revolute door about (0, 0, -1): flipped, so the range slot is -97.5 / 360; pivot = origin.
    v = encode_articulation(JOINT_TYPES["revolute"], (0, 0, -1), origin, centre, 97.5, door)
    assert v[6:9].tolist() == [0, 0, np.float32(0.7)] and v[12] == -np.float32(97.5) / np.float32(360) and v[15] == 0
    assert v[9:12].tolist() == np.float32(origin).tolist()
    # A drawer along (0, -1, 0): flipped, -0.41 in the length slots, pivot = aabb centre.
    v = encode_articulation(JOINT_TYPES["prismatic"], (0, -1, 0), origin, centre, 0.41, drawer)
    assert v[15:18].tolist() == [-np.float32(0.41)] * 3 and v[12:15].tolist() == [0] * 3
    assert v[9:12].tolist() == np.float32(centre).tolist()
    # A sliding door along (-0.96, 0.28, 0): a tie (one negative, one positive), not flipped; pivot = origin.
    v = encode_articulation(JOINT_TYPES["prismatic"], (-0.96, 0.28, 0), origin, centre, 0.3, door)
    assert v[6] < 0 and v[15] == np.float32(0.3) and v[9:12].tolist() == np.float32(origin).tolist()
    # A fixed part: no axis, no range, its aabb centre.
    v = encode_articulation(FIXED, (0, -1, 0), origin, centre, 5.0, LABELS.index("base"))
    assert not v[6:9].any() and not v[12:18].any() and v[9:12].tolist() == np.float32(centre).tolist()


def test_decode_batch_and_validity_mask():
    vec = encode_articulation_batch(
        [1, 2, 3], [[0, 0, 0], [0, -1, 0], [0, 0, 2]], np.zeros((3, 3)), np.zeros((3, 3)), [0, 100, 0.3], [2, 0, 1]
    )
    batch = np.stack([vec, vec])  # [2, 3, 24]
    out = decode_articulation(torch.from_numpy(batch))
    assert out["joint_type"].shape == (2, 3) and out["joint_type"].dtype == torch.int64
    assert out["axis"].shape == (2, 3, 3) and out["range"].shape == (2, 3, 2)
    # A unit axis along y and 100 degrees survive float32 storage to its rounding (as above).
    assert np.abs(out["axis"][0, 1].numpy() - [0, 1, 0]).max() <= rounding_bound(1.0, 2 + 6 + 1, torch.float32)
    # axis flipped -> range negated
    assert np.abs(out["range"][0, 1].numpy() - [-100, 0]).max() <= rounding_bound(100.0, 2 + 3 + 2, torch.float32)
    assert np.abs(out["range"][0, 2].numpy() - [0, 0.3]).max() <= rounding_bound(0.3, 1 + 3 + 1, torch.float32)
    for mask in (validity_mask(np.array([1, 2, 3])), validity_mask(torch.tensor([1, 2, 3])).numpy()):
        assert mask.shape == (3, 24) and mask.sum() == 72 - 6
        assert not mask[0, 6:12].any() and mask[0, :6].all() and mask[0, 12:].all()
    assert validity_mask(FIXED).shape == (24,)
    # Out-of-range predictions clamp to valid ids.
    wild = np.full(24, 5.0, dtype=np.float32)
    assert decode_articulation(wild)["joint_type"] == 5 and decode_articulation(-wild)["label"] == 0


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="joint types"):
        encode_articulation(6, (0, 1, 0), (0, 0, 0), (0, 0, 0), 90, 0)
    with pytest.raises(ValueError, match="labels"):
        encode_articulation(2, (0, 1, 0), (0, 0, 0), (0, 0, 0), 90, 8)


# ---------------------------------------------------------------- grid masks


def brute_force_grid_mask(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    h, w = grid
    ph, pw = mask.shape[0] // h, mask.shape[1] // w
    out = np.zeros(grid, dtype=np.int64)
    for i in range(h):
        for j in range(w):
            counts = Counter(mask[i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].ravel().tolist())
            out[i, j] = min(counts, key=lambda label: (-counts[label], label))
    return out


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    ph=st.integers(1, 4),
    pw=st.integers(1, 4),
    top=st.integers(0, 9),
)
def test_grid_mask_matches_brute_force(data, h, w, ph, pw, top):
    masks = data.draw(hnp.arrays(np.uint8, (2, h * ph, w * pw), elements=st.integers(0, top)))
    for mask in masks:
        np.testing.assert_array_equal(grid_mask(mask, (h, w)), brute_force_grid_mask(mask, (h, w)))
    batched = grid_mask_batch(torch.from_numpy(masks), (h, w))
    assert batched.dtype == torch.int64
    np.testing.assert_array_equal(batched.numpy(), np.stack([grid_mask(m, (h, w)) for m in masks]))


def test_grid_mask_ties_go_to_smallest_label():
    mask = np.array([[3, 1], [1, 3]], dtype=np.uint8)
    assert grid_mask(mask, (1, 1))[0, 0] == 1
    with pytest.raises(ValueError, match="grid"):
        grid_mask(np.zeros((5, 4), dtype=np.uint8), (2, 2))


# ---------------------------------------------------------------- format and validation


@pytest.mark.parametrize("cond_dtype", [np.float16, np.float32])
def test_write_load_round_trip(tmp_path, cond_dtype):
    spec = TINY_SPEC
    sample = hand_made_sample(spec, 3)
    sample["cond"] = sample["cond"].astype(cond_dtype)
    path = write_sample(tmp_path, 3, sample)
    assert path == sample_path(tmp_path, 3) and path.name == "sample_000003.npz"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    loaded = load_sample(path, spec)
    assert loaded.keys() == sample.keys()
    for key, value in sample.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    write_dataset_spec(tmp_path, spec)
    assert read_dataset_spec(tmp_path) == spec
    assert DatasetSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["format_version"] == 2


def _drop(key):
    def edit(s):
        del s[key]
    return edit


def _set(key, fn):
    def edit(s):
        s[key] = fn(s[key])
    return edit


def _poke(key, index, value):
    def edit(s):
        s[key] = s[key].copy()
        s[key][index] = value
    return edit


# (edit of a valid 3-part sample, text the message must contain)
BAD_SAMPLES = {
    "latents shape": (
        _set("latents", lambda a: a[:, :, :4, :4, :4]),
        "latents has shape (3, 8, 4, 4, 4), expected (K, 8, 8, 8, 8) with K = 3 parts",
    ),
    "articulation rows": (
        _set("articulation", lambda a: a[:2]),
        "articulation has shape (2, 24), expected (K, 24) with K = 3 parts",
    ),
    "cond width": (_set("cond", lambda a: a[:, :-1]), "cond has shape (41, 63), expected (41, 64)"),
    "image shape": (_set("image", lambda a: a[:-1]), "image has shape (47, 48, 3), expected (48, 48, 3)"),
    "image dtype": (_set("image", lambda a: a.astype(np.float32)), "image has dtype float32, expected uint8"),
    "labels dtype": (_set("part_labels", lambda a: a.astype(np.int32)), "part_labels has dtype int32, expected int64"),
    "cond dtype": (_set("cond", lambda a: a.astype(np.float64)), "cond has dtype float64, expected float16 or float32"),
    "nan latents": (_poke("latents", (1, 2, 3, 4, 5), np.nan), "latents contains 1 non-finite values"),
    "inf cond": (_poke("cond", (0, 0), np.inf), "cond contains 1 non-finite values"),
    "mask label above K": (_poke("mask", (5, 5), 4), "mask contains label 4 but the sample has only K = 3 parts"),
    "missing key": (_drop("joint_types"), "missing key 'joint_types'"),
    "no parts": (_set("part_labels", lambda a: a[:0]), "K = 0 parts, expected 1 to max_parts = 8"),
    "bad joint id": (_poke("joint_types", 1, 7), "joint_types [1, 7, 3] must be ids 1..5"),
    "articulation disagrees": (
        _poke("joint_types", 1, 3),
        "articulation row 1 encodes joint_type 2 but joint_types[1] is 3",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_invalid_sample_raises_data_error_naming_the_file(tmp_path, case):
    edit, expected = BAD_SAMPLES[case]
    sample = hand_made_sample(TINY_SPEC, 3)
    edit(sample)
    path = sample_path(tmp_path, 3)
    path.parent.mkdir(parents=True)
    np.savez(path, **sample)  # bypasses write_sample's key check, as a foreign writer would
    with pytest.raises(DataError) as info:
        load_sample(path, TINY_SPEC)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "sample_000003.npz" in message
    assert expected in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


def test_too_many_parts(tmp_path):
    spec = DatasetSpec(name="t", num_samples=1, max_parts=2, prefix_tokens=5, **TINY)
    path = write_sample(tmp_path, 0, hand_made_sample(spec, 3))
    with pytest.raises(DataError, match=r"sample_000000\.npz: sample has K = 3 parts, expected 1 to max_parts = 2"):
        load_sample(path, spec)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "npy", "missing", "pickled"])
def test_unreadable_file_raises_data_error(tmp_path, damage):
    path = write_sample(tmp_path, 1, hand_made_sample(TINY_SPEC, 2))
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(2000))
    elif damage == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif damage == "missing":
        path.unlink()
    else:
        np.savez(path, image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"sample_000001\.npz: "):
        load_sample(path, TINY_SPEC)


def test_bad_dataset_folder_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="dataset folder does not exist"):
        ArticulatedDataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match=rf"{DATASET_FILE}: file not found"):
        ArticulatedDataset(tmp_path)
    (tmp_path / DATASET_FILE).write_text("{not json")
    with pytest.raises(DataError, match=rf"{DATASET_FILE}: not valid JSON"):
        ArticulatedDataset(tmp_path)
    record = json.loads(TINY_SPEC.to_json())
    for change, expected in [
        ({"grid": [5, 5]}, "image_size [48, 48] must be grid [5, 5] times one patch size"),
        ({"resolution": "8"}, "resolution must be an integer, got '8'"),
        ({"format_version": 3}, "format_version 3 is not supported"),
        ({"format_version": 1}, "format_version 1 stores articulation vectors in the project's first encoding"),
        ({"colour": 1}, "unknown key colour"),
        ({"grid": 6}, "grid must be a list of two integers, got 6"),
    ]:
        (tmp_path / DATASET_FILE).write_text(json.dumps({**record, **change}))
        with pytest.raises(DataError) as info:
            ArticulatedDataset(tmp_path)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / DATASET_FILE}: ") and expected in message


def test_expect_checks_model_compatibility(dataset_dir):
    ArticulatedDataset(dataset_dir, expect={"resolution": 8, "cond_channels": 64, "grid": (6, 6), "max_parts": 32})
    cases = [
        ({"resolution": 16}, "resolution is 8 but the model needs 16"),
        ({"grid": [37, 37]}, "grid is 6x6 but the model needs 37x37"),
        ({"max_parts": 4}, "max_parts is 8 but the model handles at most 4 parts"),
    ]
    for expect, expected in cases:
        with pytest.raises(DataError) as info:
            ArticulatedDataset(dataset_dir, expect=expect)
        assert str(info.value) == f"{dataset_dir / DATASET_FILE}: {expected}."
    with pytest.raises(ValueError, match="expect may name"):
        ArticulatedDataset(dataset_dir, expect={"colour": 1})


def test_validate_all_finds_the_bad_sample(dataset_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    ArticulatedDataset(copy).validate_all()
    bad = sample_path(copy, 5)
    bad.write_bytes(bad.read_bytes()[:100])
    dataset = ArticulatedDataset(copy)  # samples are checked lazily, not on opening
    dataset[4]
    with pytest.raises(DataError, match=r"sample_000005\.npz: cannot be read"):
        dataset.validate_all()
    with pytest.raises(DataError, match=r"sample_000005\.npz"):
        dataset[5]


# ---------------------------------------------------------------- synthetic generator


def test_generation_is_deterministic(tmp_path):
    generate_dataset(tmp_path / "a", 6, seed=0, **TINY)
    generate_dataset(tmp_path / "b", 6, seed=0, **TINY)
    generate_dataset(tmp_path / "c", 3, seed=0, **TINY)
    generate_dataset(tmp_path / "d", 6, seed=1, **TINY)
    a, b, c, d = (files_of(tmp_path / name) for name in "abcd")
    assert a == b  # byte-identical files, dataset.json included
    assert all(c[name] == a[name] for name in c if name.startswith("samples/"))  # independent of num_samples
    samples = [name for name in a if name.startswith("samples/")]
    assert len(samples) == 6 and all(a[name] != d[name] for name in samples)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_part_counts_respect_bounds(dataset_dir):
    counts = [len(ArticulatedDataset(dataset_dir)[i]["part_labels"]) for i in range(24)]
    assert min(counts) >= 2 and max(counts) <= 8 and len(set(counts)) >= 4
    for low, high in [(2, 2), (5, 5), (8, 8), (3, 6)]:
        spec = DatasetSpec(name="t", num_samples=1, max_parts=high, prefix_tokens=5, **TINY)
        generator = SyntheticGenerator(spec, seed=3, min_parts=low)
        for index in range(12):
            sample = generator.sample(index)
            assert low <= len(sample["part_labels"]) <= high
            assert sample["part_labels"][0] == LABELS.index("base") and sample["joint_types"][0] == FIXED
    with pytest.raises(ValueError, match="min_parts"):
        SyntheticGenerator(DatasetSpec(name="t", num_samples=1, max_parts=9, prefix_tokens=5, **TINY), seed=0)


def empty_part_count(generator: SyntheticGenerator, num_samples: int) -> int:
    total = 0
    for index in range(num_samples):
        sample = generator.sample(index)
        visible = set(np.unique(sample["mask"]).tolist())
        total += sum(k + 1 not in visible for k in range(len(sample["part_labels"])))
    return total


def test_occlusion_yields_empty_part_masks(dataset_dir):
    dataset = ArticulatedDataset(dataset_dir)
    empty = 0
    for i in range(len(dataset)):
        item = dataset[i]
        visible = set(np.unique(item["mask"]).tolist())
        empty += sum(k + 1 not in visible for k in range(len(item["part_labels"])))
    assert empty > 0
    plain = SyntheticGenerator(TINY_SPEC, seed=7)
    occluded = SyntheticGenerator(TINY_SPEC, seed=7, occlusion_prob=1.0)
    assert empty_part_count(occluded, 16) > empty_part_count(plain, 16)


def test_render_is_consistent_with_mask(dataset_dir):
    dataset = ArticulatedDataset(dataset_dir)
    for i in range(8):
        item = dataset[i]
        image, mask = item["image"], item["mask"]
        assert image.reshape(-1, 3).std(axis=0).max() > 10  # not a constant image
        background = np.all(image == np.array(BACKGROUND, dtype=np.uint8), axis=-1)
        np.testing.assert_array_equal(background, mask == 0)  # background colour exactly where mask is 0
        # Each visible part has its own colours (a few face shades), shared with no other part.
        colours = {k: set(map(tuple, image[mask == k].tolist())) for k in np.unique(mask) if k}
        assert all(len(c) <= 3 for c in colours.values())
        for k, c in colours.items():
            assert all(c.isdisjoint(other) for j, other in colours.items() if j != k)
        assert 1 in colours  # the body is always visible


def test_stand_in_encoders():
    structure = StandInStructureEncoder(4)
    occupancy = np.zeros((2, 16, 16, 16), dtype=bool)
    occupancy[1, :4, :4, :4] = True
    latents = structure(occupancy)
    assert latents.shape == (2, 8, 4, 4, 4) and latents.dtype == np.float32
    assert not latents[0].any() and not latents[1, :, 1:].any()  # empty space maps to 0
    # A full block: every channel sums its column of the projection, and the columns share the
    # all-ones component, so the channels agree up to the rounding of a float32 sum of 64 terms
    # (whose partial sums are at most sum |w|).
    partial = float(np.abs(structure._proj).sum(0).max())
    spread = latents[1, :, 0, 0, 0].max() - latents[1, :, 0, 0, 0].min()
    assert spread <= rounding_bound(partial, 64, torch.float32)
    image_encoder = StandInImageEncoder(64, (6, 6), prefix_tokens=5, patch=8)
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    tokens = image_encoder(image)
    assert tokens.shape == (41, 64) and tokens.dtype == np.float32 and np.abs(tokens).max() <= 1
    np.testing.assert_array_equal(tokens, StandInImageEncoder(64, (6, 6), 5, patch=8)(image))
    assert not np.array_equal(tokens[5:], image_encoder(255 - image)[5:])
    with pytest.raises(ValueError, match="image encoder takes"):
        image_encoder(image[:40])


def test_latents_have_roughly_unit_std(dataset_dir):
    latents = np.concatenate([ArticulatedDataset(dataset_dir)[i]["latents"] for i in range(24)])
    std = latents.std(axis=(0, 2, 3, 4))
    assert np.all((std > 0.7) & (std < 1.4)), std


# ---------------------------------------------------------------- loader


def test_collate_parts_shapes(dataset_dir):
    dataset = ArticulatedDataset(dataset_dir, expect={"resolution": 8, "cond_channels": 64, "grid": (6, 6)})
    by_count = {}
    for i in range(len(dataset)):
        by_count.setdefault(len(dataset[i]["part_labels"]), i)
    items = [dataset[i] for i in sorted(by_count.values())[:3]]
    counts = [len(item["part_labels"]) for item in items]
    assert len(set(counts)) == 3
    batch = collate_parts(items)
    n, b = sum(counts), len(items)
    shapes = {
        "x": (n, 8, 8, 8, 8), "cond": (n, 41, 64), "masks": (n, 6, 6), "num_parts": (b,), "part_idx": (n,),
        "images": (b, 3, 48, 48), "pixel_masks": (b, 48, 48), "articulation": (n, 24), "art_valid": (n, 24),
        "part_labels": (n,), "joint_types": (n,), "index": (b,),
    }
    assert {k: tuple(v.shape) for k, v in batch.items()} == shapes
    assert batch["cond"].dtype == torch.float32 and batch["masks"].dtype == torch.int64
    assert batch["art_valid"].dtype == torch.bool and batch["images"].max() <= 1
    assert batch["num_parts"].tolist() == counts
    assert batch["part_idx"].tolist() == [k for c in counts for k in range(c)]
    start = 0
    for item, count in zip(items, counts):
        rows = slice(start, start + count)
        np.testing.assert_array_equal(batch["x"][rows].numpy(), item["latents"])
        assert torch.equal(batch["cond"][rows], torch.from_numpy(item["cond"]).float().expand(count, -1, -1))
        assert torch.equal(batch["masks"][rows], torch.from_numpy(item["grid_mask"]).expand(count, -1, -1))
        np.testing.assert_array_equal(batch["art_valid"][rows].numpy(), validity_mask(item["joint_types"]))
        start += count


def test_make_loader_is_seeded(dataset_dir):
    dataset = ArticulatedDataset(dataset_dir)

    def order(seed):
        return [i for batch in make_loader(dataset, 4, shuffle=True, seed=seed) for i in batch["index"].tolist()]

    assert order(3) == order(3) != order(4)
    assert sorted(order(3)) == list(range(24))


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--num-samples", "3", "--seed", "2", "--preset", "tiny", "--grid", "8", "8"]) == 0
    assert ArticulatedDataset(out, expect={"grid": (8, 8), "image_size": (48, 48)}).spec.generator["seed"] == 2
    capsys.readouterr()
    assert main(["--out", str(out), "--num-samples", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert main(["--out", str(out), "--num-samples", "2", "--overwrite"]) == 0
    assert len(ArticulatedDataset(out)) == 2
    assert main(["--out", str(tmp_path / "x"), "--grid", "5", "5"]) == 1
    assert "times one patch size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind_name, variant", [("stage1", "baseline"), ("stage2", "baseline"), ("world_model", "mae")])
def test_a_configs_data_folder_is_found_without_torch_only_once_its_synthetic_set_is_complete(tmp_path, monkeypatch, kind_name, variant):
    """``RunConfig.data_folder`` (what the sweep driver describes without importing torch) is
    None until the trainer's ``dataset_for`` has generated the set, then exactly that folder;
    a half-made set (no marker file) does not count; ``data`` wins when given."""
    from pact_ray.kinds import get_kind

    monkeypatch.setenv("PACT_RAY_DATA_CACHE", str(tmp_path / "cache"))
    kind = get_kind(kind_name)
    cfg = kind.config_cls.for_variant(variant, "smoke", "tiny", 0)
    assert cfg.data_folder() is None
    folder = Path(kind.dataset(cfg).folder)
    assert cfg.data_folder() == folder and folder.parent == tmp_path / "cache"
    marker = next(p for p in (folder / "dataset.json", folder / "meta" / "info.json") if p.is_file())
    marker.rename(marker.with_suffix(".moved"))
    assert cfg.data_folder() is None
    assert kind.config_cls.for_variant(variant, "smoke", "tiny", 0, data=str(tmp_path / "mine")).data_folder() == tmp_path / "mine"


def test_the_synthetic_cache_names_are_unchanged_so_existing_caches_stay_valid():
    """The cache folder names, now computed torch-free in pact_ray.data.cache, are the ones
    every earlier version wrote (a change would regenerate every machine's data)."""
    from pact_ray.runs.stage1 import Stage1RunConfig
    from pact_ray.runs.stage2 import Stage2RunConfig
    from pact_ray.runs.world_model import WorldModelRunConfig

    names = {"stage1": Stage1RunConfig.for_variant("baseline", "quick", "small", 0).synthetic_settings(),
             "stage2": Stage2RunConfig.for_variant("baseline", "quick", "small", 0).synthetic_settings()}
    from pact_ray.data.cache import arm_set_name, object_set_name

    assert object_set_name(**names["stage1"]) == "f2-n32-s0-r8-img64x64-g8x8-c256-p5-o0.2"
    assert object_set_name(**names["stage2"]) == "f2-n32-s0-r8-img64x64-g8x8-c256-p5-o0.2-v16"
    wm = WorldModelRunConfig.for_variant("mae", "quick", "small", 0)
    assert arm_set_name(wm.synthetic_episodes, wm.episode_length, wm.data_seed) == "arm-e24-t24-s0"
