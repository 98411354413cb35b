"""Verdicts a researcher can trust: held-out validation with common random numbers, like-for-like
steps, Holm's correction, validity gates, adaptive seeds, and the world-model summary."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch
from example_store import TrialSpec, log_sweep, loss_curve, router_history
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from pact_ray.errors import ConfigError
from pact_ray.metrics import names as M
from pact_ray.report.ablation.route import MARGINAL_ERROR_MAX, NO_VERDICT, route_status, verdict_lines
from pact_ray.report.ablation.stats import BETTER, INCONCLUSIVE, WORSE, difference
from pact_ray.report.summary import collect
from pact_ray.report.world_model_sweep import (
    COMPARISON_JSON,
    CSV_NAME,
    INDEX_HTML,
    WorldModelSweep,
    compare_to_gpt,
    summary_lines,
    variant_means,
    write_world_model_summary,
)
from pact_ray.runs.stage1 import Stage1RunConfig
from pact_ray.training.stage1 import Stage1Trainer
from pact_ray.training.validation import split_indices, stratified_timesteps
from pact_ray.tune.adaptive import BASELINE, AdaptiveSeedSearcher
from pact_ray.verdicts import NOT_FOR_CONCLUSIONS, Design, Margin, decide, decide_family

# ------------------------------------------------------------ like for like

def _store(tmp_path, specs: list[TrialSpec]):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_sweep(uri, specs, sweep="t", experiment="pact-ray/stage1_router")
    return collect(uri)


def test_a_shorter_variant_meets_the_baseline_at_its_own_step(tmp_path):
    """The quick profile trains first_third for 3 steps and the baseline for 8: they are
    compared at step 3, where both validated, not at the baseline's step 8."""
    specs = []
    for seed in (0, 1, 2):
        base_curve = loss_curve(1.0 + 0.01 * seed, 8, start=2.0)
        specs.append(TrialSpec("baseline", router_history("baseline", base_curve), seed, "quick"))
        third = [v + 0.001 * (seed - 1) for v in base_curve[:3]]
        specs.append(TrialSpec("first_third", router_history("first_third", third, seed), seed, "quick"))
    data = _store(tmp_path, specs)
    [entry] = route_status(data)
    assert entry.variant == "first_third" and entry.step == 3
    base_at_3 = [s.history[M.LOSS][2] for s in specs if s.variant == "baseline"]
    assert entry.baseline.mean == pytest.approx(sum(base_at_3) / 3, abs=1e-12)
    assert abs(entry.delta.estimate.mean) < 0.002 and entry.verdict == INCONCLUSIVE  # not "+13 % worse"
    assert "step 3" in "\n".join(verdict_lines([entry]))


def test_validity_gates_withhold_the_verdict(tmp_path):
    specs = []
    for seed in (0, 1, 2):
        specs.append(TrialSpec("baseline", router_history("baseline", loss_curve(1.0 + 0.01 * seed, 8)), seed, "quick"))
        diverged = router_history("ot_first", loss_curve(0.5 + 0.01 * seed, 8), seed)
        diverged[M.NONFINITE_STEPS] = [0.0] * 6 + [1.0, 1.0]
        specs.append(TrialSpec("ot_first", diverged, seed, "quick"))
        loose = router_history("mask_prior", loss_curve(0.5 + 0.01 * seed, 8), seed)
        loose[M.MARGINAL_ERROR] = [5 * MARGINAL_ERROR_MAX] * 8
        specs.append(TrialSpec("mask_prior", loose, seed, "quick"))
        fine = router_history("rgb_edge", loss_curve(0.5 + 0.01 * seed, 8), seed)
        fine[M.MARGINAL_ERROR] = [0.1 * MARGINAL_ERROR_MAX] * 8
        specs.append(TrialSpec("rgb_edge", fine, seed, "quick"))
    entries = {e.variant: e for e in route_status(_store(tmp_path, specs))}
    assert not entries["ot_first"].valid and "diverged" in entries["ot_first"].reason
    assert not entries["mask_prior"].valid and "did not converge" in entries["mask_prior"].reason
    for name in ("ot_first", "mask_prior"):
        assert entries[name].verdict == entries[name].verdict_corrected == NO_VERDICT
    assert entries["rgb_edge"].valid and entries["rgb_edge"].verdict_corrected == BETTER


