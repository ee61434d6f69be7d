"""The whole space is checked before the first trial: one line each, exit 2, before any run or state exists."""

import re

import pytest
import yaml

from sweeps.cli import main

STARTUP = re.compile(r"^(WARNING: All log messages before absl|I0000 |E0000 |W0000 |To enable the following)")

BAD_SPACES = [
    ({"space": {"backbone": {"choice": ["efficientnet_lite0", "efficientnet_lite9"]}}},
     "error: sweep {yaml}: no trial can run with backbone='efficientnet_lite9', fine_tune=True, fine_tune_at=0.75, image_size=0: "
     "unknown backbone 'efficientnet_lite9'; known backbones: "),
    ({"space": {"epochs": {"fixed": 0}}},
     "error: sweep {yaml}: no trial can run with epochs=0: epochs must be a whole number >= 1, got 0"),
    ({"space": {"batch_size": {"choice": [0, 32]}}},
     "error: sweep {yaml}: no trial can run with batch_size=0: batch_size must be a whole number >= 1, got 0"),
    ({"space": {"dropout": {"float": [0.0, 1.5]}}},
     "error: sweep {yaml}: no trial can run with dropout=1.5: dropout must be a number >= 0 and < 1, got 1.5"),
    ({"space": {"fine_tune_at": {"choice": [100, 200]}}},
     "error: sweep {yaml}: no trial can run with backbone='efficientnet_lite0', fine_tune=True, fine_tune_at=200, image_size=0: "
     "fine_tune_at 200 is beyond the depth of efficientnet_lite0 (141 layers)"),
    ({"space": {"backbone": {"fixed": "xception"}, "image_size": {"fixed": 32}, "weights": {"fixed": "none"}}},
     "error: sweep {yaml}: no trial can run with backbone='xception', fine_tune=True, fine_tune_at=0.75, image_size=32: image size 32 "
     "is too small for backbone 'xception'"),
    ({"space": {"learning_rate": {"choice": [0.001, -1]}}},
     "error: sweep {yaml}: no trial can run with learning_rate=-1: learning_rate must be a number > 0, got -1"),
    ({"space": {"weights": {"fixed": "/no/such.weights.h5"}}},
     "error: sweep {yaml}: no trial can run with weights='/no/such.weights.h5': weights '/no/such.weights.h5' is not "
     "'imagenet', 'none' or an existing weights file"),
    ({"seed": "abc"}, "error: seed in sweep {yaml} must be a whole number >= 0, got 'abc'"),
    ({"space": {"learning_rate": {"float": [1.0e-4, 1.0e-2], "sampling": "logarithmic"}}},
     "error: sampling 'logarithmic' of 'learning_rate' in sweep {yaml} is not one of linear, log, reverse_log"),
    ({"space": {"learning_rate": {"float": [0, 1.0e-2], "sampling": "log"}}},
     "error: log sampling of 'learning_rate' in sweep {yaml} needs a range above 0, got [0, 0.01]"),
    ({"space": {"dropout": {"float": [0.0, 0.5], "step": 0}}},
     "error: step of 'dropout' in sweep {yaml} must be a number above 0 (whole for int), got 0"),
    ({"tuner": "hyperband", "hyperband": {"max_epochs": 0}},
     "error: max_epochs in sweep {yaml} (hyperband) must be a whole number >= 1, got 0"),
    ({"space": {"epochs": {"int": [1, "ten"]}}},
     "error: 'int' of 'epochs' in sweep {yaml} must be [low, high] with low <= high, got [1, 'ten']"),
    ({"max_consecutive_failed_trials": 0},
     "error: max_consecutive_failed_trials in sweep {yaml} must be a whole number >= 1, got 0"),
    ({"mixed_precision": "yes"}, "error: mixed_precision 'yes' in {yaml} is not one of auto, float32, mixed_float16, "
                                 "mixed_bfloat16, true, false"),
    ({"xla": "yes"}, "error: xla in sweep {yaml} must be true or false, got 'yes'"),
    ({"space": {"fine_tune": {"boolean": True}, "fine_tune_epochs": {"int": [-1, 2]}}},
     "error: sweep {yaml}: no trial can run with fine_tune_epochs=-1: fine_tune_epochs must be a whole number >= 0"),
]


@pytest.mark.parametrize("raw,message", BAD_SPACES, ids=[str(i) for i in range(len(BAD_SPACES))])
def test_a_space_no_trial_can_run_is_one_line_before_any_run(tmp_path, class_folder, monkeypatch, capsys, raw,
                                                              message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["sweep", "--dataset", str(class_folder), "--sweep", str(path), "--state-dir", "state"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    lines = [line for line in err.splitlines() if not STARTUP.match(line)]  # TensorFlow's, once per test process
    assert len(lines) == 1 and lines[0].startswith(message.format(yaml=path)), err
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.glob("state/*/*/oracle.json"))


def test_backbones_without_weights_here_leave_the_space_with_a_line_each(monkeypatch, tmp_path, capsys):
    from pipeline import backbones
    from pipeline.errors import UserError
    from sweeps.config import parse_sweep
    from sweeps.space import fit_to_machine

    monkeypatch.setattr(backbones, "internet_available", lambda *a, **k: False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no keras.applications weights cached here
    config = parse_sweep({"space": {"backbone": {"choice": ["efficientnet_lite0", "xception", "efficientnet_lite2"],
                                                 "default": "xception"}}}, "t")
    fitted = fit_to_machine(config)
    assert fitted.space["backbone"] == {"choice": ["efficientnet_lite0", "efficientnet_lite2"],
                                        "default": "efficientnet_lite0"}
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[sweep] backbone xception leaves the search: backbone 'xception' needs internet")
    assert fit_to_machine(parse_sweep({"space": {"backbone": {"choice": ["efficientnet_lite0", "xception"]}}},
                                      "t")).space["backbone"] == {"fixed": "efficientnet_lite0"}
    assert fit_to_machine(config.__class__(name="t")) == config.__class__(name="t")  # the default backbone: offline
    with pytest.raises(UserError, match=r"sweep t: no backbone of \['xception', 'resnet50'\] has weights on this "
                                        r"machine; xception: backbone 'xception' needs internet"):
        fit_to_machine(parse_sweep({"space": {"backbone": {"choice": ["xception", "resnet50"]}}}, "t"))


def test_a_staged_search_checks_heads_for_every_backbone_and_fine_tuning_for_single_ones():
    from pipeline.errors import UserError
    from sweeps.config import parse_sweep
    from sweeps.space import check_sweep

    staged = {"space": {"backbone": {"choice": ["efficientnet_lite0", "efficientnet_lite0+efficientnet_lite1"]}},
              "stage2": {"space": {"fine_tune_at": {"choice": [0.5, 0.9]}}}}
    check_sweep(parse_sweep(staged, "t"))  # the ensemble trains its head in stage 1 only: fine
    with pytest.raises(UserError, match=r"no trial can run with backbone='efficientnet_lite0', fine_tune=True, "
                                        r"fine_tune_at=500"):
        check_sweep(parse_sweep({**staged, "stage2": {"space": {"fine_tune_at": {"choice": [0.5, 500]}}}}, "t"))
    with pytest.raises(UserError, match=r"is an ensemble: it trains its head only and does not fine-tune"):
        check_sweep(parse_sweep({"space": {**staged["space"], "fine_tune": {"boolean": True}}}, "t"))
    check_sweep(parse_sweep({"space": {**staged["space"], "fine_tune": {"fixed": False}}}, "t"))
