"""After Tune's fit: the tracking writes sent, the sweep's summary (its kind's own, through
:attr:`pact_ray.kinds.RunKind.summarize`) written, logged to the parent run and printed, and
the exit status. Also what a resume replays into MLflow, and how a failed fit is explained.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pact_ray.errors import first_line
from pact_ray.tune.plan import SweepPlan, optuna_dashboard_command, resume_command
from pact_ray.tune.storage import staged_folder

EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C; 143 after a SIGTERM (128 + the signal): "resume me"
EXIT_UNSENT = 3  # trained, but some tracking writes did not reach the store
EXIT_DISK_FULL = 4  # the storage filled up; --resume finishes once there is space
FULL_BELOW_BYTES = 1 << 20
FLUSH_TIMEOUT_S = float(os.environ.get("PACT_RAY_FLUSH_TIMEOUT_S", "60"))  # waiting for an absent tracking store at the end


def finish(plan: SweepPlan, client, experiment_id: str, parent_id: str, results, interrupted: int | None, unsent: int,
           stop_ray: Callable[[], None] | None, t0: float) -> int:
    """Summarise a fitted sweep and return its exit status. Stopping a local Ray (``stop_ray``)
    takes 0.4 s of waiting on its processes; the summary, which reads only MLflow, is written
    meanwhile, and nothing is printed before it is done (so nothing of Ray's follows it).
    ``interrupted``: the signal that stopped the sweep (None: it ran to its end)."""
    from pact_ray.report.sweep_summary import SummaryRequest
    from pact_ray.tracking.store import ui_command
    from pact_ray.tracking.sweep_run import finish_parent
    from pact_ray.tune.optuna import print_best_knobs

    kind, args = plan.kind, plan.args
    with in_background(stop_ray) as ray_stopped:
        if unsent:  # the summary reads the tracking store, which is not answering: --resume makes it
            ray_stopped()
            errored = sum(r.error is not None for r in results)
            print(f"\nSweep {plan.name}: {len(results) - errored}/{len(results)} trials ended without error, {time.time() - t0:.0f} s; "
                  f"the summary waits for the tracking store.")
            print(f"Ray results:  {plan.exp_dir}")
            print(f"{unsent} tracking write(s) did not reach {plan.tracking_uri}; Ray's result files keep them. Once the store "
                  f"answers, run: {resume_command(plan)} (nothing trains again)")
            return EXIT_UNSENT

        optuna = optuna_dashboard_command(plan)
        summary = kind.summarize(SummaryRequest(plan.tracking_uri, experiment_id, parent_id, storage=plan.storage,
                                                design=plan.design, metrics=plan.metrics, optuna=optuna))
        if interrupted and results.num_errors == 0:
            interrupted = None  # the signal came as the last trials ended (a stopped trial ends in error): nothing to resume
        files = write_summary(plan, client, parent_id, summary.write)
        ray_stopped()
        print_header(plan, summary.rows, time.time() - t0)
        summary.show()
        if args.search == "optuna" and summary.data is not None:
            print_best_knobs(plan, summary.data, client)
        elif optuna:
            print(f"Optuna study: {optuna}")
        finish_parent(client, parent_id, description=summary.description, metrics=summary.headline,
                      status="KILLED" if interrupted else "FINISHED")
        print_footer(plan, files, ui_command(plan.tracking_uri, experiment_id, plan.name))
        if interrupted:
            print(f"Interrupted: the unfinished trials saved a checkpoint. Continue with: {resume_command(plan)}")
            return 128 + interrupted
        if results.num_errors:
            return 1
        mark_finished(plan)
        return 0


def mark_finished(plan: SweepPlan) -> None:
    """Record in the manifest that the sweep ran every trial to its end and wrote its summary:
    ``--resume auto`` then has nothing to do."""
    from pact_ray.tune.manifest import load_manifest, write_manifest

    manifest = load_manifest(plan.store) or {}
    write_manifest(plan.store, {**manifest, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})


@contextlib.contextmanager
def in_background(work: Callable[[], Any] | None):
    """Run ``work`` in a thread; yields a function that waits for it (also on leaving)."""
    import threading

    thread = threading.Thread(target=work, name="pact-ray-background", daemon=True) if work else None
    if thread:
        thread.start()

    def wait() -> None:
        if thread:
            thread.join()

    try:
        yield wait
    finally:
        wait()


def storage_full(plan: SweepPlan, error: BaseException) -> bool:
    """Whether ``error`` came from the storage filling up: ENOSPC somewhere in its chain, or a
    local storage with less than 1 MiB left (Ray then fails reading the files it truncated)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return plan.local_dir is not None and shutil.disk_usage(plan.storage).free < FULL_BELOW_BYTES


def write_summary(plan: SweepPlan, client, parent_run_id: str, write: Callable[[Path], list[Path]]) -> list[str]:
    """``write(folder)`` the summary files, put them at ``plan.summary_dir`` (a folder or an object
    store) and log them as the parent run's ``summary/`` artifacts; returns where the files
    other than the plots are."""
    from pact_ray.tracking.sweep_run import SUMMARY_ARTIFACTS

    with staged_folder(plan.summary_dir) as (folder, where):
        files = write(folder)
        for f in files:
            client.log_artifact(parent_run_id, str(f), SUMMARY_ARTIFACTS)
    return [where(f) for f in files if f.suffix != ".png"]


def root_cause(error: BaseException) -> str:
    """"Type: first line" of the innermost exception behind ``error`` (Tune wraps what it caught
    in a TuneError whose text starts with a traceback)."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        error = inner
        seen.add(id(error))
    return f"{type(error).__name__}: {first_line(error)}"


def flush_tracking(plan: SweepPlan) -> int:
    """Send what the writer still holds, waiting at most FLUSH_TIMEOUT_S; returns the writes left unsent."""
    from pact_ray.tracking.writer import close_shared, pending_writes

    if not close_shared(plan.tracking_uri, timeout=2.0, keep_open=True):
        print(f"Waiting up to {FLUSH_TIMEOUT_S:.0f} s for the tracking store {plan.tracking_uri} to take "
              f"{pending_writes(plan.tracking_uri)} pending write(s)...", flush=True)
    if close_shared(plan.tracking_uri, timeout=FLUSH_TIMEOUT_S):
        return 0
    return max(1, pending_writes(plan.tracking_uri, closed=True))


def replay_results(exp_dir: Path, callback) -> None:
    """Give the tracking store every step Ray's result files hold (steps it has are skipped),
    and the final status of the trials Ray finished."""
    from pact_ray.report.ablation.ray_results import (
        read_json,
        read_results,
        trial_states,
    )

    states = trial_states(exp_dir)
    for folder in sorted(p for p in exp_dir.iterdir() if (p / "params.json").is_file()):
        try:
            config = read_json(folder / "params.json")
        except ValueError:  # cut short (a full disk): Tune reruns the trial from its state
            continue
        results = read_results(folder / "result.json")
        state = states.get(folder.name)
        if results or state is not None:
            trial_id = state.trial_id if state else str(results[-1].get("trial_id", folder.name))
            callback.replay(trial_id, config, results, finished=bool(state and state.status == "TERMINATED"))


def print_header(plan: SweepPlan, rows: list[dict], wall: float) -> None:
    count = {s: sum(r["status"] == s for r in rows) for s in ("finished", "errored", "interrupted")}
    stopped = f", {count['interrupted']} interrupted" if count["interrupted"] else ""
    print()
    print(f"Sweep {plan.name}: {count['finished']}/{len(rows)} trials finished, {count['errored']} errored{stopped}, {wall:.0f} s")
    for r in rows:
        if r["status"] == "errored":
            print(f"  errored: {r['run']}: {r['error']}")


def print_footer(plan: SweepPlan, files: list[str], ui: str) -> None:
    print(f"Ray results:  {plan.exp_dir}")
    print(f"MLflow:       {plan.tracking_uri}  (experiment {plan.kind.experiment})")
    for f in files:
        print(f"Summary:      {f}")
    command, _, then = ui.partition(", then ")
    env, space, rest = command.partition(" ")
    if space and "=" in env and rest.split(" ", 2)[1:2] == ["ui"]:
        # The environment and the store on lines of their own, continued: one command to paste.
        server, store, uri = rest.partition(" --backend-store-uri ")
        lines = [env, server, f"--backend-store-uri {uri}"] if store else [env, rest]
        print("Open the UI:  " + " \\\n                ".join(lines))
    else:
        print(f"Open the UI:  {command}")
    if then:
        print(f"              then {then.replace('open ', 'open the runs of this sweep: ', 1)}")
