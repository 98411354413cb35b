"""Optuna through Ray Tune, with the study readable by optuna-dashboard: the objective named
after the metric it is (not "Objective 0"), and every Optuna trial linked to its MLflow run
both ways: the run id in the trial's user attributes (set here, before the study is told the
result, since Optuna refuses to change a finished trial) and the trial number as the run's tag
(set by the MLflow callback, from the Ray trial id this searcher marks each trial with)."""

from __future__ import annotations

import contextlib
import math
import warnings

from ray.tune.search.optuna import OptunaSearch

from pact_ray.metrics import names as M
from pact_ray.tracking.callback import (
    MLFLOW_RUN_ATTR,
    MLFLOW_URL_ATTR,
    RAY_TRIAL_ATTR,
    mark_optuna_state,
    optuna_run_url,
    optuna_sweep_url,
    optuna_trial_run,
)
from pact_ray.tune.plan import SweepPlan, optuna_dashboard_command, verdict_metric

# How long a finishing trial waits for the MLflow writer to have created its run. The run is
# queued when the trial starts, so this bounds only a tracking store that is slow or away; the
# Tune loop waits meanwhile, and a trial left unlinked says so.
LINK_WAIT_S = 30.0


class LinkedOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, naming the study's objective and linking each trial to its MLflow run."""

    def __init__(self, *args, link_runs: bool = False, steps: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._link_runs = link_runs  # a persistent study: the MLflow callback logs its trials' runs
        self._steps = steps  # every trial's length: only a value at this step is the objective

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        trial = self._ot_trials.get(trial_id)
        if trial is not None:
            trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
            if self._ot_study.metric_names is None:
                import optuna

                with warnings.catch_warnings():  # "experimental since 3.2": the API optuna-dashboard reads names from
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self._ot_study.set_metric_names([self._metric])
                self._describe_study()
        return config

    def _describe_study(self, runs_url: str | None = None) -> None:
        """The study names its sweep and metric (user attributes, and a note optuna-dashboard
        shows on the study's page), and links the sweep's runs in MLflow once known."""
        study = self._ot_study
        attrs = {"sweep": self._study_name, "metric": self._metric, "mode": self._mode, "objective_step": getattr(self, "_steps", None)}
        if runs_url:
            attrs["mlflow_runs_url"] = runs_url
        for key, value in attrs.items():
            if value is not None:
                study.set_user_attr(key, value)
        step = f" at step {self._steps}" if getattr(self, "_steps", None) else ""
        runs = f"\n\nIts runs in MLflow: [{runs_url}]({runs_url}) (each trial's run: its `{MLFLOW_URL_ATTR}` user attribute " \
               "and note)." if runs_url else ""
        _note(study, f"## Sweep `{self._study_name}`\n\nObjective: **{self._metric}** ({self._mode}imised){step}, "
                     f"the held-out metric of each trial's run.{runs}\n")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # The objective is a held-out metric, present only in the results of evaluation steps
        # (Ray's OptunaSearch reads it from every result and raises a KeyError on the others).
        if self._metric in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        trial = self._ot_trials.get(trial_id)
        ref = None
        if getattr(self, "_link_runs", False) and trial is not None and trial_id not in self._completed_trials:
            ref = optuna_trial_run(self._study_name, trial_id, LINK_WAIT_S)
            if ref is not None:
                self._link(trial, ref)
        steps = getattr(self, "_steps", None)
        if result and steps and result.get(M.STEP) != steps:
            # Stopped early (ASHA): a validation value from an earlier step is not comparable with
            # the others' at the last step. Without a result Optuna records the trial as pruned.
            result = None
        super().on_trial_complete(trial_id, result, error)
        if ref is not None:  # the run says how its Optuna trial ended (pruned: stopped early)
            with contextlib.suppress(Exception):
                state = self._ot_study._storage.get_trial(trial._trial_id).state
                mark_optuna_state(self._study_name, ref, state.name.lower())

    def _link(self, trial, ref) -> None:
        """The trial's run: its id and page as user attributes (set before the study is told
        the result: Optuna refuses to change a finished trial), and a note linking the page."""
        trial.set_user_attr(MLFLOW_RUN_ATTR, ref.run_id)
        url = optuna_run_url(self._study_name, ref)
        if url:
            trial.set_user_attr(MLFLOW_URL_ATTR, url)
            _note(trial, f"MLflow run: [{ref.name}]({url})\n")
            if "mlflow_runs_url" not in self._ot_study.user_attrs:
                self._describe_study(optuna_sweep_url(self._study_name, ref.experiment_id))


def _note(study_or_trial, body: str) -> None:
    """A Markdown note optuna-dashboard shows on the study's or trial's page (where installed)."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    with contextlib.suppress(Exception):  # a note is a courtesy: never a reason for a trial to fail
        save_note(study_or_trial, body)


def linked_optuna_search(metric: str, mode: str, seed: int, storage_url: str | None, study_name: str,
                         steps: int | None = None, verbose: bool = False,
                         defaults: dict | None = None) -> LinkedOptunaSearch:
    """The searcher of an Optuna sweep: persistent in ``storage_url`` (an RDB URL) when given;
    ``metric`` at step ``steps`` is each trial's objective; ``defaults``: the variant's own
    knob values, evaluated as the study's first trial (Optuna's enqueued trial), so that the
    best trial is compared with what the variant does untuned. Optuna's INFO lines ("A new
    study created in RDB ...") only with ``verbose``: the sweep prints the study's command."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)

    first = {"points_to_evaluate": [dict(defaults)]} if defaults else {}
    if storage_url:
        return LinkedOptunaSearch(metric=metric, mode=mode, seed=seed, storage=optuna.storages.RDBStorage(storage_url),
                                  study_name=study_name, link_runs=True, steps=steps, **first)
    return LinkedOptunaSearch(metric=metric, mode=mode, seed=seed, steps=steps, **first)