def test_best_is_printed_only_after_the_correction(tmp_path):
    specs = []
    for seed in (0, 1):
        specs.append(TrialSpec("baseline", router_history("baseline", loss_curve(1.0 + 0.1 * seed, 8)), seed, "quick"))
        specs.append(TrialSpec("ot_first", router_history("ot_first", loss_curve(0.999 + 0.1 * seed + 0.004 * seed, 8), seed), seed, "quick"))
    lines = "\n".join(verdict_lines(route_status(_store(tmp_path, specs))))
    assert "Best" not in lines and "No Stage1 variant beats the baseline at 2 seed(s)" in lines
    assert "could detect (80 % power)" in lines and "margin ±1 %" in lines


# ---------------------------------------------------------------- validation

@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 9), min_size=4, max_size=40), fraction=st.sampled_from([0.1, 0.25, 0.5]),
       seed=st.integers(0, 3))
def test_a_grouped_split_keeps_every_object_on_one_side(labels, fraction, seed):
    """Views of one object (a group) are all trained on or all held out; the groups held out
    are ceil(G * fraction); the split is a partition and fixed by the seed."""
    groups = np.array(labels)
    try:
        train, val = split_indices(len(groups), fraction, seed, groups=groups)
    except ConfigError:
        assert len(set(labels)) == 1 or math.ceil(len(set(labels)) * fraction) == len(set(labels))
        return
    assert sorted([*train, *val]) == list(range(len(groups))) and not set(train) & set(val)
    assert not set(groups[train]) & set(groups[val])
    assert len(set(groups[val])) == max(1, math.ceil(len(set(labels)) * fraction))
    assert np.array_equal(split_indices(len(groups), fraction, seed, groups=groups)[1], val)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 200), fraction=st.sampled_from([0.1, 0.25, 0.5]), seed=st.integers(0, 1000))
def test_one_sample_per_object_is_the_per_sample_split(n, fraction, seed):
    """Where every sample is its own object (synthetic data), grouping changes nothing."""
    plain = split_indices(n, fraction, seed)
    grouped = split_indices(n, fraction, seed, groups=np.arange(n))
    assert all(np.array_equal(a, b) for a, b in zip(plain, grouped))


def test_validation_is_held_out_and_uses_common_random_numbers():
    train, val = split_indices(32, 0.25, data_seed=0)
    assert len(val) == 8 and not set(train) & set(val) and sorted([*train, *val]) == list(range(32))
    assert np.array_equal(split_indices(32, 0.25, 0)[1], val) and not np.array_equal(split_indices(32, 0.25, 1)[1], val)
    t = stratified_timesteps(4)
    assert torch.all(t[1:] > t[:-1]) and float(t.min()) > 0 and float(t.max()) < 1
    a = Stage1Trainer(Stage1RunConfig.for_variant("baseline", "smoke", "tiny", seed=0))
    b = Stage1Trainer(Stage1RunConfig.for_variant("ot_first", "smoke", "tiny", seed=5))
    assert np.array_equal(a.eval_ids, b.eval_ids) and set(a.eval_ids) <= set(a.val_ids)
    # Training never draws a held-out sample.
    drawn: list[int] = []
    dataset = a.dataset

    class Recording:
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            drawn.append(int(i))
            return dataset[i]

    a.dataset = Recording()
    for step in range(20):
        a.batch(step)
    a.dataset = dataset
    assert drawn and not set(drawn) & set(a.val_ids.tolist())
    # The same weights give the same validation loss whatever the run's seed or variant
    # (the router of ot_first at strength 0 is the plain core): the draws are the data's.
    c = Stage1Trainer(Stage1RunConfig.for_variant("ot_first", "smoke", "tiny", seed=7, **{"router.strength": 0.0}))
    c.model.load_state_dict(a.model.state_dict(), strict=False)
    assert a.evaluate()[M.VAL_LOSS] == c.evaluate()[M.VAL_LOSS]


