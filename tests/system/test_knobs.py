"""The fine-tuning knobs: label smoothing, AdamW weight decay, the fine-tuning schedule and its warmup."""

import dataclasses
import math
import subprocess
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import pytest

from pipeline import crossval, recipe
from pipeline.errors import UserError
from pipeline.export import load_keras_model
from pipeline.hparams import DEFAULTS, KNOBS, RunConfig
from pipeline.model import DecayingAdamW, SmoothedSparseCrossentropy, build_head, compile_model
from pipeline.training import fine_tune_rate, train
from sweeps import space

ROOT = Path(__file__).resolve().parents[2]


def test_the_defaults_are_the_plain_recipe():
    config = RunConfig()
    assert (config.label_smoothing, config.weight_decay, config.fine_tune_schedule, config.warmup_epochs) == \
        (0.0, 0.0, "constant", 0.0)
    head = build_head(4, 3)
    compile_model(head, 1e-3)
    assert type(head.optimizer) is keras.optimizers.Adam and type(head.loss) is keras.losses.SparseCategoricalCrossentropy
    assert fine_tune_rate(1e-5, "constant", 0.0, 5, 86) == 1e-5, "a constant float, as before: no schedule object"


def test_label_smoothing_is_cross_entropy_against_smoothed_one_hot_labels():
    labels = np.array([0, 2, 1, 2])
    probs = np.array([[.7, .2, .1], [.1, .1, .8], [.3, .4, .3], [.5, .25, .25]], "float32")
    smoothing = 0.1
    target = np.eye(3)[labels] * (1 - smoothing) + smoothing / 3
    expected = np.mean(-(target * np.log(probs)).sum(axis=1))
    assert float(SmoothedSparseCrossentropy(smoothing)(labels, probs)) == pytest.approx(expected, rel=1e-6)
    plain = keras.losses.SparseCategoricalCrossentropy()(labels, probs)
    assert float(SmoothedSparseCrossentropy(0.0)(labels, probs)) == pytest.approx(float(plain), rel=1e-6)
    assert float(SmoothedSparseCrossentropy(0.0)(labels[:, None], probs)) == pytest.approx(float(plain), rel=1e-6), \
        "labels of shape (n, 1) too"


def _decay_step(head):
    """One optimizer step with zero gradients: Adam moves nothing, so only the decoupled weight decay acts."""
    before = [np.array(v.numpy()) for v in head.trainable_variables]
    head.optimizer.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in head.trainable_variables])
    return {v.name: (b, v.numpy()) for b, v in zip(before, head.trainable_variables)}


