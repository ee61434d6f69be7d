"""Typed settings, one parser: the sweep file, the flags and the TLSWEEP_* environment are declared once
(pipeline/settings.py, pipeline/hparams.py, sweeps/config.py, the commands' options) and checked there."""

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.hparams import SEED_MAX, RunConfig, check
from pipeline.settings import environment, fields_of
from sweeps import main as tlsweep
from sweeps.config import MAX_TRIALS, load_sweep, parse_sweep

ROOT = Path(__file__).resolve().parents[2]


def _sweep_file(tmp_path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    path = _sweep_file(tmp_path, "tuner: random\nmax_trials: 3\nspace:\n  dropout: {fixed: 0.1}\n  dropout: "
                                 "{fixed: 0.3}\n")
    with pytest.raises(UserError) as e:
        load_sweep(path)
    assert str(e.value) == (f"sweep file {path} is not valid YAML: key 'dropout' is given twice, on line 4 and line 5 "
                            "(the second would silently win); keep one")


def test_a_number_written_1e_3_is_a_number(tmp_path):
    config = load_sweep(_sweep_file(tmp_path, "space:\n  learning_rate: {float: [1e-4, 1e-2], sampling: log}\n"
                                              "  fine_tune_learning_rate: {fixed: 1e-5}\n"))
    assert config.space["learning_rate"]["float"] == [1e-4, 1e-2]
    assert config.space["fine_tune_learning_rate"] == {"fixed": 1e-5}
    assert check(RunConfig(learning_rate="1e-3")).learning_rate == 1e-3  # text from elsewhere is read as a number


@pytest.mark.parametrize("raw,message", [
    ({"stage2": 5}, "stage2 in sweep t must be a mapping with keys top_k, trials_per_config, space, got 5"),
    ({"stage2": {"top_k": 0}}, "top_k in sweep t (stage2) must be a whole number >= 1, got 0"),
    ({"stage2": {"top_k": 1}, "space": {"fine_tune_at": {"fixed": 0.5}}},
     "the space of sweep t sets fine_tune_at, which a staged search does not use: stage 1 trains heads only and "
     "stage 2 fine-tunes over stage2's space; move fine_tune_at under stage2: space:"),
    ({"stage2": {"top_k": 1}, "space": {"fine_tune": {"fixed": True}}},
     "the space of sweep t sets fine_tune, which a staged search does not use: stage 1 trains heads only and stage 2 "
     "fine-tunes over stage2's space; remove fine_tune (the stages set it)"),
    ({"seed": SEED_MAX + 1}, f"seed in sweep t must be a whole number <= {SEED_MAX}, got {SEED_MAX + 1}"),
    ({"max_trials": 10**12}, f"max_trials in sweep t must be a whole number <= {MAX_TRIALS}, got {10**12}"),
    ({"hyperband": {"max_epochs": 0, "factr": 3}},
     "max_epochs in sweep t (hyperband) must be a whole number >= 1, got 0\nunknown key(s) ['factr'] in sweep t "
     "(hyperband); known keys: max_epochs, factor, iterations"),
], ids=["stage2-not-mapping", "stage2-top-k", "staged-fine-tune-at", "staged-fine-tune", "seed", "max-trials",
        "two-problems"])
def test_bad_values_are_one_line_each(raw, message):
    with pytest.raises(UserError) as e:
        parse_sweep(raw, "t")
    assert str(e.value) == message


def test_the_shipped_staged_sweep_is_accepted_and_a_seed_beyond_numpy_is_refused_for_train_too():
    assert load_sweep("tf_flowers_staged").stage2["top_k"] == 3
    with pytest.raises(UserError, match=rf"^seed must be a whole number <= {SEED_MAX}, got {SEED_MAX + 1}$"):
        check(RunConfig(seed=SEED_MAX + 1))


def test_every_run_config_field_is_a_train_flag_with_its_declared_default():
    parser = tlsweep.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # argparse keeps subparsers here
    flags = {a.dest: a for a in train._actions}
    for name, field in fields_of(RunConfig).items():
        if name == "fine_tune":  # train fine-tunes unless --fine-tune-at none / --fine-tune-epochs 0
            continue
        assert name in flags, name
        assert flags[name].default == field.default, name
    assert flags["epochs"].help == "head epochs with the backbone frozen (default: 10)"


def test_errors_name_the_flag_and_one_line_per_problem(capsys, class_folder):
    assert tlsweep.main(["sweep", "--dataset", str(class_folder), "--sweep", "quick", "--max-trials", "0",
                         "--seed", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --max-trials must be a whole number >= 1, got 0\n"
                   "--seed must be a whole number >= 0, got -1\n")
    assert tlsweep.main(["predict", "--model", "m", "--images", "i", "--top-k", "0"]) == 2
    assert capsys.readouterr().err == "error: --top-k must be a whole number >= 1, got 0\n"


def test_the_gpu_launcher_forwards_flags_the_parser_reads_back():
    from pipeline.settings import to_argv

    values = {"dataset": "my photos", "experiment": "e 1", "max_trials": 5, "quiet": True, "verbose": False,
              "seed": None}
    args = tlsweep.build_parser().parse_args(["sweep", *to_argv(values)])
    assert (args.dataset, args.experiment, args.max_trials, args.quiet, args.verbose, args.seed) == (
        "my photos", "e 1", 5, True, False, None)


def test_bad_environment_variables_are_one_line_each(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path / "file"))
    monkeypatch.setenv("TLSWEEP_WORKER_TIMEOUT", "ten")
    with pytest.raises(UserError) as e:
        environment()
    assert str(e.value).splitlines() == [
        f"TLSWEEP_CACHE='{tmp_path / 'file'}' is a file, not a folder; point it at a folder (it holds tlsweep's "
        "caches) or unset it for ~/.cache/tlsweep",
        "TLSWEEP_WORKER_TIMEOUT='ten' is not a number of seconds above 0; unset it for 600"]
    monkeypatch.setenv("TLSWEEP_WORKER_TIMEOUT", "")  # empty: unset
    monkeypatch.setenv("TLSWEEP_CACHE", str(tmp_path))
    assert environment().worker_timeout == 600 and environment().cache == tmp_path


def test_a_bad_sweep_file_fails_before_tensorflow_is_imported(tmp_path, class_folder):
    """A fresh process: the sweep file and the flags are checked before the 5 s import of TensorFlow."""
    bad = _sweep_file(tmp_path, "tuner: random\nmax_trials: 3\ntuner: grid\n")
    code = ("import sys; from sweeps.main import main; code = main(sys.argv[1:]); "
            "print('tensorflow' in sys.modules, code)")
    for args in (["--sweep", bad], ["--sweep", "quick", "--max-trials", "0"]):
        out = subprocess.run([sys.executable, "-c", code, "sweep", "--dataset", str(class_folder), *args],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.stdout.split() == ["False", "2"], out.stdout + out.stderr
        assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr and "pydantic" not in out.stderr


def _make(*args: str) -> list[str]:
    """The tlsweep command line ``make -n`` would run, as the shell would split it."""
    out = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if k != "MAKEFLAGS"})
    assert out.returncode == 0, out.stderr
    line = [line for line in out.stdout.splitlines() if "sweeps.main" in line][-1]
    return shlex.split(line)[line.split().index("sweeps.main") + 1:]


