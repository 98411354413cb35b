"""The ablation report: route status, plots and a static page over the summary rows.

``write_report(data, out_dir)`` writes the whole report of a
:class:`pact_ray.report.summary.SummaryData` (from :func:`pact_ray.report.summary.collect` /
:func:`pact_ray.report.summary.collect_sweep`, or from Ray's result folders with
:func:`collect_results`).
"""

from pact_ray.report.ablation.build import render_report, write_report
from pact_ray.report.ablation.ray_results import collect_results

__all__ = ["collect_results", "render_report", "write_report"]
