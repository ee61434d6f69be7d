"""``make bench-fixed-cost``: a trial's fixed cost, its wall time minus the time in its training and evaluation steps.

On flower_photos at 224 px with efficientnet_lite0, as a sweep runs them (``sweeps.trial``):

- a head trial in the sweep's own process (``trial.run`` with the sweep's decoded-data cache);
- a fine-tuning trial in a pool worker (``sweeps.executor.TrialPool``, as a sweep runs it: the worker has started
  Python and TensorFlow and mapped the data; it builds, trains, evaluates, draws and measures), with
  ``log_models: improving`` and not improving on the best so far (it writes no checkpoint and no export: the trial's
  fixed cost without its model; the default ``log_models: all`` exports every trial);
- the same fine-tuning trial keeping its checkpoint (the classifier's weights, ``pipeline.weights``), as a trial
  that improves does and every trial under ``log_models: best``.

Each kind runs once (a pool kind twice) to warm the shared caches (decoded images, frozen features, activations at the cut: a
sweep builds each once), then ``--repeats`` times measured. The wall time is taken around the call, on the
sweep's side; the steps are the trial's own ``step_seconds`` (every training, validation and prediction batch
of its ``fit``, ``evaluate`` and ``predict`` calls, timed by a callback), less ``trace_seconds +
eval_trace_seconds`` (each call's first steps beyond typical ones: tracing is not a step), from its journal
entry. Everything else is fixed cost, printed per trial with where it went (handing the trial to its process;
data, build, weights and caches around the phases; inside ``fit``/``evaluate``/``predict`` between
the steps; cost, checkpoint and journal after; tracing). Last line: ``fixed_cost_head_s=<s> fixed_cost_finetune_s=<s>
fixed_cost_finetune_kept_s=<s>`` (medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tracking import layout  # noqa: E402 - imports nothing heavy

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flower_photos"


CONFIG = {"epochs": 2, "fine_tune_epochs": 1, "fine_tune_at": 0.75}
KINDS = ("head", "finetune", "finetune_kept")


def steps_in(m: dict[str, float]) -> float:
    """Seconds in the training, validation and test steps themselves (every batch of ``fit``, ``evaluate`` and
    ``predict``, from the batch's begin callback to its end callback: Keras fetches the batch inside the step, so
    a step's wait for its input counts as the step), without the first steps' excess over typical ones (tracing
    is not a step). What the Keras calls do outside their steps (setting a phase up, making its pipelines, epoch
    ends, callbacks) is not a step either: it is fixed cost."""
    return m[layout.STEP_SECONDS] - m[layout.TRACE_SECONDS] - m[layout.EVAL_TRACE_SECONDS]


def breakdown(wall: float, m: dict[str, float]) -> str:
    """One line: the wall time, the steps, the fixed cost and where it went (the parts sum to the fixed cost)."""
    steps = steps_in(m)
    in_calls = m[layout.HEAD_SECONDS] + m[layout.FINE_TUNE_SECONDS] + m[layout.EVAL_SECONDS]
    parts = {
        "handing the trial over (sweep's wall minus the trial's own wall_seconds)": wall - m[layout.WALL_SECONDS],
        "before/around the phases (data, build, weights, caches)": m[layout.TRAIN_SECONDS] - in_calls,
        "in the Keras calls outside their steps (phase setup, pipelines made, epoch ends, callbacks)":
            in_calls - m[layout.STEP_SECONDS],
        "after (cost, checkpoint, journal)": m[layout.WALL_SECONDS] - m[layout.TRAIN_SECONDS],
        "first steps' excess (tracing, input pipeline start) in fit": m[layout.TRACE_SECONDS],
        "in test evaluation": m[layout.EVAL_TRACE_SECONDS],
    }
    detail = "; ".join(f"{k} {v:.2f}" for k, v in parts.items())
    return (f"wall {wall:.2f} s, steps {steps:.2f} s (fit {m[layout.HEAD_SECONDS] + m[layout.FINE_TUNE_SECONDS]:.2f}, "
            f"test evaluation {m[layout.EVAL_SECONDS]:.2f}), fixed {wall - steps:.2f} s = {detail} "
            f"({layout.FEATURE_SECONDS} {m[layout.FEATURE_SECONDS]:.2f})")


def measure(data: Path, image_size: int = 224, repeats: int = 1, *, epochs: int = CONFIG["epochs"],
            fine_tune_epochs: int = CONFIG["fine_tune_epochs"], kinds: tuple[str, ...] = KINDS,
            echo: bool = True) -> dict[str, float]:
    """Median fixed cost per kind of trial (``KINDS``) after one warm-up trial of each kind: ``fixed_cost_<kind>_s``
    (``make bench`` calls this with this signature). ``echo`` prints each trial."""
    from pipeline import recipe
    from pipeline.hparams import RunConfig
    from sweeps import trial as trials
    from sweeps.executor import TrialPool

    configs = {
        "head": RunConfig(image_size=image_size, epochs=epochs, fine_tune=False),
        "finetune": RunConfig(image_size=image_size, epochs=epochs, fine_tune_epochs=fine_tune_epochs,
                              fine_tune_at=CONFIG["fine_tune_at"]),
    }
    configs["finetune_kept"] = configs["finetune"]
    unknown = [k for k in kinds if k not in configs]
    if unknown:
        raise SystemExit(f"unknown kinds {', '.join(unknown)}; known: {', '.join(KINDS)}")
    data_cache: dict = {}
    costs: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        pool = TrialPool(str(data), None, Path(tmp) / "hint.json")

        def once(kind: str, n: int) -> tuple[float, float, dict[str, float]]:
            # log_models improving, and a best above any accuracy: the trial does not improve, keeps no model;
            # "_kept": log_models best, it keeps its checkpoint as a trial that improves does
            log_models = "best" if kind.endswith("_kept") else "improving"
            spec = trials.TrialSpec(
                run=configs[kind], dataset=str(data), split=None, log_models=log_models, verbose=0,
                trial_dir=str(Path(tmp) / f"{kind}{n}"), record_dir=str(Path(tmp) / f"{kind}{n}-record"), params={},
                state_dir=tmp, best=2.0)
            Path(spec.trial_dir).mkdir(parents=True)
            start = time.perf_counter()
            result = trials.run(spec, data_cache) if kind == "head" else pool.run(spec)
            wall = time.perf_counter() - start
            wrote = recipe.checkpoint_in(spec.trial_dir).exists()
            if wrote != (log_models == "best"):  # else the two fine-tuning figures would measure the same thing
                raise RuntimeError(f"the {kind} trial {'wrote' if wrote else 'did not write'} a checkpoint")
            metrics = {k: v for k, v, step in result.record.metrics if step == 0}
            return wall, steps_in(metrics), metrics

        try:
            for kind in kinds:
                # a sweep's pool has a worker ready from its third trial on (sweeps.executor): warm it up as far
                warmups = 1 if kind == "head" else 2
                for n in range(repeats + warmups):
                    wall, steps, m = once(kind, n)
                    label = "warm-up" if n < warmups else f"run {n - warmups + 1}"
                    if echo:
                        print(f"[{kind} {label}] {breakdown(wall, m)}", flush=True)
                    if n >= warmups:
                        costs[kind].append(wall - steps)
        finally:
            pool.close()
    return {f"fixed_cost_{k}_s": statistics.median(v) for k, v in costs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=CONFIG["epochs"])
    parser.add_argument("--fine-tune-epochs", type=int, default=CONFIG["fine_tune_epochs"])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"some of {', '.join(KINDS)}")
    args = parser.parse_args(argv)
    result = measure(Path(args.data), args.image_size, args.repeats, epochs=args.epochs,
                     fine_tune_epochs=args.fine_tune_epochs, kinds=tuple(args.kinds.split(",")))
    print(" ".join(f"{k}={v:.2f}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