def test_every_variant_validates_where_the_shorter_ones_end():
    base = Stage1RunConfig.for_variant("baseline", "quick", "tiny")
    third = Stage1RunConfig.for_variant("first_third", "quick", "tiny")
    assert [s for s in range(1, base.steps + 1) if base.eval_due(s)] == [third.steps, base.steps]
    full = Stage1RunConfig.for_variant("baseline", "full", "tiny")
    assert {20, 60} <= {s for s in range(1, full.steps + 1) if full.eval_due(s)}


# ---------------------------------------------------------------- adaptive seeds

def _drive(searcher: AdaptiveSeedSearcher, value, rounds: int = 50) -> list[tuple[str, int]]:
    """Run the searcher to the end: every suggested trial reports value(variant, seed) at step 1."""
    ran, count = [], 0
    while count < rounds:
        pending = []
        while (cfg := searcher.suggest(f"t{len(ran) + len(pending)}")) not in (None, "FINISHED"):
            pending.append((f"t{len(ran) + len(pending)}", cfg))
        for trial_id, cfg in pending:
            searcher.on_trial_complete(trial_id, {M.STEP: 1, M.VAL_LOSS: value(cfg["variant"], cfg["seed"])})
            ran.append((cfg["variant"], cfg["seed"]))
        if cfg == "FINISHED":
            return ran
        count += 1
    raise AssertionError("the searcher did not finish")


def test_adaptive_seeds_stop_when_conclusive_and_at_the_cap(tmp_path):
    rng = np.random.default_rng(0)
    seed_effect = {s: float(rng.normal(0, 0.05)) for s in range(20)}
    noise = {s: float(rng.normal(0, 0.02)) for s in range(20)}

    def value(variant, seed):
        shift = {BASELINE: 0.0, "clear": -0.03, "null": 0.0}[variant]
        return 1.0 + seed_effect[seed] + shift + (noise[seed] if variant == "null" else 0.001 * (seed % 2))

    searcher = AdaptiveSeedSearcher({"profile": "smoke"}, [BASELINE, "clear", "null"], seeds=[0, 1], max_seeds=6)
    ran = _drive(searcher, value)
    seeds = {v: sorted(s for name, s in ran if name == v) for v in (BASELINE, "clear", "null")}
    assert seeds["clear"] == [0, 1, 2] or len(seeds["clear"]) <= 3  # decided within a round or two
    assert searcher.verdicts()["clear"].startswith(BETTER)
    assert seeds["null"] == list(range(6))  # never conclusive: stopped at the cap
    assert set(seeds["null"]) <= set(seeds[BASELINE])  # every seed has its pair
    assert len(ran) == len(set(ran))  # no trial ran twice
    # The state survives a save and restore (what --resume uses), as JSON: no pickle to run.
    path = tmp_path / "searcher-state.json"
    searcher.save(str(path))
    assert json.loads(path.read_text())["finished"] is True
    clone = AdaptiveSeedSearcher({"profile": "smoke"}, [BASELINE, "x"], seeds=[0], max_seeds=2)
    clone.restore(str(path))
    assert clone.get_state() == searcher.get_state()
    assert clone.verdicts() == searcher.verdicts() and clone.suggest("again") == "FINISHED"


def test_adaptive_seeds_need_a_baseline():
    with pytest.raises(ValueError, match="baseline"):
        AdaptiveSeedSearcher({}, ["ot_first"], [0, 1], 4)


# ---------------------------------------------------------------- the world model

