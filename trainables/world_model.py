"""Ray Tune function trainable of the world-model comparison (MAE vs GPT)."""

from pact_ray.tune_trial import run_trial


def train_world_model(config: dict) -> None:
    """One world-model trial: ``config`` holds variant, profile, model, seed and overrides."""
    run_trial("world_model", config)
