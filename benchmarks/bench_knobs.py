"""``make bench-knobs``: what each fine-tuning knob does to the default run's accuracy on flower_photos.

Trains the default configuration (``RunConfig()``: what ``make train DATASET=../shared/data/flower_photos`` trains:
EfficientNet-Lite0 at 224 px, 10 head epochs on cached features, 5 fine-tuning epochs from 0.75 at 1e-5, batch 32,
split 75/15/10, seed 42) through the one recipe (``pipeline.recipe``), once as it is and once with each knob:

- ``label_smoothing`` 0.1 (timm's, KerasHub's and Inception-v3's value);
- ``weight_decay`` 0.05 (AdamW in both phases: timm's and ConvNeXt's fine-tuning value; Keras multiplies it by the
  learning rate, as PyTorch does, so 0.05 at 1e-3 shrinks the head's weights 5e-5 a step);
- ``fine_tune_schedule`` cosine (decay to 0 over the fine-tuning phase), and cosine after ``warmup_epochs`` 1;
- all of them at once.

Each run has the same seed: the same split, the same initial head, the same batch order. For each it prints the
validation and test accuracy with 95 % Wilson intervals (``pipeline.stats``) and, against the baseline on the same
images, the images each got right that the other did not and McNemar's exact two-sided p (a paired test: both score
the same images). A difference is within noise when p >= 0.05. The loss beside each accuracy is the plain
cross-entropy of its predicted probabilities (unsmoothed, so runs compare on one scale): it moves where the accuracy
does not. The last line is ``<run>_val=... <run>_val_loss=... <run>_p_val=...`` and the same for ``test``, every run.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flower_photos"
# name -> the knobs it changes from the default configuration
RUNS = {
    "baseline": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "weight_decay": {"weight_decay": 0.05},
    "cosine": {"fine_tune_schedule": "cosine"},
    "warmup_cosine": {"fine_tune_schedule": "cosine", "warmup_epochs": 1.0},
    "all": {"label_smoothing": 0.1, "weight_decay": 0.05, "fine_tune_schedule": "cosine", "warmup_epochs": 1.0},
}


def mcnemar(a_right, b_right) -> tuple[int, int, float]:
    """Images only ``a`` got right, only ``b`` got right, and McNemar's exact two-sided p (the binomial test of the
    discordant pairs: under "no difference" each is a or b with probability 1/2)."""
    only_a = int(sum(x and not y for x, y in zip(a_right, b_right)))
    only_b = int(sum(y and not x for x, y in zip(a_right, b_right)))
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n if n else 1.0
    return only_a, only_b, min(1.0, 2 * tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--runs", default=",".join(RUNS), help=f"which of {', '.join(RUNS)} (baseline always runs)")
    parser.add_argument("--seed", type=int, default=42)
    # For the tests' tiny data only: the measurement is of the default configuration.
    parser.add_argument("--image-size", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--fine-tune-epochs", type=int, default=None)
    parser.add_argument("--fine-tune-at", default=None)
    args = parser.parse_args(argv)

    import dataclasses

    from pipeline import recipe
    from pipeline.hparams import RunConfig
    from pipeline.stats import accuracy_interval
    from pipeline.training import loss_and_accuracy

    names = ["baseline", *[n for n in args.runs.split(",") if n and n != "baseline"]]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; known: {', '.join(RUNS)}")
    overrides = {k: v for k, v in (("image_size", args.image_size), ("epochs", args.epochs),
                                   ("fine_tune_epochs", args.fine_tune_epochs)) if v}
    if args.fine_tune_at is not None:
        overrides["fine_tune_at"] = float(args.fine_tune_at) if "." in args.fine_tune_at else int(args.fine_tune_at)
    base = RunConfig(seed=args.seed, **overrides)
    print(f"configuration: {base}", flush=True)
    data, scores, losses = None, {}, {}
    for name in names:
        plan = recipe.plan(dataclasses.replace(base, **RUNS[name]))
        if data is None:
            data = recipe.load_data_for(plan, args.data, None)
            print(f"data: {data.name}, sizes {data.sizes}", flush=True)
        start = time.perf_counter()
        result = recipe.train_run(plan, data, verbose=0).result
        predictions = {"val": result.val_predictions, "test": result.test_predictions}
        right = {split: probs.argmax(axis=1) == labels for split, (labels, probs) in predictions.items()}
        scores[name] = right
        losses[name] = {split: loss_and_accuracy(*p)[0] for split, p in predictions.items()}
        print(f"[{name}] {RUNS[name] or 'defaults'}: val {right['val'].mean():.4f} test {right['test'].mean():.4f} "
              f"(head on cached features: {result.used_feature_cache}, fine-tuned the top at the cut from layer "
              f"{result.cut_index}; {time.perf_counter() - start:.0f} s)", flush=True)

    print("\n| run | knobs | validation (95 % CI), loss | vs baseline: only base / only run, McNemar p | test (95 % CI), "
          "loss | vs baseline: only base / only run, McNemar p |")
    print("|---|---|---|---|---|---|")
    last = []
    for name in names:
        cells = [name, ", ".join(f"{k} {v}" for k, v in RUNS[name].items()) or "defaults"]
        for split in ("val", "test"):
            right = scores[name][split]
            low, high = accuracy_interval(right.mean(), len(right))
            cells.append(f"{right.mean():.4f} [{low:.3f}, {high:.3f}] (n={len(right)}), loss {losses[name][split]:.4f}")
            if name == "baseline":
                cells.append("")
                continue
            only_base, only_run, p = mcnemar(scores["baseline"][split], right)
            verdict = "within noise" if p >= 0.05 else ("better" if only_run > only_base else "worse")
            cells.append(f"{only_base} / {only_run}, p={p:.2f}: {verdict}")
            last.append(f"{name}_p_{split}={p:.3f}")
            last.append(f"{name}_{split}={right.mean():.4f}")
            last.append(f"{name}_{split}_loss={losses[name][split]:.4f}")
        if name == "baseline":
            last += [f"baseline_{split}{kind}={value:.4f}" for split in ("val", "test")
                     for kind, value in (("", scores[name][split].mean()), ("_loss", losses[name][split]))]
        print("| " + " | ".join(cells) + " |")
    print(" ".join(last))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
