"""``make bench-memory``: resident memory across the trials of one sweep.

Keras Tuner users report TensorFlow keeping memory from trial to trial (keras-tuner #395, #873:
about 1 GB per 20 trials). This runs N full-model trials (fine-tuning EfficientNet-Lite0, so every
trial builds, trains and drops a whole network) on a flower_photos subset and prints the sweep
process's resident memory after each trial, and the trial's own (``rss_mb``, logged when it ends,
in a fresh process unless ``--trial-process same``), then
``growth_mb=<after trial N - after trial 2> trials=<N> trial_process=<mode> seconds=<wall time>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.bench import DEFAULT_DATA, subset  # noqa: E402
from sweeps.config import TRIAL_PROCESSES  # noqa: E402
from tracking import layout  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="flower_photos folder")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--trial-process", choices=TRIAL_PROCESSES, default="auto",
                        help="auto runs these fine-tuning trials each in a fresh process; same: all in this one")
    args = parser.parse_args(argv)
    if not Path(args.data, "daisy").is_dir():
        print(f"error: no flower_photos at {args.data}; pass --data /path/to/flower_photos", file=sys.stderr)
        return 2

    from mlflow.tracking import MlflowClient

    from sweeps.run import run_sweep
    from sweeps.trial import resident_mb
    from sweeps.tuner import TransferTuner

    memory: list[tuple[str, float]] = []  # (trial, the sweep process's resident MB once the trial was cleaned up)
    on_trial_end = TransferTuner.on_trial_end

    def measured(self: TransferTuner, trial) -> None:  # a Keras Tuner hook, after run_trial freed the trial
        on_trial_end(self, trial)
        memory.append((trial.trial_id, resident_mb()))

    TransferTuner.on_trial_end = measured

    with tempfile.TemporaryDirectory(prefix="tlsweep-memory-") as tmp:
        work = Path(tmp)
        dataset = str(subset(Path(args.data), work / "flowers", args.per_class))
        (work / "memory.yaml").write_text(
            f"tuner: random\nmax_trials: {args.trials}\nseed: 0\nlog_models: improving\nspace:\n"
            "  backbone: {fixed: efficientnet_lite0}\n"
            f"  image_size: {{fixed: {args.image_size}}}\n  batch_size: {{fixed: 16}}\n"
            "  epochs: {fixed: 1}\n  fine_tune: {fixed: true}\n  fine_tune_epochs: {fixed: 1}\n"
            "  fine_tune_at: {choice: [0.5, 0.75, 0.9]}\n"
            "  dropout: {float: [0.0, 0.5], step: 0.1}\n"
            "  learning_rate: {float: [1.0e-4, 1.0e-2], sampling: log}\n")
        os.environ["TLSWEEP_CACHE"] = str(work / "cache")
        start = time.perf_counter()
        parent = run_sweep(dataset, sweep=str(work / "memory.yaml"), experiment="memory", state_dir=str(work / "state"),
                           tracking_uri=f"sqlite:///{work / 'mlflow.db'}", verbose=0, progress=True,
                           trial_process=args.trial_process)
        seconds = time.perf_counter() - start
        client = MlflowClient()
        trial_mb = {r.data.tags[layout.TRIAL_ID]: r.data.metrics.get(layout.RSS_MB) for r in client.search_runs(
            [client.get_run(parent).info.experiment_id], f"tags.`{layout.PARENT_RUN_ID}` = '{parent}'")}
    for i, (trial, mb) in enumerate(memory, 1):
        own = trial_mb.get(trial)
        print(f"after trial {i} ({trial}): sweep process {mb:.0f} MB resident; the trial's process "
              + (f"{own:.0f} MB" if own is not None else "-"))
    if len(memory) < 2:
        print("error: fewer than 2 trials ran", file=sys.stderr)
        return 1
    growth = memory[-1][1] - memory[1][1]
    peak = max(mb for _, mb in memory[1:]) - memory[1][1]
    print(f"growth from trial 2 to trial {len(memory)}: {growth:+.0f} MB (largest above trial 2: {peak:+.0f} MB)")
    print(f"growth_mb={growth:.0f} trials={len(memory)} trial_process={args.trial_process} seconds={seconds:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
