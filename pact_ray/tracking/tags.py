"""The MLflow tag names pact-ray writes and searches by, defined once."""

TAG_PREFIX = "pact_ray."
TRIAL_TAG = TAG_PREFIX + "trial_id"  # a trial run's Ray trial id (how a resumed sweep finds its runs)
ROLE_TAG = TAG_PREFIX + "role"  # "sweep" (the parent run) or "trial"
SWEEP_UID_TAG = TAG_PREFIX + "sweep_uid"  # the parent run's copy of its manifest's "uid" (finds it when the manifest missed its id)
SWEEP_TAG = TAG_PREFIX + "sweep_run_id"  # a trial run's parent run id
STEP_TAG = TAG_PREFIX + "step"  # a trial run's last logged step
CHECKPOINT_TAG = TAG_PREFIX + "checkpoint"  # a trial run's newest checkpoint (path or URI)
RESUME_NOTE_TAG = TAG_PREFIX + "resume_note"  # set when a resume skipped an unreadable checkpoint for an older one
OPTUNA_TRIAL_TAG = TAG_PREFIX + "optuna_trial"  # the Optuna trial number of an Optuna sweep's run
OPTUNA_STATE_TAG = TAG_PREFIX + "optuna_state"  # the Optuna trial's end state: complete, pruned (stopped early) or fail
OPTUNA_BEST_TAG = TAG_PREFIX + "optuna_best"  # "true" on the run of an Optuna sweep's best trial (at the last step)
SWEEP_NAME_TAG = "sweep"  # the sweep's name, on the parent and every child run
