"""The report: route status and its statistics, parameter importance, the plots, the static
page (parsed, and screenshotted in headless Chromium), and a real tiny sweep summarised
from MLflow and from Ray's result folders."""

from __future__ import annotations

import base64
import io
import json
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from example_store import TrialSpec, log_example
from numerics import statistic_bound
from PIL import Image
from scipy import stats as sps

from analysis.summarize import main as summarize
from pact_ray.kinds import RUN_KINDS
from pact_ray.metrics import names as M
from pact_ray.report.ablation import render_report, write_report
from pact_ray.report.ablation.build import COUNT_LABELS, INDEX_HTML, REPORT_JSON, ROUTE_JSON
from pact_ray.report.ablation.groups import router_on
from pact_ray.report.ablation.plots import PLOTS, placeholder, plots_for
from pact_ray.report.ablation.route import NO_BASELINE, route_status
from pact_ray.report.ablation.stats import BETTER, INCONCLUSIVE, ONE_SEED, WORSE, difference, mean_interval, verdict
from pact_ray.report.ablation.tuning import tuned_variants
from pact_ray.report.summary import CSV_NAME, JSON_NAME, STATUSES, SummaryData, collect
from pact_ray.tune.sweep import run_sweep
from pact_ray.verdicts import NOT_FOR_CONCLUSIONS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREEN = (1400, 2400)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[SummaryData, list[TrialSpec], str]:
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    uri = f"sqlite:///{path}"
    specs = log_example(uri)
    return collect(uri), specs, uri


@pytest.fixture(scope="module")
def report(example, tmp_path_factory) -> Path:
    data, _, uri = example
    out = tmp_path_factory.mktemp("report")
    write_report(data, out, uri)
    return out


def finals(specs: list[TrialSpec], variant: str, profile: str = "quick", kind: str = "stage1") -> dict[int, float]:
    return {s.seed: s.history[M.LOSS][-1] for s in specs
            if (s.kind, s.profile, s.variant, s.status) == (kind, profile, variant, "finished") and not s.overrides}


# ---------------------------------------------------------------- statistics

def test_paired_welch_and_single_seed_intervals_match_scipy():
    base = {0: 1.0, 1: 1.2, 2: 0.9, 3: 1.1}
    variant = {0: 0.95, 1: 1.12, 2: 0.88, 3: 1.02}
    paired = difference(variant, base)
    ref = sps.ttest_rel(list(variant.values()), list(base.values())).confidence_interval(0.95)
    # Our statistics and scipy's are float64 computations of the same formulas in another order.
    tol = statistic_bound([variant[s] - base[s] for s in base], variant.values(), base.values())
    assert paired.method == "paired" and paired.estimate.interval == pytest.approx((ref.low, ref.high), abs=tol)
    assert verdict(paired) == BETTER and verdict(paired, mode="max") == WORSE

    other = {10: 1.3, 11: 1.1, 12: 1.25}  # no shared seed: Welch
    welch = difference(other, base)
    ref = sps.ttest_ind(list(other.values()), list(base.values()), equal_var=False).confidence_interval(0.95)
    tol = statistic_bound(other.values(), base.values())
    assert welch.method == "welch" and welch.estimate.interval == pytest.approx((ref.low, ref.high), abs=tol)
    assert welch.estimate.mean == pytest.approx(statistics.fmean(other.values()) - statistics.fmean(base.values()), abs=tol)

    single = difference({0: 0.5}, {0: 1.0})
    assert single.estimate.interval is None and verdict(single) == ONE_SEED
    values = [1.0, 1.5, 1.2]
    est = mean_interval(values)
    ref = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert est.interval == pytest.approx(ref, abs=statistic_bound(values)) and mean_interval([]) is None


# ------------------------------------------------------------- route status

