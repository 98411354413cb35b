"""Verdicts a researcher can trust: held-out validation with common random numbers, like-for-like
steps, Holm's correction, validity gates, adaptive seeds, and the world-model summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from example_store import TrialSpec, log_sweep, loss_curve, router_history
from statsmodels.stats.multitest import multipletests

from pact_ray.metrics import names as M
from pact_ray.report.ablation.route import MARGINAL_ERROR_MAX, NO_VERDICT, route_status, verdict_lines
from pact_ray.report.ablation.stats import BETTER, INCONCLUSIVE, ONE_SEED, WORSE, corrected_verdicts, difference, holm
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

# ---------------------------------------------------------------- the correction

def test_holm_on_known_p_values():
    # Holm: sort, p_(i) * (m - i + 1), running maximum, capped at 1 (Holm 1979; worked by hand).
    p = [0.01, 0.04, 0.03, 0.005]
    reject, adjusted = holm(p)
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-12)
    assert reject == [True, False, False, True]
    rng = np.random.default_rng(0)
    for _ in range(20):  # and statsmodels' own implementation on random families
        ps = list(rng.uniform(0, 0.2, size=int(rng.integers(1, 9))))
        ref_reject, ref_adjusted, _, _ = multipletests(ps, alpha=0.05, method="holm")
        assert holm(ps) == (list(ref_reject), pytest.approx(list(ref_adjusted), abs=1e-12))


def test_corrected_verdicts_are_stricter_than_the_uncorrected_ones():
    base = {0: 1.00, 1: 1.02, 2: 0.99, 3: 1.01}
    clear = difference({s: v - 0.05 for s, v in base.items()}, base)  # every seed 0.05 lower: p = 0
    marginal = difference({0: 0.99, 1: 1.015, 2: 0.975, 3: 1.004}, base)  # better at 5 %, not after 4 tests
    noise = [difference({0: 1.01, 1: 1.0, 2: 1.0, 3: 1.02}, base), difference({0: 0.99, 1: 1.03, 2: 1.0, 3: 1.0}, base)]
    family = [clear, marginal, *noise]
    assert [d.p_value < 0.05 for d in family[:2]] == [True, True]
    verdicts, adjusted = corrected_verdicts(family)
    assert verdicts[0] == BETTER and verdicts[1] == INCONCLUSIVE and adjusted[1] > 0.05
    # Comparisons without a test stay out of the family.
    verdicts, adjusted = corrected_verdicts([clear, None, difference({0: 0.9}, {0: 1.0})])
    assert verdicts == [BETTER, None, ONE_SEED] and adjusted[1:] == [None, None]


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
    assert "Best" not in lines and "No Stage1 variant beats the baseline at 2 seed(s)" in lines and "wide" in lines


# ---------------------------------------------------------------- validation

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


def test_adaptive_seeds_stop_when_conclusive_and_at_the_cap():
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
    assert searcher.verdicts()["clear"] == BETTER
    assert seeds["null"] == list(range(6))  # never conclusive: stopped at the cap
    assert set(seeds["null"]) <= set(seeds[BASELINE])  # every seed has its pair
    assert len(ran) == len(set(ran))  # no trial ran twice
    # The state survives a save and restore (what --resume uses).
    clone = AdaptiveSeedSearcher({"profile": "smoke"}, [BASELINE, "x"], seeds=[0], max_seeds=2)
    clone.set_state(searcher.get_state())
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
    assert comparisons["mae"]["verdict_corrected"] == BETTER and comparisons["mae"]["delta"] == pytest.approx(-0.004, abs=1e-12)
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
