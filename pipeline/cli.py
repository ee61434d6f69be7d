"""``python -m pipeline.cli train``: train one configuration, print its scores, export it."""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # read when TensorFlow first touches a GPU

from pipeline import precision  # noqa: E402
from pipeline import tfstart  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

tfstart.quiet_environment()
from pipeline.hparams import DEFAULTS as D  # noqa: E402
from pipeline.hparams import RunConfig  # noqa: E402


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="tfds name (tf_flowers, cats_vs_dogs, ...) or a folder")
    p.add_argument("--backbone", default=D["backbone"], help="registry name or hub:<URL or SavedModel dir>")
    p.add_argument("--weights", default=D["weights"], help="'imagenet', 'none', or a local weights file")
    p.add_argument("--epochs", type=int, default=D["epochs"], help="head epochs with the backbone frozen")
    p.add_argument("--fine-tune-epochs", type=int, default=D["fine_tune_epochs"], help="fine-tuning epochs (0: head only)")
    p.add_argument(
        "--fine-tune-at",
        default=str(D["fine_tune_at"]),
        help="first backbone layer to unfreeze: index, fraction of depth, 'all', or 0/'none' for head only",
    )
    p.add_argument("--dropout", type=float, default=D["dropout"])
    p.add_argument("--batch-size", type=int, default=D["batch_size"])
    p.add_argument("--learning-rate", type=float, default=D["learning_rate"], help="Adam learning rate of the head phase")
    p.add_argument("--fine-tune-learning-rate", type=float, default=D["fine_tune_learning_rate"], help="Adam learning rate when fine-tuning")
    p.add_argument("--image-size", type=int, default=None, help="square input size (default: backbone's native)")
    p.add_argument("--augment", type=_bool, default=D["augment"], help="random flip + rotation in training (true/false)")
    p.add_argument("--early-stopping-patience", type=int, default=D["early_stopping_patience"],
                   help="stop the head phase when val_loss has not improved for this many epochs, keeping the best "
                   "epoch's weights (0: off)")
    p.add_argument("--cv-folds", type=int, default=D["cv_folds"],
                   help="score a head-only run on cached features by k-fold cross-validation over train+validation "
                   "(0: off; 5 is usual)")
    p.add_argument("--seed", type=int, default=RunConfig.seed)
    p.add_argument("--split", default=None, help="tfds: 'train[:75%%],train[75%%:90%%],train[90%%:]'; folder: 75/15/10")
    p.add_argument("--data-dir", default=None, help="tfds data directory")
    p.add_argument("--mixed-precision", default="auto",
                   help="auto (default): bfloat16 compute on GPUs of compute capability >= 8.0, float16 with loss "
                   "scaling below, float32 on CPU; or float32, mixed_float16, mixed_bfloat16 (true = mixed_float16)")
    p.add_argument("--xla", type=_bool, default=False, help="compile training steps with XLA (for GPUs)")
    p.add_argument(
        "--feature-cache", type=_bool, default=True,
        help="train the frozen-backbone head on cached backbone features (same model, far faster; "
        "not used with augmentation or random weights)",
    )


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def run_config(args: argparse.Namespace) -> RunConfig:
    """The command line as the run's configuration (``FINE_TUNE_AT=none`` or ``FINE_TUNE_EPOCHS=0``: head only)."""
    return RunConfig(
        backbone=args.backbone, weights=args.weights, image_size=args.image_size or 0, epochs=args.epochs,
        fine_tune=True, fine_tune_at=args.fine_tune_at, fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_learning_rate=args.fine_tune_learning_rate, dropout=args.dropout, batch_size=args.batch_size,
        learning_rate=args.learning_rate, augment=args.augment, seed=args.seed,
        mixed_precision=precision.setting(args.mixed_precision),
        xla=args.xla, feature_cache=args.feature_cache, early_stopping_patience=args.early_stopping_patience,
        cv_folds=args.cv_folds,
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train one configuration (the recipe a sweep's trial uses), print its scores, export it."""
    from pipeline import recipe
    from pipeline.data import skipped_lines
    from pipeline.export import export_model

    plan = recipe.plan(run_config(args))
    start = time.perf_counter()
    data = recipe.load_data_for(plan, args.dataset, args.split, data_dir=args.data_dir)
    print(
        f"data: {data.name} ({data.source}), classes {data.class_names}, split {data.split_spec}, "
        f"sizes {data.sizes}, skipped files {data.skipped}",
        flush=True,
    )
    for line in skipped_lines(data.skipped_files):
        print(line)
    outcome = recipe.train_run(plan, data)
    result = outcome.result
    if result.used_feature_cache:
        seconds = result.feature_seconds
        print(f"frozen backbone features: {f'computed in {seconds:.1f}s and cached' if seconds else 'from the cache'}")
    phase = f"fine-tuned from layer {plan.unfreeze_from}" if result.fine_tune_start is not None else "head only"
    print(f"val_accuracy={result.val_accuracy:.4f} {_interval(result.val_accuracy, data.sizes['validation'])} "
          f"test_accuracy={result.test_accuracy:.4f} {_interval(result.test_accuracy, data.sizes['test'])} ({phase})")
    print("  [low, high]: 95 % Wilson interval of each accuracy on its split's images")
    print(f"head-only test_accuracy={result.head_test_accuracy:.4f}")
    if outcome.cv is not None:
        folds = ", ".join(f"{a:.4f}" for a in outcome.cv.accuracies)
        print(f"cv_accuracy={outcome.cv.mean:.4f} ± {outcome.cv.std:.4f} ({len(outcome.cv.accuracies)}-fold over "
              f"train+validation: {folds}; {outcome.cv.seconds:.1f}s)")
    elif plan.config.cv_folds:
        print("cv_accuracy: not measured (cross-validation scores a head-only run on cached features)")
    print(f"head phase {result.head_seconds:.1f}s, fine-tune phase {result.fine_tune_seconds:.1f}s")
    if args.output:
        metadata = {
            "backbone": args.backbone, "weights": args.weights, "fine_tune_at": args.fine_tune_at,
            "test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy, **data.lineage(),
        }
        model = recipe.full_model(plan, data.num_classes, outcome.model)
        out = export_model(model, args.output, data.class_names, metadata=metadata, overwrite=args.overwrite)
        print(f"exported to {out} (SavedModel + labels.txt + model.keras)")
    print(f"total {time.perf_counter() - start:.1f}s")
    return 0


def _interval(accuracy: float, n: int) -> str:
    from pipeline.stats import accuracy_interval

    low, high = accuracy_interval(accuracy, n)
    return "" if low != low else f"[{low:.3f}, {high:.3f}]"


def cmd_predict(args: argparse.Namespace) -> int:
    """Print the top-k classes of each image, using only an export (SavedModel + labels.txt)."""
    from pathlib import Path

    import numpy as np

    from pipeline.data import IMAGE_EXTENSIONS, read_image
    from pipeline.export import ExportedModel

    model = ExportedModel(args.model)
    source = Path(args.images)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise UserError(f"folder {source} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    elif source.is_file():
        paths = [source]
    else:
        raise UserError(f"{source} is neither an image file nor a folder")
    k = min(args.top_k, len(model.class_names))
    for path in paths:
        try:  # at each of the model's input sizes (one, or an ensemble's several)
            images = {name: read_image(path, size)[None].astype(np.float32) for name, size in model.inputs.items()}
        except UserError as e:
            print(f"{path}: skipped: {e}")
            continue
        probs = model.predict(images)[0]
        top = np.argsort(probs)[::-1][:k]
        print(f"{path}: " + ", ".join(f"{model.class_names[i]} {probs[i]:.3f}" for i in top))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlsweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one configuration and export it", description=cmd_train.__doc__)
    add_train_arguments(p)
    p.add_argument("--output", default=None, help="export directory (SavedModel + labels.txt + model.keras)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help=cmd_predict.__doc__, description=cmd_predict.__doc__)
    p.add_argument("--model", required=True, help="an export directory (make train OUTPUT=, make best-export)")
    p.add_argument("--images", required=True, help="an image file or a folder of images")
    p.add_argument("--top-k", type=int, default=3)
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tfstart.start_tensorflow()  # both commands need it; its start-up lines held back
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