def test_route_status_verdicts_deltas_and_diagnostics(example):
    data, specs, _ = example
    entries = {(e.setting[0], e.setting[1], e.variant, tuple(e.knobs.values())): e for e in route_status(data)}
    base = finals(specs, "baseline")
    expected = {"mask_prior": BETTER, "rgb_edge": WORSE, "ot_first": INCONCLUSIVE, "virtual_patch": ONE_SEED}
    for variant, want in expected.items():
        e = entries[("stage1", "quick", variant, ())]
        got = finals(specs, variant)
        shared = sorted(set(got) & set(base))
        tol = statistic_bound(got.values(), base.values(), [got[s] - base[s] for s in shared] or [0.0])
        assert e.verdict == want, variant
        assert e.seeds == tuple(sorted(got)) and e.baseline_seeds == tuple(sorted(base))
        if len(shared) >= 2:
            diffs = [got[s] - base[s] for s in shared]
            ref = sps.ttest_rel([got[s] for s in shared], [base[s] for s in shared]).confidence_interval(0.95)
            assert e.delta.method == "paired" and e.delta.estimate.interval == pytest.approx((ref.low, ref.high), abs=tol)
            assert e.delta.estimate.mean == pytest.approx(statistics.fmean(diffs), abs=tol)
        else:
            assert e.delta.estimate.mean == pytest.approx(statistics.fmean(got.values()) - statistics.fmean(base.values()), abs=tol)
        base_mean = statistics.fmean(base.values())
        pct_tol = 100 * (tol + abs(e.delta.estimate.mean) * statistic_bound(base.values()) / abs(base_mean)) / abs(base_mean)
        assert e.delta_pct.mean == pytest.approx(100 * e.delta.estimate.mean / base_mean, abs=pct_tol)
        gates = [s.history[M.GATE][-1] for s in specs if s.variant == variant and s.profile == "quick" and s.status == "finished"]
        assert e.diagnostics[M.GATE].mean == pytest.approx(statistics.fmean(gates), abs=statistic_bound(gates))
        assert e.diagnostics[M.ART_L2] is None
    # Unfinished runs give no entry of their own; Stage2 variants compare with the Stage2 baseline.
    assert not any(k[2] in ("mask_edge", "first_third") for k in entries)
    for variant in ("spatial_diag", "spatial_adapter"):
        e = entries[("stage2", "quick", variant, ())]
        assert e.delta.method == "paired" and e.diagnostics[M.ART_L2] is not None and e.diagnostics[M.GATE] is None
    # Each configuration of the tuned variant is its own entry (one seed each).
    tuned = [e for k, e in entries.items() if k[:3] == ("stage1", "smoke", "rgb_edge")]
    assert len(tuned) == sum(1 for s in specs if s.overrides)
    # Smoke runs are not meant for conclusions: one seed each, no interval, and no verdict.
    assert all(e.verdict == NOT_FOR_CONCLUSIONS and e.decision.verdict == ONE_SEED for e in tuned)
    assert all(set(e.knobs) == {"router.eps", "router.strength"} and "eps=" in e.label for e in tuned)


def test_variant_without_a_baseline_says_so(example):
    data, _, _ = example
    rows = [r for r in data.rows if r["variant"] != "baseline"]
    entries = route_status(SummaryData(rows, data.curves, data.params, data.val_curves, data.metric_curves))
    assert entries and all(e.verdict == NO_BASELINE and e.delta is None for e in entries)


def test_param_importance_of_the_tuned_variant(example):
    data, specs, _ = example
    [tuned] = tuned_variants(data)
    assert (tuned.setting[1], tuned.variant) == ("smoke", "rgb_edge")
    assert tuned.knobs == ["router.eps", "router.strength"] and len(tuned.trials) == sum(1 for s in specs if s.overrides)
    # Importances are fractions of one total: their float64 sum is 1 to the rounding of n additions.
    assert sum(tuned.importances.values()) == pytest.approx(1.0, abs=statistic_bound([1.0] * len(tuned.importances)))
    assert tuned.importances["router.eps"] > tuned.importances["router.strength"]  # the loss follows eps
    # A configuration last validated at an earlier step (stopped early by ASHA) is not compared
    # with those validated at the last step: it is left out of the importances' trials.
    tuned_rows = [r for r in data.rows if r["variant"] == "rgb_edge" and r["status"] == "finished" and r.get("val_step")]
    early = {**tuned_rows[0], "val_step": tuned_rows[0]["val_step"] - 1, "val_loss": -100.0}
    [again] = tuned_variants(SummaryData([*data.rows, early], data.curves, data.params, data.val_curves))
    assert len(again.trials) == len(tuned.trials) and -100.0 not in [v for _, v in again.trials]


