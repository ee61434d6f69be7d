"""``make bench-finetune``: fine-tuning end to end vs fine-tuning only the top on cached cut activations.

On flower_photos (default split 75/15/10, seed 42) at 224 px with efficientnet_lite0: a head trained on
cached features (the same for both sides), then ``--fine-tune-epochs`` of fine-tuning from
``--fine-tune-at``, batch 32, the same seed and batch order on both sides:

(a) end to end: every step runs the whole network on the images;
(b) on the cut (``pipeline/cut.py``): the frozen bottom's activations are computed once (timed apart,
    into a fresh cache folder) and each step runs only the top.

Prints the fine-tuning time of each (Keras ``fit`` of the fine-tuning epochs, validation included), the
cut-cache build time, test accuracy of both, the largest weight difference, and a last line
``finetune_speedup=<a / (b + build)> finetune_speedup_cached=<a / b> test_accuracy_end_to_end=...
test_accuracy_cut=...``.

``--whole-trial`` compares whole fine-tuning trials instead, head phase included: (a) trains its head end to
end on the images too, as plain Keras does, and (b) is the trial as a sweep runs it, the head on cached features
and fine-tuning on the cut. Both caches are built by (b) into a fresh folder, in one pass of the bottom over
the images and the pooled features from its activations (``cuts.pooled_features``), each timed apart. The head
epochs get the same batch order on both sides. The last line adds ``trial_speedup=<a / (b + both builds)>
trial_speedup_cached=<a / b>`` and ``feature_build_s``, where a side's time is its two ``fit`` calls
(``cut_build_s`` and ``finetune_speedup`` keep their meaning: the activations only).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flower_photos"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--fine-tune-at", default="0.75")
    parser.add_argument("--epochs", type=int, default=2, help="head epochs (on cached features, both sides)")
    parser.add_argument("--fine-tune-epochs", type=int, default=2)
    parser.add_argument("--fine-tune-learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--whole-trial", action="store_true",
                        help="head phase included: end to end on images (a) against cached features (b)")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from pipeline import cut as cuts
    from pipeline import features, recipe
    from pipeline.hparams import RunConfig
    from pipeline.training import train

    fine_tune_at = float(args.fine_tune_at) if args.fine_tune_at.replace(".", "", 1).isdigit() else args.fine_tune_at
    config = RunConfig(backbone=args.backbone, image_size=args.image_size, epochs=args.epochs,
                       fine_tune_epochs=args.fine_tune_epochs, fine_tune_at=fine_tune_at,
                       fine_tune_learning_rate=args.fine_tune_learning_rate, batch_size=args.batch_size)
    plan = recipe.plan(config)
    start = time.perf_counter()
    data = recipe.load_data_for(plan, args.data, None)
    print(f"data: {data.sizes} decoded in {time.perf_counter() - start:.1f} s", flush=True)
    key = plan.feature_key(data)

    def run(use_cut: bool, root: Path):
        keras.utils.set_random_seed(config.seed)
        model = recipe.full_model(plan, data.num_classes)
        if args.whole_trial:  # (a) reads no cache; (b) builds both below, in one pass
            cached, feature_seconds = None, 0.0
        else:
            cached, feature_seconds = features.load_or_compute(model, data, key)
        at_cut, build = None, 0.0
        if use_cut:
            split = cuts.split(model, plan.unfreeze_from)
            activations, build = cuts.load_or_compute(split, data, split.key(key), root=root)
            at_cut = (split, activations)
            if args.whole_trial:  # the head's features from the activations, as a sweep's first trial makes them
                start = time.perf_counter()
                cached = cuts.pooled_features(split, activations)
                feature_seconds = time.perf_counter() - start
            size = sum(x.nbytes for x, _ in activations.values())
            print(f"cut at backbone layer {split.index} ({split.layer}, fine_tune_at layer {plan.unfreeze_from}): "
                  f"activations {tuple(split.bottom.output.shape[1:])} float32, {size / 1e6:.1f} MB for "
                  f"{sum(len(y) for _, y in activations.values())} images, built in {build:.1f} s", flush=True)
        result = train(model, data, features=cached, cut=at_cut, epochs=args.epochs,
                       fine_tune_epochs=args.fine_tune_epochs, unfreeze_from=plan.unfreeze_from,
                       learning_rate=float(config.learning_rate), fine_tune_learning_rate=plan.fine_tune_learning_rate,
                       batch_size=args.batch_size, seed=config.seed, verbose=2)
        side = "cut" if use_cut else "end to end"
        print(f"[{side}] head {args.epochs} epochs: {result.head_seconds:.1f} s; "
              f"fine-tuning {args.fine_tune_epochs} epochs: {result.fine_tune_seconds:.1f} s; "
              f"losses {[round(v, 5) for v in result.history['loss']]}; test_accuracy {result.test_accuracy:.4f}"
              f" (features {feature_seconds:.1f} s)", flush=True)
        return model, result, build, feature_seconds

    with tempfile.TemporaryDirectory() as tmp:
        plain_model, plain, _, _ = run(False, Path(tmp))
        cut_model, cut, build, feature_build = run(True, Path(tmp))
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(plain_model.weights, cut_model.weights))
    loss_diff = max(abs(a - b) for a, b in zip(plain.history["loss"], cut.history["loss"]))
    print(f"max |weight difference| {diff:.2e}; max |loss difference| {loss_diff:.2e}")
    whole = ""
    if args.whole_trial:
        a, b = plain.head_seconds + plain.fine_tune_seconds, cut.head_seconds + cut.fine_tune_seconds
        whole = (f"trial_speedup={a / (b + build + feature_build):.2f} trial_speedup_cached={a / b:.2f} "
                 f"trial_end_to_end_s={a:.1f} trial_ours_s={b:.1f} feature_build_s={feature_build:.1f} ")
    print(f"{whole}finetune_speedup={plain.fine_tune_seconds / (cut.fine_tune_seconds + build):.2f} "
          f"finetune_speedup_cached={plain.fine_tune_seconds / cut.fine_tune_seconds:.2f} "
          f"finetune_end_to_end_s={plain.fine_tune_seconds:.1f} finetune_cut_s={cut.fine_tune_seconds:.1f} "
          f"cut_build_s={build:.1f} test_accuracy_end_to_end={plain.test_accuracy:.4f} "
          f"test_accuracy_cut={cut.test_accuracy:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