def print_best_knobs(plan: SweepPlan, data, client) -> None:
    """An Optuna sweep's best trial, like with like (validated at the last step): its knobs,
    its value against the variant's defaults (the study's first trial), whether the spread of
    the trial values stands out of the seed noise, the command that confirms the winner over
    seeds; its MLflow run is tagged."""
    from pact_ray.cli import project_command
    from pact_ray.tracking.tags import OPTUNA_BEST_TAG
    from pact_ray.tune.plan import sweep_script

    metric, steps = verdict_metric(plan), plan.configs[0][1].steps
    curves = data.curves_of(metric)
    value = {r["run_id"]: dict(curves.get(r["run_id"], [])).get(steps) for r in data.rows if r["status"] == "finished"}
    scored = [r for r in data.rows if value.get(r["run_id"]) is not None]
    command = optuna_dashboard_command(plan)
    if not scored:
        print(f"Optuna: no trial reported {metric} at step {steps}.")
        if command:
            print(f"Optuna study: {command}")
        return
    mode = M.metric_mode(metric)
    best = (min if mode == "min" else max)(scored, key=lambda r: value[r["run_id"]])
    variant = plan.kind.variants[best["variant"]]
    knobs = [k for k in variant.knobs if k in data.params[best["run_id"]] and k not in plan.base]
    chosen = {k: data.params[best["run_id"]][k] for k in knobs}
    shown = ", ".join(f"{k}={float(v):.4g}" for k, v in chosen.items())
    stopped = len(data.rows) - len(scored)
    print(f"Optuna best of {len(scored)} trial{'s' * (len(scored) != 1)} at step {steps}"
          f"{f' ({stopped} stopped early or failed)' if stopped else ''}: {shown} -> {metric} {value[best['run_id']]:.6g}")
    defaults = {k: str(v) for k, v in plan.configs[0][1].flat().items() if k in knobs}
    first = next((r for r in scored if all(_same(data.params[r["run_id"]].get(k), v) for k, v in defaults.items())), None)
    values = [value[r["run_id"]] for r in scored]
    spread = max(values) - min(values)
    if first is not None and first is not best:
        gap = value[best["run_id"]] - value[first["run_id"]]
        pct = f" ({100 * gap / abs(value[first['run_id']]):+.2g} %)" if value[first["run_id"]] else ""
        print(f"  vs the variant's defaults (the first trial): {metric} {value[first['run_id']]:.6g}, Δ {gap:+.3g}{pct}")
    elif first is best:
        print("  the variant's defaults (the first trial) are the best trial: tuning found nothing better")
    noise = _seed_noise(plan, metric, steps)
    if noise is None:
        print(f"  the trial values span {spread:.3g}; every trial ran one seed, and no sweep in this store measured the seed "
              "noise of this setting, so the spread may be noise")
    elif spread <= 2 * noise:
        print(f"  the trial values span {spread:.3g}, within the seed noise (2 x {noise:.2g}, the seed-to-seed spread of "
              "this setting's runs): the objective is flat here, and the best trial is no evidence")
    else:
        print(f"  the trial values span {spread:.3g}, more than the seed noise (2 x {noise:.2g})")
    # Against the baseline where the kind has one (the world model compares MAE with GPT in its own summary).
    against = f"baseline,{best['variant']}" if "baseline" in plan.kind.variants else best["variant"]
    sets = [w for k, v in chosen.items() for w in ("--set", f"{k}={v}")]
    confirm = project_command(sweep_script(plan.kind), "--profile", plan.args.profile, "--model", plan.args.model,
                              "--variants", against, "--seeds", "0,1,2", *sets)
    print(f"  confirm it {'against the baseline ' if ',' in against else ''}over seeds: {confirm}")
    with contextlib.suppress(Exception):  # a store that is away must not hide the summary
        client.set_tag(best["mlflow_run_id"], OPTUNA_BEST_TAG, "true")
    if command:
        print(f"Optuna study: {command}")


def _same(a: str | None, b: str) -> bool:
    """Two parameter values as MLflow stores them (strings), numerically where both are numbers."""
    try:
        return a is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    except ValueError:
        return a == b


def _seed_noise(plan: SweepPlan, metric: str, steps: int) -> float | None:
    """The seed-to-seed standard deviation of ``metric`` at ``steps`` in this setting (kind,
    profile, model), from the grid sweeps of this tracking store that ran a configuration over
    several seeds (the largest such spread); None when none did."""
    import statistics

    from pact_ray.report.summary import collect

    try:
        data = collect(plan.tracking_uri, [plan.kind.experiment], metrics=[metric])
    except Exception:  # noqa: BLE001  (the store answered a moment ago; without it there is simply no estimate)
        return None
    curves = data.curves_of(metric)
    groups: dict[tuple, list[float]] = {}
    for r in data.rows:
        config = tuple(sorted((k, v) for k, v in data.params.get(r["run_id"], {}).items() if k != "seed"))
        at = dict(curves.get(r["run_id"], [])).get(steps)
        if r["status"] == "finished" and at is not None and r["profile"] == plan.args.profile and r["model"] == plan.args.model:
            groups.setdefault(config, []).append(at)
    spreads = [statistics.stdev(v) for v in groups.values() if len(v) >= 2]
    return max(spreads) if spreads else None
