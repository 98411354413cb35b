"""How the report groups and names runs, from the run-kind registry (``pact_ray.kinds``).

Runs compare within a *setting*: the same kind, profile and model preset. Within a
setting, the runs of one variant are seeds of one configuration, unless some config
param other than the seed varies between them (an Optuna sweep over a variant's knobs):
then each distinct value set is its own configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Mapping, TypeVar

from pact_ray.kinds import RUN_KINDS
from pact_ray.metrics import names as M
from pact_ray.report.summary import FINISHED, SummaryData, profile_label

BASELINE = "baseline"  # the reference variant of every kind
STAGE1, STAGE2 = "stage1", "stage2"  # the kinds with plots of their own (summary.md)
SEED_PARAMS = frozenset({"seed"})  # params whose values are repeats, not configurations

Row = dict[str, Any]
Setting = tuple[str, str, str]  # (kind, profile, model)
K = TypeVar("K", bound=Hashable)


def setting_label(setting: Setting) -> str:
    """"Matrix · small" for the quick profile on the small preset."""
    kind, profile, model = setting
    return f"{profile_label(kind, profile)} · {model}"


def objective(kind: str) -> tuple[str, str]:
    """(metric, mode) that compares runs of ``kind``: the kind's held-out validation metric
    (val_loss when the kind is unknown), lower is better for mode "min"."""
    k = RUN_KINDS.get(kind)
    return (k.val_metric, k.val_mode) if k else (M.VAL_LOSS, "min")


def router_on(row: Row) -> bool:
    """Whether the run's variant patches the OT router in (an OT diagnostic run)."""
    k = RUN_KINDS.get(row["kind"])
    v = k.variants.get(row["variant"]) if k else None
    return v is not None and v.router is not None


def setting_of(row: Row) -> Setting:
    return (row["kind"], row["profile"], row["model"] or "")


def group_by(rows: Iterable[Row], key: Callable[[Row], K]) -> dict[K, list[Row]]:
    """Rows grouped by ``key``, groups in first-seen order (rows come in registry order)."""
    out: dict[K, list[Row]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def finished_with(rows: Iterable[Row], metric: str) -> list[Row]:
    """Finished runs that reported ``metric``."""
    return [r for r in rows if r["status"] == FINISHED and r.get(metric) is not None]


def varying_params(params: Iterable[Mapping[str, str]]) -> list[str]:
    """Config params (other than the seed) whose value differs between the given runs."""
    params = list(params)
    keys = sorted({k for p in params for k in p} - SEED_PARAMS)
    return [k for k in keys if len({p.get(k) for p in params}) > 1]


def knob_values(data: SummaryData, row: Row, knobs: Iterable[str]) -> dict[str, str]:
    """The run's logged values of ``knobs`` (empty where it lacks one)."""
    params = data.params.get(row["run_id"], {})
    return {k: params.get(k, "") for k in knobs}


def knob_text(knobs: Mapping[str, str]) -> str:
    """"eps=0.0312, strength=1.2": config values in a label (``router.`` prefix dropped)."""
    return ", ".join(f"{k.removeprefix('router.')}={_short(v)}" for k, v in knobs.items())


def _short(value: str) -> str:
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


@dataclass(frozen=True)
class VariantRuns:
    """Every run of one variant in one setting."""

    setting: Setting
    variant: str
    rows: list[Row]
    finished: list[Row]  # finished runs
    knobs: list[str]  # config params that vary between the finished runs (empty: seeds of one configuration)

    @property
    def unfinished(self) -> int:
        return sum(r["status"] != FINISHED for r in self.rows)


def variant_runs(data: SummaryData) -> list[VariantRuns]:
    """The runs of each (setting, variant), in registry order."""
    out = []
    for (setting, variant), rows in group_by(data.rows, lambda r: (setting_of(r), r["variant"])).items():
        done = [r for r in rows if r["status"] == FINISHED]
        knobs = varying_params(data.params.get(r["run_id"], {}) for r in done)
        out.append(VariantRuns(setting, variant, rows, done, knobs))
    return out