def _wm_rows() -> list[dict]:
    rows = []
    for variant, model_type, offset in (("mae", "mae", -0.004), ("mae_random", "mae", 0.0001), ("gpt", "gpt", 0.0)):
        for seed in (0, 1, 2):
            val = 0.02 + 0.001 * seed + offset + (0.0003 * (seed - 1) if variant == "mae_random" else 0.0)
            row = {"run": f"{variant} s{seed}", "mlflow_run_id": f"{variant}{seed}".ljust(32, "0"), "variant": variant,
                   "model_type": model_type, "model": "small", "seed": seed, "status": "finished", "error": None, "steps": 60,
                   "eval_report": f"python analysis/eval_report.py --run {variant}{seed}"}
            row.update({m: None for m in (M.VAL_MSE_VISUAL, M.VAL_MSE_MOTOR_STRIP, M.MOTOR_POSITION_MAE_MEAN,
                                          M.MOTOR_VELOCITY_MAE_MEAN, M.MOTOR_DIRECTION_ACCURACY, M.ACTION_DISCRIMINATION_SCORE,
                                          M.TF_FR_GAP)})
            row.update({M.VAL_MSE: val, M.SSIM: 0.9 - val, M.PSNR: 17.0 - 100 * val})
            rows.append(row)
    return rows


def test_world_model_summary_compares_mae_with_gpt_on_val_mse(tmp_path):
    rows = _wm_rows()
    comparisons = {c["variant"]: c for c in compare_to_gpt(rows)}
    assert set(comparisons) == {"mae", "mae_random"} and all(c["baseline"] == "gpt" for c in comparisons.values())
    assert comparisons["mae"]["verdict_corrected"].startswith(BETTER) and comparisons["mae"]["delta"] == pytest.approx(-0.004, abs=1e-12)
    assert comparisons["mae_random"]["verdict_corrected"] in (INCONCLUSIVE, WORSE)
    wm = WorldModelSweep(rows, variant_means(rows), compare_to_gpt(rows), "sqlite:////x/mlflow.db")
    files = {f.name for f in write_world_model_summary(wm, tmp_path)}
    assert {CSV_NAME, COMPARISON_JSON, INDEX_HTML} <= files
    page = (tmp_path / INDEX_HTML).read_text()
    assert "MAE vs GPT" in page and "analysis/eval_report.py --run mae0" in page and "Route status" not in page
    means = json.loads((tmp_path / COMPARISON_JSON).read_text())["means"]
    assert [m["variant"] for m in means] == ["mae", "mae_random", "gpt"] and means[0][M.VAL_MSE]["n"] == 3
    text = "\n".join(summary_lines(wm))
    assert "Best" not in text and "MAE vs GPT (small): mae - gpt" in text


# ---------------------------------------------------------------- margins and the decision rule

def _paired(diffs: list[float]):
    base = {s: 10.0 + s for s in range(len(diffs))}
    return difference({s: v + d for (s, v), d in zip(base.items(), diffs)}, base)


@pytest.mark.parametrize("diffs, margin, expected", [
    ([-0.50, -0.52, -0.49, -0.51], 0.1, ("better", "beyond")),  # clearly lower, by more than the margin
    ([-0.05, -0.052, -0.049, -0.051], 0.1, ("better", "within")),  # real, too small to matter
    ([-0.10, -0.13, -0.08, -0.11], 0.1, ("better", "size unclear")),  # real, straddles the margin
    ([0.01, -0.01, 0.012, -0.009], 0.1, ("equivalent", "")),  # inside ±δ and 0
    ([0.3, -0.3, 0.25, -0.2], 0.1, ("inconclusive", "")),  # wide
    ([0.0, 0.0, 0.0, 0.0], 0.1, ("identical", "")),  # the same runs
])
def test_each_verdict_reads_the_interval_against_the_margin(diffs, margin, expected):
    d = decide(_paired(diffs), 0.05, margin)
    assert (d.verdict, d.magnitude) == expected
    if expected[0] != "identical":
        lo, hi = d.interval
        ref = sps.ttest_1samp(diffs, 0.0).confidence_interval(0.95)  # scipy's own paired t interval
        assert (lo, hi) == pytest.approx((ref.low, ref.high), rel=1e-9)


