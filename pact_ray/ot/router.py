"""OT router: optimal-transport-gated cross-attention for Stage1 (``docs/specs/ot_router.md``).

Per object, per head and per patched block an entropic OT problem is solved between the
object's K parts and the P image patches of the condition:

    C[k, p] = -<q_k, key_p> / sqrt(head_dim)        q_k: mean query of part k's tokens
    C <- (C - mean C) / (std C + 1e-6)              one meaning of eps everywhere
    C[k, p] += lambda_mask  if label(p) != k + 1    (mask prior variants)
    pi = argmin <pi, C> - eps H(pi)  s.t. pi 1 = a, pi^T 1 = b

and the plan gates the cross-attention of every token of part k through an additive bias
``strength * log(g[k, p] + 1e-6)`` with ``g = pi / (a b^T)``. For uniform marginals
``g = K P pi`` exactly as in the spec; dividing by ``a_k b_p`` instead keeps ``g = 1`` for an
uninformative plan also with mask-area marginals and a virtual patch (our generalisation).
The bias is the same for every query of a part row, so it is a ``[N, H, 1, L]`` mask that
broadcasts inside the fused SDPA kernel: attention is never materialised on the hot path.

Condition layout: the last ``h*w`` tokens of the condition are the image patches (DINOv2
order: cls, registers, patches); prefix tokens get no bias (gate 1). The virtual patch is
one learnable key/value token appended per patched block, taking plan mass ``m_v``.
"""

from __future__ import annotations

import functools
import math
import time

import torch
from torch import nn

from pact_ray.metrics import names as M
from pact_ray.ot.config import EDGE_KINDS, PART_MARGINALS, RouterConfig, resolve_blocks  # noqa: F401 - torch-free, there
from pact_ray.ot.edges import GridWeights, edge_delta, edge_regularised_plan, mask_edge_map, neighbour_weights, sobel_edge_map
from pact_ray.ot.sinkhorn import plan_entropy, sinkhorn_log

T_SCALE = 1000.0  # the model sees t * 1000


