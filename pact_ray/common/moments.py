"""The 2D mask moments of a part (pact_ray.models.stage2.mask_moments), in column order.

The spatial variants' adapter reads these columns and the Stage2 trainer logs their batch
means under these names (pact_ray.metrics.names.MASK_MOMENTS); both import them from here.
"""

MASK_MOMENTS = ("mask_area", "mask_cx", "mask_cy", "mask_xx", "mask_yy", "mask_xy", "mask_x0", "mask_y0", "mask_x1", "mask_y1")
