"""``tlsweep train`` / ``tlsweep predict`` (``python -m pipeline.cli`` runs just these two).

Train's flags are ``RunConfig``'s fields (``pipeline.hparams``: a new field is a new flag) plus ``TrainOptions``;
predict's are ``PredictOptions``. Both are checked before TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # read when TensorFlow first touches a GPU

from pydantic import Field  # noqa: E402

from pipeline import device, tfstart  # noqa: E402
from pipeline.device import Setting as DeviceSetting  # noqa: E402
from pipeline.errors import UserError, typed  # noqa: E402
from pipeline.hparams import RunConfig, check  # noqa: E402
from pipeline.settings import Options, Whole, add_options, fields_of  # noqa: E402

tfstart.quiet_environment()
HEAD_ONLY_BY_FLAGS = ("fine_tune",)  # train fine-tunes unless --fine-tune-at none or --fine-tune-epochs 0


class TrainOptions(Options):
    dataset: str = Field(description="tfds name (tf_flowers, cats_vs_dogs, ...) or a folder")
    split: Optional[str] = Field(None, description="tfds: 'train[:75%],train[75%:90%],train[90%:]'; folder: 75/15/10")
    data_dir: Optional[str] = Field(None, description="tfds data directory")
    output: Optional[str] = Field(None, description="export directory (SavedModel + labels.txt + model.keras)")
    overwrite: bool = Field(False, description="replace an existing export directory")
    device: Optional[DeviceSetting] = Field(None, description=device.HELP)


class PredictOptions(Options):
    model: str = Field(description="an export directory (tlsweep train --output, tlsweep best-export)")
    images: str = Field(description="an image file or a folder of images")
    top_k: Whole = Field(3, ge=1, description="classes to print per image (at most the model's)")


def run_config(args: argparse.Namespace) -> RunConfig:
    """The command line as the run's configuration, checked (``--fine-tune-at none`` or ``--fine-tune-epochs 0``:
    head only)."""
    names = [n for n in fields_of(RunConfig) if n not in HEAD_ONLY_BY_FLAGS]
    return check(RunConfig(**{n: getattr(args, n) for n in names}))


def cmd_train(args: argparse.Namespace) -> int:
    """Train one configuration (the recipe a sweep's trial uses), print its scores, export it."""
    config, args = run_config(args), TrainOptions.of(args)
    tfstart.start_tensorflow()  # its start-up lines held back
    device.refuse_cpu(args.device)  # never silently on the CPU
    from pipeline import recipe, safepath
    from pipeline.backbones import check_weights_fit
    from pipeline.data import check_dataset, skipped_lines
    from pipeline.export import export_model

    check_dataset(args.dataset, args.split, config.seed)  # the folder's layout and SPLIT=: before any work
    plan = recipe.plan(config)
    output = typed("--output", "OUTPUT=")
    safepath.check_outside_data(args.dataset, {"the export": args.output} if args.output else {})
    if args.output:  # before any work: replaced at the end only if it is an export and --overwrite allows it
        safepath.check_replaceable(args.output, safepath.EXPORT, output, args.overwrite)
    safepath.check_caches()
    check_weights_fit(plan.spec, plan.config.weights)  # a file of another model: one line before the data is read
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
            "backbone": config.backbone, "weights": config.weights, "fine_tune_at": config.fine_tune_at,
            "test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy, **data.lineage(),
        }
        model = recipe.full_model(plan, data.num_classes, outcome.model)
        out = export_model(model, args.output, data.class_names, metadata=metadata, overwrite=args.overwrite,
                           fix=output)
        print(f"exported to {out} (SavedModel + labels.txt + model.keras)")
    print(f"total {time.perf_counter() - start:.1f}s")
    return 0


def _interval(accuracy: float, n: int) -> str:
    from pipeline.stats import accuracy_interval

    low, high = accuracy_interval(accuracy, n)
    return "" if low != low else f"[{low:.3f}, {high:.3f}]"


def cmd_predict(args: argparse.Namespace) -> int:
    """Print the top-k classes of each image, using only an export (SavedModel + labels.txt)."""
    args = PredictOptions.of(args)
    tfstart.start_tensorflow()
    from pathlib import Path

    import numpy as np

    from pipeline.data import SUPPORTED, read_image, skip_reason, skipped_lines, walk
    from pipeline.export import ExportedModel

    model = ExportedModel(args.model)
    source = Path(args.images)
    skipped: list[str] = []
    if source.is_dir():  # read as a class folder is: every entry that is not read is named, nothing is opened blind
        paths, passed = walk(source)
        skipped += [str(p) for p in passed]
        if not paths:
            for line in skipped_lines(skipped):
                print(line)
            raise UserError(f"folder {source} holds no images" + (" it can read (the skipped files are named above)"
                            if skipped else "") + f"; images read: {SUPPORTED}")
    elif os.path.lexists(source):
        if reason := skip_reason(source):
            raise UserError(f"{source}: {reason}; images read: {SUPPORTED}")
        paths = [source]
    else:
        raise UserError(f"{source} does not exist; give an image file or a folder of images")
    k = args.top_k
    if k > len(model.class_names):
        k = len(model.class_names)
        print(f"note: --top-k {args.top_k} is more than the model's {k} classes; showing all {k}", file=sys.stderr)
    predicted = 0
    for path in paths:
        try:  # at each of the model's input sizes (one, or an ensemble's several)
            images = {name: read_image(path, size)[None].astype(np.float32) for name, size in model.inputs.items()}
        except UserError:
            if not source.is_dir():
                raise
            skipped.append(str(path))  # passed the checks but did not decode: named with the others below
            continue
        probs = model.predict(images)[0]
        top = np.argsort(probs)[::-1][:k]
        print(f"{path}: " + ", ".join(f"{model.class_names[i]} {probs[i]:.3f}" for i in top))
        predicted += 1
    for line in skipped_lines(skipped):
        print(line)
    if not predicted:
        raise UserError(f"no image of {source} could be read (the skipped files are named above); images read: "
                        f"{SUPPORTED}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``train`` and ``predict``, their flags built from their declarations."""
    p = sub.add_parser("train", help="train one configuration and export it", description=cmd_train.__doc__)
    add_options(p, TrainOptions, only=("dataset",))
    add_options(p, RunConfig, skip=HEAD_ONLY_BY_FLAGS, switches=False)
    add_options(p, TrainOptions, skip=("dataset",))
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("predict", help=cmd_predict.__doc__, description=cmd_predict.__doc__)
    add_options(p, PredictOptions)
    p.set_defaults(func=cmd_predict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tlsweep", description=__doc__.split("\n\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
