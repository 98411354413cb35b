"""The MLflow tag names pact-ray writes and searches by, defined once."""

TAG_PREFIX = "pact_ray."
TRIAL_TAG = TAG_PREFIX + "trial_id"  # a trial run's Ray trial id (how a resumed sweep finds its runs)
ROLE_TAG = TAG_PREFIX + "role"  # "sweep" (the parent run) or "trial"
SWEEP_TAG = TAG_PREFIX + "sweep_run_id"  # a trial run's parent run id
