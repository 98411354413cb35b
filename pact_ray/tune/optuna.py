"""Optuna through Ray Tune, with the study readable by optuna-dashboard: the objective named
after the metric it is (not "Objective 0"), and every Optuna trial marked with its Ray trial
id, which the MLflow callback turns into the trial's MLflow run id (a user attribute) and
the run's Optuna trial number (a tag)."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

from pact_ray.tracking.callback import RAY_TRIAL_ATTR


class LinkedOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, naming the study's objective and marking each trial with its Ray trial id."""

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        trial = self._ot_trials.get(trial_id)
        if trial is not None:
            trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
            if self._ot_study.metric_names is None:
                self._ot_study.set_metric_names([self._metric])
        return config


def linked_optuna_search(metric: str, mode: str, seed: int, storage_url: str | None, study_name: str) -> LinkedOptunaSearch:
    """The searcher of an Optuna sweep: persistent in ``storage_url`` (an RDB URL) when given."""
    import optuna

    if storage_url:
        return LinkedOptunaSearch(metric=metric, mode=mode, seed=seed, storage=optuna.storages.RDBStorage(storage_url),
                                  study_name=study_name)
    return LinkedOptunaSearch(metric=metric, mode=mode, seed=seed)
