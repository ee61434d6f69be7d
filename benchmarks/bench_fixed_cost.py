"""``make bench-fixed-cost``: a trial's fixed cost, its wall time minus the time in its training steps.

On flower_photos at 224 px with efficientnet_lite0, as a sweep runs them (``sweeps.trial``):

- a head trial in the sweep's own process (``trial.run`` with the sweep's decoded-data cache);
- a fine-tuning trial in a fresh process (``trial.run_fresh``: start Python and TensorFlow, map the data,
  build, train, evaluate, journal).

Each kind runs once to warm the shared caches (decoded images, frozen features, activations at the cut: a
sweep builds each once), then ``--repeats`` times measured. The wall time is taken around the call, on the
sweep's side; the training steps are the trial's own ``head_seconds + fine_tune_seconds`` (Keras ``fit``,
validation included) from its journal entry. Everything else, test evaluation included, counts as fixed
cost. ``--log-models`` is the sweep's setting (``best``: no SavedModel per trial; with ``improving`` the
measured trials do not improve, so do not export). Last line: ``fixed_cost_head_s=<s> fixed_cost_finetune_s=<s>``
(medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flower_photos"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fine-tune-epochs", type=int, default=1)
    parser.add_argument("--log-models", default="best", choices=("best", "improving"))
    parser.add_argument("--kinds", default="head,finetune")
    args = parser.parse_args(argv)

    from pipeline.hparams import RunConfig
    from sweeps import trial as trials
    from tracking import layout
    from tracking.entry import ENTRY

    kinds = args.kinds.split(",")
    configs = {
        "head": RunConfig(image_size=args.image_size, epochs=args.epochs, fine_tune=False),
        "finetune": RunConfig(image_size=args.image_size, epochs=args.epochs, fine_tune_epochs=args.fine_tune_epochs,
                              fine_tune_at=0.75),
    }
    data_cache: dict = {}
    costs: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "journal"

        def once(kind: str, n: int) -> tuple[float, float, dict[str, float]]:
            spec = trials.TrialSpec(
                run=configs[kind], dataset=args.data, split=None, log_models=args.log_models, verbose=0,
                trial_dir=str(Path(tmp) / f"{kind}{n}"), export_metadata={}, run_spec={}, params={},
                journal=str(journal), best=1.0, checkpoint=args.log_models == "best")
            Path(spec.trial_dir).mkdir(parents=True)
            before = set(journal.iterdir()) if journal.exists() else set()
            start = time.perf_counter()
            if kind == "head":
                trials.run(spec, data_cache)
            else:
                trials.run_fresh(spec)
            wall = time.perf_counter() - start
            (entry,) = set(journal.iterdir()) - before
            metrics = {k: v for k, v, _ in json.loads((entry / ENTRY).read_text())["metrics"] if _ == 0}
            steps = metrics[layout.HEAD_SECONDS] + metrics[layout.FINE_TUNE_SECONDS]
            return wall, steps, metrics

        for kind in kinds:
            for n in range(args.repeats + 1):
                wall, steps, m = once(kind, n)
                label = "warm-up" if n == 0 else f"run {n}"
                print(f"[{kind} {label}] wall {wall:.2f} s, training steps {steps:.2f} s, fixed {wall - steps:.2f} s "
                      f"(trial's own {layout.WALL_SECONDS} {m[layout.WALL_SECONDS]:.2f}, {layout.TRAIN_SECONDS} "
                      f"{m[layout.TRAIN_SECONDS]:.2f}, {layout.FEATURE_SECONDS} {m[layout.FEATURE_SECONDS]:.2f})", flush=True)
                if n:
                    costs[kind].append(wall - steps)
    line = " ".join(f"fixed_cost_{k}_s={statistics.median(v):.2f}" for k, v in costs.items())
    print(line)
    return 0


def measure(data: Path, image_size: int = 224, repeats: int = 1) -> dict[str, float]:
    """``fixed_cost_head_s`` and ``fixed_cost_finetune_s`` (medians) as ``main`` prints them (for ``make bench``)."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--data", str(data), "--image-size", str(image_size), "--repeats", str(repeats)])
    print(printed.getvalue(), end="", flush=True)
    last = printed.getvalue().strip().splitlines()[-1]
    return {k: float(v) for k, v in (pair.split("=") for pair in last.split())}


if __name__ == "__main__":
    raise SystemExit(main())
