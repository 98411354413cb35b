"""The Ray Tune layer: the sweep harness (``sweep.py``), its flags (``flags.py``), the sweep
manifest (``manifest.py``), the body of every trial (``trial.py``) and the function
trainables Ray runs (``trainables.py``). Everything below it (configs, trainers, models,
checkpoint I/O) runs without Ray.
"""