def test_make_forwards_set_variables_as_flags_and_keeps_a_name_with_spaces_whole():
    assert _make("sweep", "DATASET=my photos", "EXPERIMENT=my photos", "QUIET=1", "MAX_TRIALS=4") == [
        "sweep", "--dataset", "my photos", "--experiment", "my photos", "--max-trials", "4", "--quiet"]
    assert _make("best-export", "EXPERIMENT=it's mine", "OVERWRITE=1") == [
        "best-export", "--experiment", "it's mine", "--overwrite"]
    for off in ("0", "false", "no", "off", "NO"):  # a switch set off is off, not the bare flag
        assert _make("best-export", "EXPERIMENT=e", f"OVERWRITE={off}", f"REFIT={off}") == [
            "best-export", "--experiment", "e"]
    assert _make("best-export", "EXPERIMENT=e", "REFIT=yes") == ["best-export", "--experiment", "e", "--refit"]
    assert _make("train", "DATASET=d", "FINE_TUNE_AT=none", "ARGS=--seed 3") == [
        "train", "--dataset", "d", "--fine-tune-at", "none", "--seed", "3"]
    assert _make("sweep-worker", "DATASET=d", "WORKER=w1") == ["sweep", "--role", "worker", "--dataset", "d",
                                                               "--worker-id", "w1"]


def test_make_train_has_a_variable_for_every_run_config_field():
    makefile = (ROOT / "Makefile").read_text()
    train_vars = makefile[makefile.index("TRAIN_VARS :="):makefile.index("SWEEP_VARS :=")]
    for f in dataclasses.fields(RunConfig):
        if f.name != "fine_tune":
            assert f.name.upper() in train_vars, f"Makefile TRAIN_VARS lacks {f.name.upper()}"
