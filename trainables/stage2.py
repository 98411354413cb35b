"""Ray Tune function trainable of the Stage2 spatial-articulation ablation."""

from pact_ray.tune_trial import run_trial


def train_stage2(config: dict) -> None:
    """One Stage2 trial: ``config`` holds variant, profile, model, seed and overrides."""
    run_trial("stage2", config)