# ------------------------------------------------------------------ the files

def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_report_writes_tables_json_and_plots(example, report):
    data, specs, _ = example
    assert (report / CSV_NAME).is_file() and json.loads((report / JSON_NAME).read_text()) == data.rows
    summary = json.loads((report / REPORT_JSON).read_text())
    route = json.loads((report / ROUTE_JSON).read_text())
    stage1 = [s for s in specs if s.kind == "stage1"]
    assert summary["counts"] == {
        "stage1_runs": len(stage1), "stage2_runs": len(specs) - len(stage1),
        "ot_diagnostic_runs": sum(RUN_KINDS["stage1"].variants[s.variant].router is not None for s in stage1),
        "total_parsed_runs": len(specs),
    }
    assert summary["status"] == {s: sum(sp.status == s for sp in specs) for s in STATUSES}
    assert {e["verdict"] for e in route} >= {BETTER, WORSE, INCONCLUSIVE, ONE_SEED}
    required = {"variant", "baseline", "metric", "step", "seeds", "delta", "delta_pct", "ci_low", "ci_high", "verdict",
                "verdict_corrected", "valid", "reason"}
    required |= {"corrected_ci_low", "corrected_ci_high", "margin", "mde", "design", "secondary"}
    # Each kind's primary metric: Stage1 the flow loss, Stage2 the articulation error.
    assert all(required <= set(e) for e in route)
    assert {(e["kind"], e["metric"]) for e in route} == {("stage1", M.VAL_LOSS), ("stage2", M.VAL_ART_L2)}
    assert summary["param_importance"][0]["importances"]
    pngs = [f"{p.name}.png" for p in plots_for(data)] + [summary["param_importance"][0]["parallel_coordinates"]]
    for name in pngs:
        pixels = png(report / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 600 and pixels.std() > 10, name


def test_only_the_panels_of_what_the_sweep_ran(example):
    data, _, _ = example
    stage1_only = SummaryData([r for r in data.rows if r["kind"] == "stage1"], data.curves, data.params, data.val_curves)
    files = render_report(stage1_only)
    drawn = {name for name in files if name.endswith(".png")}
    assert {f"{p.name}.png" for p in PLOTS if p.name.startswith("stage1")} <= drawn
    assert not any(name.startswith("stage2") for name in drawn)
    nothing = render_report(SummaryData([]))
    assert not [name for name in nothing if name.endswith(".png")]
    assert "No finished variant runs" in nothing[INDEX_HTML]
    # A figure with nothing to draw says why instead of drawing empty axes.
    empty = placeholder("t", "m")
    no_val = SummaryData(stage1_only.rows, stage1_only.curves, stage1_only.params, {})
    size = Image.open(io.BytesIO(empty)).size
    assert Image.open(io.BytesIO(render_report(no_val)["stage1_val_curves.png"])).size == size


class PageParser(HTMLParser):
    """Sections, images, links, table rows and text of the report page."""

    def __init__(self):
        super().__init__()
        self.sections, self.imgs, self.links, self.text = [], [], [], []
        self.tags: set[str] = set()
        self.section, self.rows_in = None, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.section = a.get("id")
            self.sections.append(self.section)
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "tr":
            self.rows_in[self.section] = self.rows_in.get(self.section, 0) + 1

    def handle_data(self, data):
        self.text.append(data)


def test_page_parses_with_counts_sections_rows_and_relative_links(example, report):
    data, specs, _ = example
    page = PageParser()
    page.feed((report / INDEX_HTML).read_text())
    text = " ".join(page.text)
    assert page.sections == ["counts", "route-status", "param-importance", "plots", "ablation-table", "files"]
    counts = json.loads((report / REPORT_JSON).read_text())["counts"]
    for key, label in COUNT_LABELS.items():
        assert f"{counts[key]} {label}" in text
    assert counts["ot_diagnostic_runs"] == sum(router_on(r) for r in data.rows)
    assert page.rows_in["ablation-table"] == 1 + len(data.rows)
    assert page.rows_in["route-status"] == 1 + len(route_status(data))
    for row in data.rows:
        assert row["run"] in text and row["run_id"] in text
    assert next(s.error for s in specs if s.error) in text and " - " in f" {text} "
    # The plots inlined (data: URIs: MLflow's artifact viewer resolves no relative src), each
    # the very PNG beside the page, which the page links.
    inlined = [base64.b64decode(src.split(",", 1)[1]) for src in page.imgs if src.startswith("data:image/png;base64,")]
    assert len(inlined) == len(page.imgs)
    assert {(report / f"{p.name}.png").read_bytes() for p in plots_for(data)} <= set(inlined)
    assert {f"{p.name}.png" for p in plots_for(data)} <= set(page.links)
    assert {CSV_NAME, JSON_NAME, ROUTE_JSON, REPORT_JSON} <= set(page.links)
    for ref in page.links:  # static: relative links to files beside the page
        assert "://" not in ref and not ref.startswith("/") and (report / ref).is_file(), ref
    assert "script" not in page.tags and "link" not in page.tags


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_page_screenshot_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size={SCREEN[0]},{SCREEN[1]}",
                    (report / INDEX_HTML).as_uri()], check=True, capture_output=True, timeout=120)
    pixels = png(shot)
    assert pixels.shape[:2] == (SCREEN[1], SCREEN[0])
    assert pixels.std() > 20  # not blank: text, tables and plots
    top, bottom = pixels[: SCREEN[1] // 2], pixels[SCREEN[1] // 2 :]
    assert top.std() > 10 and bottom.std() > 10  # content all the way down, not only a header


# --------------------------------------------------------------- a real sweep

@pytest.mark.slow
def test_real_sweep_summarised_from_mlflow_and_from_ray_results(tmp_path, ray_address, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = run_sweep("stage1", ["--model", "tiny", "--profile", "smoke", "--variants", "baseline,ot_first", "--seeds", "0,1",
                              "--name", "dash", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri, "--quiet"])
    assert rc == 0
    assert summarize(["--tracking-uri", uri, "--out", str(tmp_path / "from_mlflow")]) == 0
    assert summarize(["--results", str(tmp_path / "runs"), "--out", str(tmp_path / "from_ray")]) == 0
    capsys.readouterr()

    def rows(folder: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "mlflow_run_id"} for r in json.loads((tmp_path / folder / JSON_NAME).read_text())]
    from_mlflow = rows("from_mlflow")
    assert len(from_mlflow) == 4 and all(r["status"] == "finished" and r["steps"] == 1 for r in from_mlflow)
    assert rows("from_ray") == from_mlflow  # the same floats, read from either source
    for folder in ("from_mlflow", "from_ray"):
        status = json.loads((tmp_path / folder / ROUTE_JSON).read_text())
        assert [(e["variant"], e["seeds"], e["method"], e["step"], e["metric"]) for e in status] == [
            ("ot_first", [0, 1], "paired", 1, M.VAL_LOSS)]
        page = PageParser()
        page.feed((tmp_path / folder / INDEX_HTML).read_text())
        # The plots are inside the page (data: URIs, which MLflow's artifact viewer shows), each linked to its PNG.
        assert page.rows_in["ablation-table"] == 5 and len(page.imgs) >= 2
        assert all(src.startswith("data:image/png;base64,") for src in page.imgs)
        assert set(page.links) >= {"stage1_val_delta.png", "stage1_loss_curves.png"}
        assert not any(link.startswith("stage2") for link in page.links)


def test_a_figure_with_nothing_to_draw_wraps_its_reason_and_counts_alike_configurations(monkeypatch, recwarn):
    import pact_ray.report.ablation.plots as plots
    from pact_ray.report.ablation.route import RouteEntry

    def entry(eps: str) -> RouteEntry:  # a tuned configuration whose setting ran no baseline
        return RouteEntry(setting=("stage1", "smoke", "tiny"), variant="rgb_edge", knobs={"eps": eps, "lambda_edge": "1.24"},
                          metric="val_loss", step=1, seeds=(0,), baseline_seeds=(), value=None, baseline=None, delta=None,
                          delta_pct=None, diagnostics={}, verdict="no baseline", verdict_corrected="no baseline",
                          p_corrected=None, valid=False, reason="no baseline (no baseline run in this setting)", unfinished=0)

    said: list[str] = []
    real = plots.placeholder
    monkeypatch.setattr(plots, "placeholder", lambda title, message: said.append(message) or real(title, message))
    png = plots.delta_forest([entry("0.0132"), entry("0.0856"), entry("0.327")], "stage1", "Stage1: Δ", "nothing")
    assert said == ["no baseline (no baseline run in this setting): 3 configurations"]
    one = plots.delta_forest([entry("0.0132")], "stage1", "Stage1: Δ", "nothing")
    assert said[1].startswith("RGB edge · ") and "eps=0.0132" in said[1] and said[1].endswith(": no baseline (no baseline run in this setting)")
    # A message longer than a line is wrapped onto more lines (a taller figure), not cut at the
    # figure's edge, and the layout never collapses (matplotlib warns when it does).
    short, long = (Image.open(io.BytesIO(b)).size for b in (real("t", "m"), real("t", "word " * 40)))
    assert long[0] == short[0] and long[1] > short[1]
    assert Image.open(io.BytesIO(one)).size[1] > short[1] and Image.open(io.BytesIO(png)).size == short
    assert not [w for w in recwarn if "constrained_layout" in str(w.message)]


def test_the_delta_forest_wraps_long_configuration_labels_instead_of_collapsing(recwarn):
    """Tuned configurations compared with a baseline are labelled with every knob they set; the
    labels are wrapped so the axes keep their width (matplotlib warns when constrained layout
    collapses them, which an unwrapped 140-character label did), and each row gets its lines."""
    import pact_ray.report.ablation.plots as plots
    from pact_ray.report.ablation.route import RouteEntry
    from pact_ray.report.ablation.stats import difference

    knobs = {k: "0.123" for k in ("edge_beta", "eps", "iterations", "lambda_edge", "lambda_mask", "strength", "t_max", "t_min")}

    def entry(eps: str) -> RouteEntry:
        delta = difference({0: 1.0, 1: 1.1}, {0: 1.2, 1: 1.25})
        return RouteEntry(setting=("stage1", "smoke", "tiny"), variant="rgb_edge", knobs={**knobs, "eps": eps}, metric="val_loss",
                          step=3, seeds=(0, 1), baseline_seeds=(0, 1), value=None, baseline=None, delta=delta, delta_pct=None,
                          diagnostics={}, verdict="inconclusive", verdict_corrected="inconclusive", p_corrected=0.2, valid=True,
                          reason="", unfinished=0)

    assert len(entry("0.01").label) > 100
    one, three = (plots.delta_forest([entry(e) for e in eps], "stage1", "Stage1: Δ", "nothing")
                  for eps in (["0.01"], ["0.01", "0.02", "0.03"]))
    assert not [w for w in recwarn if "constrained_layout" in str(w.message)]
    (w1, h1), (w3, h3) = (Image.open(io.BytesIO(b)).size for b in (one, three))
    assert w1 == w3 and h3 > h1  # rows of several lines each make the figure taller, never wider
