"""Ray Tune function trainable of the OT matrix: each trial is a Stage1 or a Stage2 trial."""

from pact_ray.tune_trial import run_trial


def train_matrix(config: dict) -> None:
    """One matrix trial: ``config["variant"]`` names a cell "<kind>_<variant>" (runkinds.MATRIX_CELLS)."""
    run_trial("matrix", config)
