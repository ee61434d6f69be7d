"""Where a fresh process's first training step of the top goes (issue 13: the tracing in a fine-tuning trial's
fixed cost), measured apart from data: EfficientNet-Lite0 at 224 px, cut at ``fine_tune_at`` 0.75
(``pipeline/cut.py``), random activations of the cut's shape, batch 32.

One process measures one setting; run it several times (a fresh process each, as a trial is).

- ``--mode fit`` (default): the top's ``fit`` (2 epochs of ``--train`` batches, 8 validation batches), then
  ``predict``, as a trial pays them: ``fit_first_s``/``fit_second_s`` (first and second training step),
  ``fit_val_*`` and ``fit_predict_*`` the same, ``*_excess_s`` = first minus second, ``fit_step_median_s``
  (a later training step); and the first call of the traced train and test functions inside ``fit`` split
  into ``fit_<kind>_trace_s`` (tracing: Python running ``train_step`` symbolically; Keras 3 wraps its step
  functions in ``do_not_convert``, so no autograph) and ``fit_<kind>_first_run_s`` (the first execution:
  grappler, instantiating the graph, running it once).
- ``--mode parts``: the same split done by hand (``_symbolic_build``, ``get_concrete_function``, calls).

Settings: ``--prebuild optimizer`` (build the optimizer's variables before ``fit``, as ``pipeline.training``
now does; ``none`` is Keras's default, which creates them inside the first trace, so ``tf.function`` traces
the train step twice), ``--grappler k=v,...`` (``tf.config.optimizer.set_experimental_options``),
``--run-eagerly``, ``--steps-per-execution N``, ``--jit``, ``--warm`` (a tiny model fitted first).
``--vlog`` prints grappler's own per-pass times (TF's VLOG of ``meta_optimizer``) to stderr. The last line
is the setting and ``key=value`` pairs. Figures and findings: benchmarks/results/2026-11-24-bench-trace.md.

    nice -n 19 python -m benchmarks.bench_trace --prebuild optimizer [--grappler disable_meta_optimizer=true]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

T0 = time.perf_counter()


def parse_options(text: str) -> dict[str, bool]:
    """``"a=true,b=false"`` -> ``{"a": True, "b": False}`` (grappler's experimental options)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip().lower() in ("1", "true", "yes", "on")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grappler", default="", help="k=v,... for tf.config.optimizer.set_experimental_options")
    parser.add_argument("--run-eagerly", action="store_true")
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--fine-tune-at", type=float, default=0.75)
    parser.add_argument("--train", type=int, default=12, help="training batches of 32")
    parser.add_argument("--mode", choices=("fit", "parts"), default="fit",
                        help="fit: the first steps as fit/predict pay them; parts: trace and first call apart")
    parser.add_argument("--prebuild", choices=("none", "optimizer", "symbolic"), default="none",
                        help="build before fit: the optimizer's variables, or all state (Keras's _symbolic_build)")
    parser.add_argument("--warm", action="store_true",
                        help="first fit, evaluate and predict a tiny model (TensorFlow's one-time costs paid ahead)")
    parser.add_argument("--vlog", action="store_true", help="grappler's per-pass times on stderr")
    args = parser.parse_args(argv)
    if args.vlog:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        os.environ["TF_CPP_VMODULE"] = "meta_optimizer=1"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import numpy as np
    import tensorflow as tf

    if args.grappler:
        tf.config.optimizer.set_experimental_options(parse_options(args.grappler))
    import keras

    from pipeline import cut as cuts
    from pipeline import recipe
    from pipeline.features import feature_batches
    from pipeline.hparams import RunConfig
    from pipeline.model import compile_model, set_trainable

    started = time.perf_counter() - T0
    config = RunConfig(backbone="efficientnet_lite0", image_size=224, epochs=1, fine_tune_epochs=1,
                       fine_tune_at=args.fine_tune_at, fine_tune_learning_rate=1e-4, batch_size=32)
    plan = recipe.plan(config)

    def top(seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        model = recipe.full_model(plan, 5)
        split = cuts.split(model, plan.unfreeze_from)
        set_trainable(model, plan.unfreeze_from)
        compile_model(model, 1e-4, jit_compile=args.jit)
        net = cuts.top_trainer(split, model)
        if args.run_eagerly or args.steps_per_execution > 1:
            net.compile(optimizer=net.optimizer, loss=net.loss, metrics=["accuracy"], jit_compile=args.jit,
                        run_eagerly=args.run_eagerly, steps_per_execution=args.steps_per_execution)
        if args.prebuild == "optimizer":
            net.optimizer.build(net.trainable_variables)
        elif args.prebuild == "symbolic":
            net._symbolic_build(data_batch=(np.zeros((1, *net.inputs[0].shape[1:]), np.float32),
                                            np.zeros((1,), np.int32)))
        return net

    if args.warm:
        t = time.perf_counter()
        tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        tiny.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                     metrics=["accuracy"])
        tiny.optimizer.build(tiny.trainable_variables)
        small = tf.data.Dataset.from_tensor_slices((np.zeros((4, 4), np.float32), np.zeros(4, np.int32))).batch(2)
        tiny.fit(small, validation_data=small, epochs=1, verbose=0)
        tiny.predict(np.zeros((2, 4), np.float32), verbose=0)
        out_warm = time.perf_counter() - t
    t = time.perf_counter()
    net = top(42)
    built = time.perf_counter() - t
    shape = tuple(int(d) for d in net.inputs[0].shape[1:])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32 * args.train, *shape)).astype(np.float32)
    y = rng.integers(0, 5, size=len(x)).astype(np.int32)
    xv, yv = x[: 32 * 8], y[: 32 * 8]  # 8 batches: two executions even at steps_per_execution 4
    out: dict[str, float] = {"start_s": started, "build_s": built}
    if args.warm:
        out["warm_s"] = out_warm

    def closure(function) -> dict:
        return dict(zip(function.__code__.co_freevars, (c.cell_contents for c in function.__closure__)))

    def timed(kind: str, make, dataset) -> None:
        """Build, trace, first call and later steps of one of Keras's step functions, by hand as fit does."""
        t = time.perf_counter()
        make()
        function = getattr(net, f"{kind}_function")
        iterator = iter(dataset)
        if kind == "predict":  # predict's function takes a list of batches, not the iterator
            if isinstance(function, tf.types.experimental.PolymorphicFunction):
                function.get_concrete_function([tf.TensorSpec([None, *shape], tf.float32)])
        else:
            inner = closure(function).get("multi_step_on_iterator")
            if isinstance(inner, tf.types.experimental.PolymorphicFunction):
                inner.get_concrete_function(iterator)
        out[f"{kind}_trace_s"] = time.perf_counter() - t
        times = []
        for _ in range(len(dataset)):
            t = time.perf_counter()
            if kind == "predict":
                result = function([next(iterator)])
            else:
                result = function(iterator)
            keras.tree.map_structure(lambda v: np.asarray(v), result)  # wait for the values
            times.append(time.perf_counter() - t)
        out[f"{kind}_first_call_s"] = times[0]
        out[f"{kind}_step_s"] = statistics.median(times[2:] or times[1:])

    train = feature_batches((x, y), 32, shuffle=True, seed=1)
    t = time.perf_counter()
    if args.mode == "parts":
        net._symbolic_build(data_batch=next(iter(train)))
        out["symbolic_build_s"] = time.perf_counter() - t
        timed("train", net.make_train_function, train)
        timed("test", net.make_test_function, feature_batches((xv, yv), 32))
        timed("predict", net.make_predict_function, tf.data.Dataset.from_tensor_slices(xv).batch(32))
        return report(args, out)

    # As a trial pays it: fit (training + validation), then predict, on the top in this fresh process.
    from pipeline.training import StepTimer

    fresh = net
    timer = StepTimer()

    class StepTimes(keras.callbacks.Callback):
        """Every training step's wall time (the median of the later ones is the per-step cost)."""

        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):  # noqa: D102
            self.began = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):  # noqa: D102
            self.times.append(time.perf_counter() - self.began)

    steps = StepTimes()

    def split_first_call(kind: str) -> None:
        """Keras's ``make_<kind>_function``, then its traced function's first call split in tracing and running."""
        make = getattr(fresh, f"make_{kind}_function")

        def made(force=False):
            result = make(force)
            cells = dict(zip(fresh_function().__code__.co_freevars, fresh_function().__closure__))
            cell = cells.get("multi_step_on_iterator")
            if cell is None or not isinstance(cell.cell_contents, tf.types.experimental.PolymorphicFunction):
                return result
            inner = cell.cell_contents

            def first(iterator):
                t = time.perf_counter()
                concrete = inner.get_concrete_function(iterator)
                traced = time.perf_counter() - t
                t = time.perf_counter()
                value = inner(iterator)
                tf.nest.map_structure(lambda v: v.has_value().numpy() if hasattr(v, "has_value") else v, value)
                out.setdefault(f"fit_{kind}_trace_s", traced)  # the first epoch's (a later one finds it traced)
                out.setdefault(f"fit_{kind}_first_run_s", time.perf_counter() - t)
                cell.cell_contents = inner
                del concrete
                return value
            cell.cell_contents = first
            return result

        def fresh_function():
            return getattr(fresh, f"{kind}_function")
        setattr(fresh, f"make_{kind}_function", made)

    split_first_call("train")
    split_first_call("test")
    t = time.perf_counter()
    fresh.fit(feature_batches((x, y), 32, shuffle=True, seed=1), validation_data=feature_batches((xv, yv), 32),
              epochs=2, verbose=0, shuffle=False, callbacks=[timer, steps])
    out["fit_s"] = time.perf_counter() - t
    out["fit_first_s"], out["fit_second_s"] = timer.steps["train"]
    out["fit_val_first_s"], out["fit_val_second_s"] = timer.steps["test"]
    fresh.predict(xv, batch_size=32, verbose=0, callbacks=[timer])
    out["fit_predict_first_s"], out["fit_predict_second_s"] = timer.steps["predict"]
    out["fit_step_median_s"] = statistics.median(steps.times[2:]) / args.steps_per_execution  # per step
    out["fit_train_excess_s"] = out["fit_first_s"] - out["fit_second_s"]
    out["fit_val_excess_s"] = out["fit_val_first_s"] - out["fit_val_second_s"]
    out["fit_predict_excess_s"] = out["fit_predict_first_s"] - out["fit_predict_second_s"]
    return report(args, out)


def report(args: argparse.Namespace, out: dict[str, float]) -> int:
    """The last line: the setting and every figure, ``key=value``."""
    label = ";".join(filter(None, [args.grappler, "run_eagerly" * args.run_eagerly, "jit" * args.jit,
                                   "warm" * args.warm,
                                   f"prebuild={args.prebuild}" * (args.prebuild != "none"),
                                   f"spe={args.steps_per_execution}" * (args.steps_per_execution > 1)])) or "default"
    print(f"setting={label} " + " ".join(f"{k}={v:.3f}" for k, v in out.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
