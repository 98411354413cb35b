"""Ray Tune function trainable of the Stage1 OT-router ablation."""

from pact_ray.tune_trial import run_trial


def train_stage1(config: dict) -> None:
    """One Stage1 trial: ``config`` holds variant, profile, model, seed and overrides."""
    run_trial("stage1", config)
