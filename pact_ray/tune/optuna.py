"""Optuna through Ray Tune, with the study readable by optuna-dashboard: the objective named
after the metric it is (not "Objective 0"), and every Optuna trial linked to its MLflow run
both ways: the run id in the trial's user attributes (set here, before the study is told the
result, since Optuna refuses to change a finished trial) and the trial number as the run's tag
(set by the MLflow callback, from the Ray trial id this searcher marks each trial with)."""

from __future__ import annotations

import warnings

from ray.tune.search.optuna import OptunaSearch

from pact_ray.metrics import names as M
from pact_ray.tracking.callback import MLFLOW_RUN_ATTR, RAY_TRIAL_ATTR, optuna_trial_run_id

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
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # The objective is a held-out metric, present only in the results of evaluation steps
        # (Ray's OptunaSearch reads it from every result and raises a KeyError on the others).
        if self._metric in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        trial = self._ot_trials.get(trial_id)
        if getattr(self, "_link_runs", False) and trial is not None and trial_id not in self._completed_trials:
            run_id = optuna_trial_run_id(self._study_name, trial_id, LINK_WAIT_S)
            if run_id is not None:
                trial.set_user_attr(MLFLOW_RUN_ATTR, run_id)
        steps = getattr(self, "_steps", None)
        if result and steps and result.get(M.STEP) != steps:
            # Stopped early (ASHA): a validation value from an earlier step is not comparable with
            # the others' at the last step. Without a result Optuna records the trial as pruned.
            result = None
        super().on_trial_complete(trial_id, result, error)


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
