"""The Ray Tune layer. A sweep command (``sweep.py``: the order of the steps) reads its flags
(``flags.py``) into a checked, pure plan (``plan.py``); prepares the MLflow store, the sweep's
folder and manifest (``manifest.py``, on a local folder or an object store: ``storage.py``)
and its parent run while Ray starts (``prepare.py``); builds the Tuner and fits it
(``launch.py``), with Optuna (``optuna.py``) or adaptive seeds (``adaptive.py``) as
searchers, Ctrl-C handling (``interrupt.py``), progress lines (``progress.py``) and Ray's state
kept readable (``state.py``); then writes the summary and exits (``finish.py``). Each trial
runs ``trial.py`` through the function trainables of ``trainables.py``. One driver runs a
sweep at a time: it holds a lease beside the sweep's folder (``lease.py``, on a folder or an
object store: ``lease_stores.py``). Ray's private internals are used in ``fast_start.py``
only, guarded by Ray's version. Everything below this layer (configs, trainers, models,
checkpoint I/O) runs without Ray.
"""
