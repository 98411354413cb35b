"""The Ray Tune function trainables, one per run kind of :data:`pact_ray.kinds.RUN_KINDS`
(thin: the body is ``trial.run_trial``).

Ray pickles a trainable by reference (module and name), so each is a module-level function
here, ``train_<kind>``, made from the registry; every worker imports this module. It is
torch-free, and so is the driver that hands them to Tune: ``trial`` (torch) is imported by
the trial itself, in the worker.
"""

from __future__ import annotations

from typing import Callable

from pact_ray.kinds import RUN_KINDS, RunKind


def _trainable(kind: RunKind) -> Callable[[dict], None]:
    def train(config: dict) -> None:
        from pact_ray.tune.trial import run_trial

        run_trial(kind, config)

    train.__name__ = train.__qualname__ = f"train_{kind.name}"
    train.__module__ = __name__
    train.__doc__ = f"One {kind.title} trial: ``config`` holds variant, profile, model, seed and overrides."
    return train


TRAINABLES: dict[str, Callable[[dict], None]] = {name: _trainable(kind) for name, kind in RUN_KINDS.items()}
globals().update({fn.__name__: fn for fn in TRAINABLES.values()})  # importable by name: how Ray pickles them


def trainable_of(kind: RunKind) -> Callable[[dict], None]:
    return TRAINABLES[kind.name]
