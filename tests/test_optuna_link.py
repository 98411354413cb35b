"""The link between an Optuna trial and its MLflow run, when the run is created late.

The MLflow writer is a queue: a short trial can end (and the searcher tell the study) before
the writer has created its run. Optuna refuses to change a finished trial, so the searcher
itself writes the run id into the trial before telling the study, waiting for the run first.
"""

from __future__ import annotations

import logging
import threading

import optuna
import pytest
from ray import tune

from pact_ray.tracking import callback as cb
from pact_ray.tracking.writer import RunRef
from pact_ray.tune.optuna import linked_optuna_search


@pytest.fixture
def searcher(tmp_path):
    s = linked_optuna_search("val_loss", "min", 0, f"sqlite:///{tmp_path / 'optuna.db'}", "study")
    s.set_search_properties("val_loss", "min", {"eps": tune.uniform(0.01, 0.1)})
    return s


def _register(trial_id: str) -> RunRef:
    ref = RunRef(experiment_id="0", name="rgb_edge s0", key_tags={})
    cb._OPTUNA_RUNS[("study", trial_id)] = ref
    return ref


@pytest.fixture
def marked(monkeypatch):
    """The Optuna end states the searcher tags runs with, by run id (instead of the writer)."""
    states: dict[str, str] = {}
    monkeypatch.setattr("pact_ray.tune.optuna.mark_optuna_state", lambda sweep, ref, state: states.__setitem__(ref.run_id, state))
    monkeypatch.setitem(cb._OPTUNA_STORES, "study", "sqlite:////nowhere/mlflow.db")
    return states


def test_a_trial_whose_run_is_created_after_it_ended_is_still_linked(searcher, marked):
    searcher.suggest("t1")
    ref = _register("t1")

    def create_late():  # the writer reaches the run only now
        ref.run_id = "run-abc"
        ref.resolved.set()

    threading.Timer(0.3, create_late).start()
    searcher.on_trial_complete("t1", {"val_loss": 0.5})
    [trial] = searcher._ot_study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.5
    url = "http://127.0.0.1:5000/#/experiments/0/runs/run-abc"  # the run's page in the `mlflow ui` the sweep prints
    assert trial.user_attrs == {"ray_trial_id": "t1", "mlflow_run_id": "run-abc", "mlflow_run_url": url}
    assert ("study", "t1") not in cb._OPTUNA_RUNS  # asked once, then forgotten
    assert marked == {"run-abc": "complete"}
    # The study names its sweep and metric, and links the sweep's runs (filtered to its tag).
    attrs = searcher._ot_study.user_attrs
    assert attrs["sweep"] == "study" and attrs["metric"] == "val_loss" and attrs["mode"] == "min"
    assert attrs["mlflow_runs_url"] == "http://127.0.0.1:5000/#/experiments/0/runs?searchFilter=tags.sweep+%3D+%27study%27"
    # optuna-dashboard's notes: the study's names the sweep and metric, the trial's links its run.
    from optuna_dashboard._note import get_note_from_system_attrs

    system = searcher._ot_study._storage.get_study_system_attrs(searcher._ot_study._study_id)
    study_note = get_note_from_system_attrs(system, None)["body"]
    assert "`study`" in study_note and "val_loss" in study_note and attrs["mlflow_runs_url"] in study_note
    assert f"]({url})" in get_note_from_system_attrs(system, trial._trial_id)["body"]


def test_a_trial_stopped_before_the_objective_step_is_pruned_and_its_run_says_so(tmp_path, marked):
    s = linked_optuna_search("val_loss", "min", 0, f"sqlite:///{tmp_path / 'optuna.db'}", "study", steps=3)
    s.set_search_properties("val_loss", "min", {"eps": tune.uniform(0.01, 0.1)})
    for trial_id, step in (("early", 1), ("whole", 3)):
        s.suggest(trial_id)
        ref = _register(trial_id)
        ref.run_id = f"run-{trial_id}"
        ref.resolved.set()
        s.on_trial_complete(trial_id, {"val_loss": 0.5, "step": step})
    states = {t.user_attrs["mlflow_run_id"]: t.state for t in s._ot_study.trials}
    assert states == {"run-early": optuna.trial.TrialState.PRUNED, "run-whole": optuna.trial.TrialState.COMPLETE}
    assert marked == {"run-early": "pruned", "run-whole": "complete"}


def test_a_store_that_never_creates_the_run_leaves_the_trial_told_and_says_so(searcher, monkeypatch, caplog):
    monkeypatch.setattr("pact_ray.tune.optuna.LINK_WAIT_S", 0.2)
    searcher.suggest("t2")
    _register("t2")
    with caplog.at_level(logging.WARNING, logger="pact_ray.tracking.callback"):
        searcher.on_trial_complete("t2", {"val_loss": 0.25})
    [trial] = searcher._ot_study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and "mlflow_run_id" not in trial.user_attrs
    assert "t2's Optuna trial is not linked to its MLflow run" in caplog.text


def test_the_run_is_tagged_with_the_trial_number_after_the_trial_finished(searcher, tmp_path):
    searcher.suggest("a")
    searcher.suggest("b")
    searcher.on_trial_complete("a", {"val_loss": 1.0})
    searcher.on_trial_complete("b", {"val_loss": 2.0})  # both finished, neither registered: no wait, no link

    tags: dict[str, str] = {}

    class Client:  # what the writer hands the function: the run's client
        def set_tag(self, run_id, key, value):
            tags[key] = value

        def get_run(self, run_id):
            return type("R", (), {"info": type("I", (), {"run_name": "rgb_edge s0 #b1c2"})})

    cb._tag_optuna_trial(f"sqlite:///{tmp_path / 'optuna.db'}", "study", "b")(Client(), "run-b")
    assert tags == {"pact_ray.optuna_trial": "1", "mlflow.runName": "rgb_edge s0 #1"}