class RouteContext:
    """Per-forward routing state shared by every patched block (built once by :meth:`OTRouter.context`)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.records: list[_Record] = []

    def close(self) -> None:
        # After the forward pass no more diagnostics are collected (a checkpointed block
        # recomputed during backward must not record twice).
        self.collect = False


class OTRouter(nn.Module):
    """Holds the router config, the patched block ids and the virtual-patch parameters."""

    def __init__(self, config: RouterConfig, num_blocks: int, channels: int, num_heads: int):
        super().__init__()
        self.config = config.validate()
        self.block_ids = resolve_blocks(config.blocks, num_blocks)
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        if config.virtual_patch:
            self.virtual_kv = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(2, channels)) for i in self.block_ids})
        self._last_records: list[_Record] = []
        self._last_diagnostics: dict[str, torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.config.strength > 0

    def reset_parameters(self) -> None:
        # A zero key scores 0 against every query and a zero value adds nothing: the virtual
        # token starts as a pure "attend nowhere" sink, shaped by the gate only.
        if self.config.virtual_patch:
            for p in self.virtual_kv.values():
                nn.init.zeros_(p)

    # ------------------------------------------------------------------ context
    def context(self, layout, masks, t, cond_tokens, images=None, pixel_masks=None) -> RouteContext:
        cfg = self.config
        if masks is None:
            raise ValueError("the OT router needs the part label masks [N, h, w]: they fix the patch grid")
        h, w = masks.shape[-2:]
        n_patch = h * w
        if n_patch > cond_tokens:
            raise ValueError(f"the mask grid has {n_patch} cells but the condition has only {cond_tokens} tokens")
        device = masks.device
        num_parts = layout.num_parts
        starts = torch.cumsum(num_parts, 0) - num_parts
        slot = torch.arange(masks.shape[0], device=device) - starts[layout.row_obj]
        k_max = int(num_parts.max())
        part_valid = torch.arange(k_max, device=device)[None] < num_parts[:, None]  # [B, K]
        labels = masks[starts].flatten(1).long()  # [B, P] one label map per object

        # Part marginals a [B, K] (zero on padded rows).
        if cfg.part_marginal == "area":
            area = (labels[:, None, :] == torch.arange(1, k_max + 1, device=device)[None, :, None]).float().mean(-1)
            floor = cfg.area_floor / num_parts[:, None].float()
            a = torch.maximum(area, floor) * part_valid
        else:
            a = part_valid.float()
        a = a / a.sum(-1, keepdim=True)
        # Patch marginals b [P (+1)]: visible patches share 1 - m_v, the virtual token m_v.
        if cfg.virtual_patch:
            b = torch.cat([torch.full((n_patch,), (1 - cfg.m_v) / n_patch), torch.tensor([cfg.m_v])]).to(device)
        else:
            b = torch.full((n_patch,), 1.0 / n_patch, device=device)

        prior = None
        if cfg.mask_prior and cfg.lambda_mask > 0:
            # [B, K, P]: lambda for every patch whose label is not k + 1 (background included).
            part_label = torch.arange(1, k_max + 1, device=device)[None, :, None]
            prior = cfg.lambda_mask * (labels[:, None, :] != part_label).float()

        weights: GridWeights | None = None
        if cfg.edge == "rgb":
            if images is None:
                raise ValueError("the rgb edge cost needs the RGB images [B, 3, H, W] (pass images=...)")
            weights = neighbour_weights(sobel_edge_map(images.float(), (h, w)), (h, w), cfg.edge_beta)
        elif cfg.edge == "mask":
            edge_src = pixel_masks if pixel_masks is not None else masks[starts]
            weights = neighbour_weights(mask_edge_map(edge_src, (h, w)), (h, w), cfg.edge_beta)

        tn = t.float() / T_SCALE
        active = ((tn >= cfg.t_min) & (tn <= cfg.t_max)).float()  # [N]
        # What every patched block's solve shares, in the solver's layout [B, H, K, Pc]
        # (Pc = P + 1 with a virtual patch, whose column gets no mask prior).
        cols = b.shape[0]
        valid = part_valid[:, None, :, None].float()  # [B, 1, K, 1]
        ab = a[:, None, :, None] * b  # [B, 1, K, Pc]
        return RouteContext(
            row_obj=layout.row_obj, slot=slot, k_max=k_max, part_valid=part_valid, a=a, b=b,
            prior=None if prior is None else torch.nn.functional.pad(prior, (0, cols - n_patch))[:, None],
            weights=weights, active=active, n_patch=n_patch, grid=(h, w), collect=True,
            valid=valid, valid_count=valid.sum(-2, keepdim=True), a_solve=a[:, None, :], b_solve=b[None, None, :],
            head_eye=torch.eye(self.num_heads, device=device),
            inv_ab=torch.where(ab > 0, 1.0 / ab.clamp_min(torch.finfo(ab.dtype).tiny), 0.0),
        )

    # -------------------------------------------------------------------- route
    def route(self, block_id: int, q, k, v, ctx: RouteContext):
        """Gate one block's cross-attention.

        q: [N, Lq, H, D]; k, v: [N, M, H, D] -> (k', v', bias) with the virtual token
        appended to k', v' when configured and bias [N, H, 1, M (+1)].
        """
        cfg = self.config
        n_rows, _, heads, dim = q.shape
        n_obj = ctx.a.shape[0]
        n_patch = ctx.n_patch
        if cfg.virtual_patch:
            kv = self.virtual_kv[str(block_id)].view(2, 1, 1, heads, dim).to(k.dtype)
            k = torch.cat([k, kv[0].expand(n_rows, 1, heads, dim)], dim=1)
            v = torch.cat([v, kv[1].expand(n_rows, 1, heads, dim)], dim=1)
        n_prefix = k.shape[1] - n_patch - int(cfg.virtual_patch)
        start = time.perf_counter() if ctx.collect and q.device.type != "cuda" else None
        timer = _CudaTimer() if ctx.collect and q.device.type == "cuda" else None

        grad = torch.enable_grad() if cfg.differentiable_plan else torch.no_grad()
        with grad:
            # -<q_k, key_p> per head as one bmm over the keys' own layout [N, M, H*D] (a view
            # of the projection's output): the part queries go into a block-diagonal
            # [N, H, H*D] matrix, multiplied from the left so that the keys enter transposed
            # (a [.., 4, 256] x [.., 256, 64] product: 2.8x faster on CPU than the keys first,
            # whose 4-column result is a poor GEMM shape). An einsum would first copy the keys
            # to [N, H, D, M]; a product and a sum would allocate a temporary of the keys' size.
            q_part = q.float().mean(1)  # [N, H, D]
            blocks = (ctx.head_eye[:heads, :heads, None] * q_part.unsqueeze(-2)).flatten(2)  # [N, H, H*D]
            cost_rows = torch.bmm(blocks, k[:, n_prefix:].float().flatten(2).mT).mul_(-1.0 / math.sqrt(dim)).mT  # [N, Pc, H]
            cost = cost_rows.new_zeros(n_obj, heads, ctx.k_max, cost_rows.shape[1])  # [B, H, K, Pc]
            cost.transpose(1, 2).index_put_((ctx.row_obj, ctx.slot), cost_rows.transpose(1, 2))
            # Standardise per (object, head) over the valid rows (padded rows are 0).
            count = ctx.valid_count * cost.shape[-1]  # [B, 1, 1, 1]
            centred = (cost - cost.sum((-2, -1), keepdim=True) / count) * ctx.valid
            std = centred.square().sum((-2, -1), keepdim=True).div_(count).sqrt_()
            cost = centred / (std + 1e-6)
            if ctx.prior is not None:
                cost = cost + ctx.prior
            solve = dict(eps=cfg.eps, max_iter=int(cfg.iterations), tol=cfg.tol, differentiable=cfg.differentiable_plan)
            if ctx.weights is not None and cfg.lambda_edge > 0:
                res0, res = edge_regularised_plan(cost, ctx.a_solve, ctx.b_solve, ctx.weights, cfg.lambda_edge, **solve)
            else:
                res0 = res = sinkhorn_log(cost, ctx.a_solve, ctx.b_solve, **solve)
            # bias = strength log(g + 1e-6) with g = pi / (a b^T); padded rows (a = 0) are
            # never read below, so 1 / (a b^T) is precomputed with 0 there.
            bias_obj = torch.log(res.plan * ctx.inv_ab + 1e-6).mul_(cfg.strength)  # [B, H, K, Pc]
            bias_rows = bias_obj.transpose(1, 2)[ctx.row_obj, ctx.slot]  # [N, H, Pc]
            bias_rows = bias_rows * ctx.active[:, None, None]
            bias = torch.nn.functional.pad(bias_rows, (n_prefix, 0))[:, :, None, :]

        if ctx.collect:
            elapsed = _ElapsedMs(start=start) if timer is None else timer.stop()
            ctx.records.append(_Record(q=q.detach(), k=k.detach(), bias=bias.detach(), first=res0, final=res,
                                       ctx=ctx, diag_tokens=cfg.diag_tokens, virtual=cfg.virtual_patch, elapsed=elapsed))
        return k, v, bias

    # -------------------------------------------------------------- diagnostics
    def finish(self, ctx: RouteContext | None) -> None:
        """End of a forward pass: stop recording and keep its records for :meth:`diagnostics`
        (None: a forward pass without routing, which has none)."""
        if ctx is not None:
            ctx.close()
        self._last_records = [] if ctx is None else ctx.records
        self._last_diagnostics: dict[str, torch.Tensor] | None = None

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Per-block diagnostics of the last forward pass, averaged over the patched blocks
        (OT time summed, the marginal error's maximum the largest), as 0-dim CPU tensors.

        They are computed on the first call after a forward pass, from the tensors it kept
        (no work and no host sync on the hot path; reading them is the step's one host
        sync), and then cached: the records, which hold the blocks' queries and keys, are
        dropped, so that nothing outlives the step that the backward pass would free."""
        if getattr(self, "_last_diagnostics", None) is None:
            records = getattr(self, "_last_records", None)
            if not records:
                return {}
            with torch.no_grad():
                per_block = torch.stack([record.compute() for record in records])  # [blocks, keys]
                keys = M.ROUTER_DIAGNOSTICS
                summed = torch.tensor([key == M.OT_TIME_MS for key in keys], device=per_block.device)
                largest = torch.tensor([key == M.MARGINAL_ERROR_MAX for key in keys], device=per_block.device)
                values = torch.where(summed, per_block.sum(0), torch.where(largest, per_block.amax(0), per_block.mean(0)))
            self._last_diagnostics = dict(zip(keys, values.cpu().unbind()))
            self._last_records = []
        return dict(self._last_diagnostics)