def test_weight_decay_is_adamw_that_spares_biases_also_after_a_reload(tmp_path):
    head = build_head(4, 3, seed=0)
    compile_model(head, 0.1, weight_decay=0.5, label_smoothing=0.1)
    head.get_layer("classifier").bias.assign(np.ones(3, "float32"))
    head.optimizer.build(head.trainable_variables)
    moved = _decay_step(head)
    np.testing.assert_allclose(moved["kernel"][1], moved["kernel"][0] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(moved["bias"][1], moved["bias"][0])
    head.save(tmp_path / "head.keras")
    again = load_keras_model(tmp_path / "head.keras")  # a Hyperband slice continues from such a checkpoint
    assert type(again.optimizer) is DecayingAdamW and again.optimizer.weight_decay == pytest.approx(0.5)
    assert again.loss.label_smoothing == pytest.approx(0.1)
    moved = _decay_step(again)
    np.testing.assert_allclose(moved["kernel"][1], moved["kernel"][0] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(moved["bias"][1], moved["bias"][0])  # Keras's own AdamW would decay it now


def test_the_fine_tuning_schedule_warms_up_from_zero_then_holds_or_decays_to_zero():
    steps, epochs, lr = 10, 4, 1e-3  # 40 steps, the first 10 warming up
    cosine = fine_tune_rate(lr, "cosine", 1, epochs, steps)
    constant = fine_tune_rate(lr, "constant", 1, epochs, steps)
    for schedule in (cosine, constant):
        assert [float(schedule(s)) for s in (0, 5, 10)] == pytest.approx([0, lr / 2, lr])
    assert [float(cosine(s)) for s in (25, 40)] == pytest.approx([lr / 2, 0], abs=1e-9)
    assert [float(constant(s)) for s in (25, 40)] == pytest.approx([lr, lr])
    no_warmup = fine_tune_rate(lr, "cosine", 0, epochs, steps)
    assert [float(no_warmup(s)) for s in (0, 20, 40)] == pytest.approx([lr, lr / 2, 0], abs=1e-9)
    assert float(fine_tune_rate(lr, "cosine", 0.01, epochs, steps)(1)) == pytest.approx(lr), "at least one step"


def _features(n=48, width=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n // classes)
    return (rng.normal(size=(len(y), width)) + np.eye(classes, width)[y]).astype("float32"), y


def test_a_checkpoint_continues_the_schedule_where_it_stopped(tmp_path):
    """What a Hyperband slice relies on: the schedule reads the optimizer's step count, which the checkpoint keeps, so
    2 epochs in one go and 1 + 1 across a save and reload train the same weights (a restarted warmup would not)."""
    x, y = _features()
    rate = lambda: fine_tune_rate(0.05, "cosine", 1, 2, 6)  # noqa: E731  6 steps of 8 per epoch

    def head():
        net = build_head(8, 3, dropout=0.0, seed=0)
        compile_model(net, rate(), label_smoothing=0.1, weight_decay=0.5)
        return net

    straight = head()
    straight.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    first = head()
    first.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    first.save(tmp_path / "slice.keras")
    resumed = load_keras_model(tmp_path / "slice.keras")
    assert int(resumed.optimizer.iterations) == 6
    assert float(resumed.optimizer.learning_rate) == pytest.approx(float(rate()(6)))
    resumed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    restarted = head()  # the same slice on a fresh optimizer: its warmup starts over, and the weights differ
    restarted.set_weights(first.get_weights())
    restarted.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert not np.allclose(restarted.get_weights()[0], straight.get_weights()[0], atol=1e-4)


BAD = [
    (dict(label_smoothing=1.0), "label_smoothing must be a number >= 0 and < 1, got 1.0"),
    (dict(label_smoothing=-0.1), "label_smoothing must be a number >= 0 and < 1, got -0.1"),
    (dict(label_smoothing=float("nan")), "label_smoothing must be a number >= 0 and < 1, got nan"),
    (dict(weight_decay=-1e-4), "weight_decay must be a number >= 0, got -0.0001"),
    (dict(weight_decay=float("inf")), "weight_decay must be a number >= 0, got inf"),
    (dict(warmup_epochs=-1), "warmup_epochs must be a number >= 0, got -1"),
    (dict(warmup_epochs=float("nan")), "warmup_epochs must be a number >= 0, got nan"),
    (dict(fine_tune_schedule="linear"), "fine_tune_schedule 'linear' is not one of constant, cosine"),
    (dict(warmup_epochs=5), "warmup_epochs 5 must be fewer than fine_tune_epochs 5: the warmup is the start of the "
                            "fine-tuning phase; lower warmup_epochs or fine-tune longer"),
    (dict(warmup_epochs=2.5, fine_tune_epochs=2), "warmup_epochs 2.5 must be fewer than fine_tune_epochs 2:"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_knob_values_are_one_line_user_errors_when_planned(changes, message):
    with pytest.raises(UserError) as caught:
        recipe.plan(RunConfig(**changes))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


TRAIN_BAD = [
    ({"label_smoothing": 1.0}, r"label_smoothing must be a number >= 0 and < 1, got 1.0"),
    ({"weight_decay": float("nan")}, r"weight_decay must be a number >= 0, got nan"),
    ({"fine_tune_schedule": "step"}, r"fine_tune_schedule 'step' is not one of constant, cosine"),
    ({"warmup_epochs": -1}, r"warmup_epochs must be a number >= 0, got -1"),
    ({"warmup_epochs": 2, "fine_tune_epochs": 2, "unfreeze_from": 100},
     r"warmup_epochs 2 must be fewer than fine_tune_epochs 2: the warmup is the start of the fine-tuning phase"),
]


@pytest.mark.parametrize("kwargs,message", TRAIN_BAD, ids=[str(i) for i in range(len(TRAIN_BAD))])
def test_train_refuses_bad_knobs_before_any_work(kwargs, message):
    with pytest.raises(UserError, match=message):
        train(build_head(4, 3), None, features={}, **kwargs)


def test_a_warmup_only_matters_to_a_run_that_fine_tunes():
    for head_only in (dict(fine_tune_at="none"), dict(fine_tune_epochs=0), dict(fine_tune=False, fine_tune_at=None,
                                                                                  fine_tune_epochs=None)):
        assert not recipe.plan(RunConfig(warmup_epochs=5, **head_only)).fine_tunes
    plan = recipe.plan(RunConfig(fine_tune=False, fine_tune_at=None, fine_tune_epochs=None, fine_tune_learning_rate=None,
                                 fine_tune_schedule=None, warmup_epochs=None))  # as a sweep's head-only trial has them
    assert not plan.fine_tunes


def test_a_space_declares_only_the_knobs_it_can_change():
    """Each declared hyperparameter moves Keras Tuner's random seed on: a space without the knobs (or fixing them at
    their defaults, as a staged search's stage 2 does) declares none of them, so it draws the trials it drew before."""
    for entries in ({}, {k: {"fixed": DEFAULTS[k]} for k in KNOBS}):
        hp = kt.HyperParameters()
        assert space.define(hp, entries) == DEFAULTS
        assert not {p.name for p in hp.space} & set(KNOBS)
    searched = {"fine_tune": {"boolean": True}, "label_smoothing": {"choice": [0.0, 0.1]},
                "warmup_epochs": {"choice": [0, 1]}, "fine_tune_schedule": {"choice": ["constant", "cosine"]}}
    hp = kt.HyperParameters()
    hp.values["fine_tune"] = False
    values = space.define(hp, searched)
    assert {"label_smoothing", "warmup_epochs", "fine_tune_schedule"} <= {p.name for p in hp.space}
    assert values["warmup_epochs"] is None and values["fine_tune_schedule"] is None, "conditional on fine_tune"
    assert values["label_smoothing"] == 0.0 and values["weight_decay"] == 0.0
    assert not hp.is_active("warmup_epochs") and hp.is_active("label_smoothing")
    recipe.plan(RunConfig.from_values(values))


def test_a_space_whose_warmup_outlasts_its_fine_tuning_is_one_line_before_any_trial():
    with pytest.raises(UserError, match=r"^sweep s: no trial can run with fine_tune_epochs=2, warmup_epochs=2: "
                                        r"warmup_epochs 2 must be fewer than fine_tune_epochs 2"):
        space.check({"fine_tune_epochs": {"int": [2, 10]}, "warmup_epochs": {"choice": [0, 2]}}, "s")
    space.check({"fine_tune_epochs": {"int": [2, 10]}, "warmup_epochs": {"choice": [0, 1]},
                 "label_smoothing": {"float": [0.0, 0.2]}, "weight_decay": {"choice": [0.0, 0.05]},
                 "fine_tune_schedule": {"choice": ["constant", "cosine"]}}, "s")


def test_cross_validation_trains_each_fold_as_a_run_trains_its_head():
    """Every fold is the run's own recipe, knobs included: its accuracy is that of ``train`` on the fold's features
    (on noise, where any change to the training shows in the held-out accuracy)."""
    x, y = _features(n=60, seed=1)
    x = np.random.default_rng(2).normal(size=x.shape).astype("float32")  # labels unrelated to the features
    features = {"train": (x[:45], y[:45]), "validation": (x[45:], y[45:])}
    args = dict(folds=3, epochs=4, learning_rate=0.05, dropout=0.2, batch_size=8, seed=3)
    plain = crossval.cross_validate(features, 3, **args).accuracies
    for knobs in (dict(label_smoothing=0.3), dict(weight_decay=2.0)):
        cv = crossval.cross_validate(features, 3, **args, **knobs).accuracies
        assert cv != plain, f"{knobs} changes the folds' heads"
        folds = crossval.stratified_folds(y, 3, seed=3)
        by_train = []
        for held_out in folds:
            rows = np.setdiff1d(np.arange(len(y)), held_out)
            head = build_head(8, 3, dropout=0.2, seed=3)
            result = train(head, None, features={"train": (x[rows], y[rows]), "validation": (x[held_out], y[held_out]),
                                                 "test": (x[held_out], y[held_out])},
                           epochs=4, fine_tune_epochs=0, learning_rate=0.05, batch_size=8, seed=3, verbose=0, **knobs)
            by_train.append(result.test_accuracy)
        assert cv == pytest.approx(tuple(by_train)), knobs


def _train_args(*flags):
    import argparse

    from pipeline.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", "--dataset", "d", *flags])


def test_the_train_command_and_make_train_pass_the_knobs():
    from pipeline.cli import run_config

    config = run_config(_train_args("--label-smoothing", "0.1", "--weight-decay", "0.05", "--fine-tune-schedule",
                                    "cosine", "--warmup-epochs", "1"))
    assert (config.label_smoothing, config.weight_decay, config.fine_tune_schedule, config.warmup_epochs) == \
        (0.1, 0.05, "cosine", 1.0)
    default = run_config(_train_args())
    assert {k: getattr(default, k) for k in KNOBS} == {k: DEFAULTS[k] for k in KNOBS}
    made = subprocess.run(["make", "-n", "train", "DATASET=d", "LABEL_SMOOTHING=0.1", "WEIGHT_DECAY=0.05",
                           "FINE_TUNE_SCHEDULE=cosine", "WARMUP_EPOCHS=1"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    assert "--label-smoothing '0.1' --weight-decay '0.05' --fine-tune-schedule 'cosine' --warmup-epochs '1'" in made


def test_a_bad_knob_on_the_command_line_is_one_line(class_folder, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--dataset", str(class_folder), "--fine-tune-schedule", "linear"])
    assert "argument --fine-tune-schedule: invalid choice: 'linear'" in capsys.readouterr().err
    assert main(["train", "--dataset", str(class_folder), "--label-smoothing", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: label_smoothing must be a number >= 0 and < 1, got 1.0"
    assert main(["train", "--dataset", str(class_folder), "--warmup-epochs", "5"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: warmup_epochs 5 must be fewer than fine_tune_epochs 5")
