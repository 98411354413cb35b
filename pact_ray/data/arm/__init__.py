"""The SO-100-style robot arm of the world model: ``strip`` (joints, the motor strip, action
ids), ``lerobot`` (LeRobot-style folders), ``synthetic`` (rendered episodes, the cached data
sets) and ``dataset`` (the model's samples and the train/validation split)."""
