"""Every metric name that a trainable reports, MLflow stores and the summary reads, defined once."""

LOSS = "loss"
GATE = "gate"
EDGE_DELTA = "edge_delta"
VIRTUAL_MASS = "virtual_mass"
PLAN_ENTROPY = "plan_entropy"
MARGINAL_ERROR = "marginal_error"
SINKHORN_ITERS = "sinkhorn_iters"
OT_TIME_MS = "ot_time_ms"
STEP_TIME_S = "step_time_s"
GRAD_NORM = "grad_norm"
LR = "lr"
STEP = "step"

# Stage2
ART_L2 = "art_l2"
MASK_PARTS = "mask_parts"
EMPTY = "empty"

# Router diagnostics, in the order they are reported.
ROUTER_DIAGNOSTICS = (GATE, EDGE_DELTA, VIRTUAL_MASS, PLAN_ENTROPY, MARGINAL_ERROR, SINKHORN_ITERS, OT_TIME_MS)
