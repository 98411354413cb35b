"""Reports: the ablation summary table (``summary.py``: one row per trial, from MLflow), the
ablation report over it (``ablation/``: route status, plots, the static page, Ray result
folders, Optuna importance) and the world model's evaluation report (``world_model.py``).
"""
