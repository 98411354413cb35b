"""The pure-torch sparse voxel operations (pact_ray.models.sparse) against dense references:
submanifold convolution vs ``conv3d`` on random small grids and occupancies (isolated
voxels, grid borders, several rows, any voxel order), its gradients, its repeatability
with two threads and under bf16 autocast, and PAct's downsample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import FLOAT32, FLOAT64, rounding_bound

from pact_ray.models.sparse import OFFSETS, SparseLevel, SubMConv3d, downsample, pool_into_zeros, submanifold_conv3d


def random_voxels(g: torch.Generator, rows: int, grid: tuple[int, int, int], density: float) -> torch.Tensor:
    """[T, 4] (row, x, y, z): each cell of each row occupied with probability ``density``
    (at least one voxel per row), in a random order."""
    occupied = torch.rand(rows, *grid, generator=g) < density
    occupied.view(rows, -1)[:, 0] |= ~occupied.view(rows, -1).any(1)
    coords = torch.nonzero(occupied)
    return coords[torch.randperm(len(coords), generator=g)]


def dense_reference(feats: torch.Tensor, coords: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """conv3d (padding 1) of the rows scattered into zero grids, read at the voxels; and the
    same with |feats| and |weight| (the sums the rounding bound scales with)."""
    rows = int(coords[:, 0].max()) + 1
    dense = feats.new_zeros(rows, feats.shape[1], *grid)
    dense[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]] = feats
    kernel = weight.permute(0, 4, 1, 2, 3)  # spconv [out, kx, ky, kz, in] -> conv3d [out, in, kx, ky, kz]
    out = F.conv3d(dense, kernel, bias, padding=1)
    size = F.conv3d(dense.abs(), kernel.abs(), None if bias is None else bias.abs(), padding=1)
    read = lambda t: t[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]]  # noqa: E731
    return read(out), read(size)


def conv_ops(c_in: int) -> int:
    """A 27 * c_in term dot product plus the bias."""
    return 27 * c_in + 1


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 3),
    grid=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
    density=st.sampled_from([0.05, 0.3, 0.7, 1.0]),
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 4),
)
def test_submanifold_conv_equals_dense_conv3d(seed, rows, grid, density, c_in, c_out):
    """out[p] = b + sum_k W_k x[p + k - 1] over occupied neighbours, for every voxel of every
    row: exactly a dense conv3d of zero-filled grids read at the voxels. Sparse occupancies
    give isolated voxels (empty neighbourhoods), small grids put most voxels on a border."""
    g = torch.Generator().manual_seed(seed)
    coords = random_voxels(g, rows, grid, density)
    feats = torch.randn(len(coords), c_in, generator=g, dtype=FLOAT64)
    weight = torch.randn(c_out, 3, 3, 3, c_in, generator=g, dtype=FLOAT64)
    bias = torch.randn(c_out, generator=g, dtype=FLOAT64)
    level = SparseLevel.build(coords)
    out = submanifold_conv3d(feats, level, weight, bias)
    expected, size = dense_reference(feats, coords, weight, bias, grid)
    bound = rounding_bound(float(size.max()), conv_ops(c_in), FLOAT64)
    assert out.shape == (len(coords), c_out)
    assert float((out - expected).abs().max()) <= bound
    # Every rulebook pair is a real neighbour in the same row.
    for k, pair in enumerate(level.pairs):
        if pair is not None:
            src, dst = pair
            assert torch.equal(coords[src, 0], coords[dst, 0])
            assert torch.equal(coords[src, 1:] - coords[dst, 1:], OFFSETS[k].expand(len(src), 3))


def test_isolated_voxels_see_only_the_centre_tap():
    coords = torch.tensor([[0, 0, 0, 0], [0, 5, 5, 5], [1, 0, 0, 0]])  # no neighbours; row 1 shares row 0's cell
    feats = torch.randn(3, 2, dtype=FLOAT64)
    weight = torch.randn(4, 3, 3, 3, 2, dtype=FLOAT64)
    out = submanifold_conv3d(feats, SparseLevel.build(coords), weight)
    assert torch.equal(out, feats @ weight[:, 1, 1, 1, :].T)


def test_gradients_match_autograd_of_the_definition():
    """The hand-written backward (the rulebook read the other way round) against gradcheck."""
    g = torch.Generator().manual_seed(0)
    coords = random_voxels(g, 2, (4, 3, 3), 0.5)
    level = SparseLevel.build(coords)
    feats = torch.randn(len(coords), 3, generator=g, dtype=FLOAT64, requires_grad=True)
    weight = torch.randn(2, 3, 3, 3, 3, generator=g, dtype=FLOAT64, requires_grad=True)
    bias = torch.randn(2, generator=g, dtype=FLOAT64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: submanifold_conv3d(x, level, w, b), (feats, weight, bias))


def test_repeatable_with_two_threads_and_correct():
    """The scatter-adds of one tap never hit a row twice, so two threads give the same bits on
    every run (spconv's CPU kernels do not), and the result is the convolution."""
    g = torch.Generator().manual_seed(1)
    coords = random_voxels(g, 3, (12, 12, 12), 0.3)
    feats = torch.randn(len(coords), 48, generator=g)
    conv = SubMConv3d(48, 40)
    level = SparseLevel.build(coords)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            runs = [conv(feats, level) for _ in range(5)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    with torch.no_grad():
        expected, size = dense_reference(feats, coords, conv.weight, conv.bias, (12, 12, 12))
    assert float((runs[0] - expected).abs().max()) <= rounding_bound(float(size.max()), conv_ops(48), FLOAT32)


def test_bf16_autocast_computes_in_bf16_and_backpropagates():
    g = torch.Generator().manual_seed(2)
    coords = random_voxels(g, 1, (5, 5, 5), 0.4)
    conv = SubMConv3d(4, 3)
    feats = torch.randn(len(coords), 4, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(feats, SparseLevel.build(coords))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert feats.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    assert conv.weight.grad.abs().sum() > 0


def test_level_rejects_duplicates_and_negative_coordinates():
    with pytest.raises(ValueError, match="same voxel twice"):
        SparseLevel.build(torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="coordinates >= 0"):
        SparseLevel.build(torch.tensor([[0, -1, 0, 0]]))
    with pytest.raises(ValueError, match="at least one voxel"):
        SparseLevel.build(torch.zeros(0, 4, dtype=torch.long))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 3), density=st.sampled_from([0.1, 0.5, 1.0]))
def test_downsample_and_pool_into_zeros(seed, rows, density):
    """PAct's SparseDownsample: the coarse cells of each row, sorted by (row, x, y, z); a cell
    of n voxels gets sum / (n + 1) (a mean into zeros). Integer features keep the sums exact,
    so the comparison with the brute force is exact."""
    g = torch.Generator().manual_seed(seed)
    coords = random_voxels(g, rows, (5, 4, 6), density)
    feats = torch.randint(-50, 50, (len(coords), 3), generator=g).to(FLOAT64)
    cells, parent = downsample(coords)
    expected_cells = sorted({(int(r), int(x) // 2, int(y) // 2, int(z) // 2) for r, x, y, z in coords.tolist()})
    assert cells.tolist() == [list(c) for c in expected_cells]
    assert torch.equal(cells[parent], torch.cat([coords[:, :1], coords[:, 1:] // 2], 1))
    pooled = pool_into_zeros(feats, parent, len(cells))
    for c in range(len(cells)):
        members = feats[parent == c]
        assert torch.equal(pooled[c], members.sum(0) / (len(members) + 1))