class _Record:
    """What one patched block's forward pass keeps for its diagnostics, computed on read."""

    def __init__(self, q, k, bias, first, final, ctx, diag_tokens, virtual, elapsed):
        self.q, self.k, self.bias = q, k, bias  # [N, Lq, H, D], [N, M, H, D], [N, H, 1, M]
        self.first, self.final = first, final  # SinkhornResult: pi0 (before the edge term) and pi
        self.ctx, self.diag_tokens, self.virtual, self.elapsed = ctx, diag_tokens, virtual, elapsed

    def compute(self) -> torch.Tensor:
        """The block's diagnostics, in the order of ``M.ROUTER_DIAGNOSTICS``: [keys] float32."""
        ctx, first, final = self.ctx, self.first, self.final
        n_patch = ctx.n_patch
        two_solves = final is not first
        q_sub = self.q.index_select(1, _sampled_tokens(self.q.shape[1], self.diag_tokens, self.q.device))
        q_sub = q_sub.float().transpose(1, 2)  # [N, H, L, D] (index_select: a third of indexing's time here)
        keys = self.k.float().transpose(1, 2).contiguous()  # [N, H, M, D]: a matmul on the strided view is 4x slower
        attention = torch.softmax((q_sub @ keys.mT).mul_(1.0 / math.sqrt(q_sub.shape[-1])), dim=-1)  # [N, H, L, M]
        bias = self.bias.float()  # [N, H, 1, M]
        # -KL(A || A^g) with A^g = A e^bias / Z is E_A[bias] - log E_A[e^bias] <= 0 (Jensen).
        # Both expectations in one product with [bias, e^(bias - max bias)]: [N, H, L, 2].
        top = bias.amax(-1, keepdim=True)
        moments = attention @ torch.cat([bias, (bias - top).exp()], dim=-2).mT
        gate = (moments[..., 0] - torch.log(moments[..., 1]) - top[..., 0]).mean()
        zero = torch.zeros((), device=self.q.device)
        values = {
            M.GATE: gate,
            M.EDGE_DELTA: (
                edge_delta(first.plan[..., :n_patch], final.plan[..., :n_patch], ctx.weights,
                           part_valid=ctx.part_valid[:, None, :])
                if two_solves else zero
            ),
            M.VIRTUAL_MASS: (final.plan[..., n_patch] * ctx.part_valid[:, None, :]).sum(-1).mean() if self.virtual else zero,
            M.PLAN_ENTROPY: plan_entropy(final.plan).mean(),
            M.MARGINAL_ERROR: final.marginal_error.mean(),
            M.MARGINAL_ERROR_MAX: torch.maximum(first.marginal_error.amax(), final.marginal_error.amax()),
            M.SINKHORN_ITERS: first.iterations + final.iterations if two_solves else first.iterations,
            M.EDGE_SOLVE_ITERS: final.iterations if two_solves else zero,
            M.OT_TIME_MS: torch.tensor(float(self.elapsed), device=self.q.device),
        }
        return torch.stack([values[key].float() for key in M.ROUTER_DIAGNOSTICS])


@functools.lru_cache(maxsize=16)
def _sampled_tokens(tokens: int, count: int, device: torch.device) -> torch.Tensor:
    """The fixed, evenly spaced subsample of a row's query tokens for the gate diagnostic."""
    return torch.linspace(0, tokens - 1, min(count, tokens), device=device).round().long()


class _ElapsedMs:
    """Wall time of the OT work on CPU (no sync needed there), in ms."""

    def __init__(self, start: float):
        self.ms = (time.perf_counter() - start) * 1000.0

    def __float__(self) -> float:
        return self.ms


class _CudaTimer:
    """Wall time of the OT work on CUDA, from events: no host sync on the hot path; the
    elapsed time is read (a sync) only when the diagnostics are."""

    def __init__(self):
        self.start_ev = torch.cuda.Event(enable_timing=True)
        self.end_ev = torch.cuda.Event(enable_timing=True)
        self.start_ev.record()

    def stop(self) -> "_CudaTimer":
        self.end_ev.record()
        return self

    def __float__(self) -> float:
        self.end_ev.synchronize()
        return float(self.start_ev.elapsed_time(self.end_ev))