@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=10), st.floats(1e-3, 0.5),
       st.floats(1e-4, 0.2))
@settings(max_examples=200, deadline=None)
def test_the_verdict_is_the_interval_property(diffs, margin, level):
    diff = _paired(diffs)
    d = decide(diff, level, margin)
    if d.verdict == "identical":  # the runs' values are equal seed by seed (after rounding, as MLflow stores them)
        assert diff.estimate.mean == 0 and diff.se == 0
        return
    lo, hi = d.interval
    excludes_zero = lo > 0 or hi < 0
    assert (d.verdict in ("better", "worse")) == excludes_zero
    assert (d.verdict == "equivalent") == (not excludes_zero and -margin <= lo and hi <= margin)
    if d.verdict == "better":
        assert hi < 0  # lower is better
    if d.magnitude == "beyond":
        assert lo > margin or hi < -margin


def test_a_smaller_level_widens_the_interval_and_the_family_shares_alpha():
    diff = _paired([0.01, 0.02, 0.015, 0.011])
    wide, narrow = decide(diff, 0.05 / 7, None), decide(diff, 0.05, None)
    assert wide.interval[0] < narrow.interval[0] and wide.interval[1] > narrow.interval[1]
    family = decide_family([diff] * 7, [4] * 7, [10.0] * 7, Design())
    assert all(f.level == pytest.approx(0.05 / 7) for f in family)
    # An identical comparison leaves the family: the others share the alpha among fewer.
    same = _paired([0.0] * 4)
    family = decide_family([diff, same], [4, 4], [10.0, 10.0], Design())
    assert family[1].verdict == "identical" and family[0].level == pytest.approx(0.05)


def test_the_minimum_detectable_effect_has_the_stated_power():
    """At the reported MDE, a paired t test at the comparison's level has 80 % power: checked
    by simulating the test itself (200,000 draws of the t statistic at that true difference;
    within 3 Monte-Carlo standard errors), at 2 to 10 seeds."""
    rng = np.random.default_rng(0)
    level, draws = 0.05 / 7, 200_000
    for n in (2, 3, 5, 10):
        diffs = list(rng.normal(0.0, 0.01, n))
        d = decide(_paired(diffs), level, 0.001)
        nc = d.mde / (statistics.stdev(diffs) / np.sqrt(n))  # the MDE in standard errors
        t = (rng.normal(size=draws) + nc) / np.sqrt(rng.chisquare(n - 1, draws) / (n - 1))
        power = float(np.mean(np.abs(t) > sps.t.ppf(1 - level / 2, n - 1)))
        assert abs(power - 0.8) <= 3 * np.sqrt(0.8 * 0.2 / draws), (n, power)


def test_margins_parse_and_refuse_bad_input():
    assert Margin.parse("1%") == Margin(0.01, True) and Margin.parse("0.005") == Margin(0.005, False)
    assert Margin.parse("2.5 %").absolute(-4.0) == pytest.approx(0.1)
    for bad in ("abc", "0", "-1%", "nan", "inf%"):
        with pytest.raises(ConfigError):
            Margin.parse(bad)


def test_a_smoke_run_and_a_short_comparison_get_intervals_but_no_verdict(tmp_path):
    specs = []
    for seed in (0, 1, 2):
        specs.append(TrialSpec("baseline", router_history("baseline", loss_curve(1.0 + 0.01 * seed, 2)), seed, "stability",
                               overrides={"steps": 2}))
        specs.append(TrialSpec("ot_first", router_history("ot_first", loss_curve(0.5 + 0.01 * seed, 2), seed), seed,
                               "stability", overrides={"steps": 2}))
    [entry] = route_status(_store(tmp_path, specs))
    assert entry.verdict == entry.verdict_corrected == NOT_FOR_CONCLUSIONS and "2 step(s)" in entry.reason
    assert entry.decision is not None and entry.decision.interval is not None  # the interval is still shown
    lines = "\n".join(verdict_lines([entry]))
    assert "intervals only" in lines and "Best" not in lines and "better" not in lines
