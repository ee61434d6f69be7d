"""Mixed precision that fits the device: the resolution (fake devices), the models it builds, its errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import features, precision
from pipeline.backbones import get_spec
from pipeline.data import load_data
from pipeline.errors import UserError
from pipeline.hparams import RunConfig
from pipeline.model import backbone_of, build_head, build_model, compile_model
from pipeline.recipe import plan

H100 = {"device_type": "GPU", "index": 0, "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0)}
A100 = {"device_type": "GPU", "device_name": "NVIDIA A100-SXM4-80GB", "compute_capability": (8, 0)}
T4 = {"device_type": "GPU", "device_name": "Tesla T4", "compute_capability": (7, 5)}
V100 = {"device_type": "GPU", "device_name": "Tesla V100-SXM2-16GB", "compute_capability": (7, 0)}


@pytest.mark.parametrize("devices,expected", [
    ([], "float32"),  # CPU
    ([H100], "mixed_bfloat16"),
    ([A100], "mixed_bfloat16"),  # exactly 8.0
    ([{"compute_capability": (8, 6)}], "mixed_bfloat16"),
    ([T4], "mixed_float16"),
    ([V100], "mixed_float16"),
    ([T4, H100], "mixed_float16"),  # Keras computes on the first visible GPU
    ([{"device_type": "GPU"}], "mixed_float16"),  # no capability reported: float16, which every GPU has
])
def test_auto_resolves_from_the_device_list(devices, expected):
    assert precision.resolve("auto", devices) == expected


@pytest.mark.parametrize("value,expected", [
    ("float32", "float32"), ("mixed_float16", "mixed_float16"), ("mixed_bfloat16", "mixed_bfloat16"),
    (True, "mixed_float16"), (False, "float32"), ("true", "mixed_float16"), ("False", "float32"),
    (" Mixed_BFloat16 ", "mixed_bfloat16"),
])
def test_explicit_values_win_over_the_device_and_true_false_keep_their_old_meaning(value, expected):
    assert precision.resolve(value, [H100]) == expected
    assert precision.resolve(value, []) == expected


@pytest.mark.parametrize("value", ["fp16", "bf16", "mixed", 16, None, "yes"])
def test_a_bad_value_is_one_line_listing_the_accepted_ones(value):
    with pytest.raises(UserError) as e:
        precision.setting(value)
    assert str(e.value) == (
        f"mixed_precision {value!r} is not one of auto, float32, mixed_float16, mixed_bfloat16, true, false "
        "(auto: bfloat16 on GPUs of compute capability 8.0 and up, float16 below, float32 on CPU; "
        "true means mixed_float16)")


def test_the_sweep_file_and_the_command_line_take_the_same_values(tmp_path):
    from sweeps.config import load_sweep, parse_sweep

    assert parse_sweep({}, name="s").mixed_precision == "auto"
    assert parse_sweep({"mixed_precision": True}, name="s").mixed_precision == "mixed_float16"
    assert parse_sweep({"mixed_precision": "mixed_bfloat16"}, name="s").mixed_precision == "mixed_bfloat16"
    assert parse_sweep({}, name="s").with_overrides(mixed_precision="float32").mixed_precision == "float32"
    (tmp_path / "bad.yaml").write_text("mixed_precision: fp16\n")
    with pytest.raises(UserError, match=r"^mixed_precision 'fp16' in .*bad\.yaml is not one of auto, float32, "
                                        r"mixed_float16, mixed_bfloat16, true, false \(auto: "):
        load_sweep(str(tmp_path / "bad.yaml"))
    with pytest.raises(UserError, match="^mixed_precision 'half' in the command line is not one of auto, "):
        parse_sweep({}, name="s").with_overrides(mixed_precision="half")


def test_make_train_rejects_a_bad_value_in_one_line(class_folder, capsys):
    from pipeline.cli import main

    assert main(["train", "--dataset", str(class_folder), "--mixed-precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mixed_precision 'fp16' is not one of auto, float32, mixed_float16, mixed_bfloat16, "
                          "true, false (auto: ") and "\n" not in err


def test_the_plan_resolves_on_this_machine_without_a_gpu():
    assert precision.local_devices() == (), "this test machine has no GPU"
    assert plan(RunConfig()).precision == "float32"  # auto on CPU
    assert plan(RunConfig(mixed_precision="mixed_bfloat16")).precision == "mixed_bfloat16"
    old = RunConfig.from_json(RunConfig(mixed_precision=False).to_json())  # a run_config logged before `auto`
    assert plan(old).precision == "float32"
    assert precision.this_device() in ("CPU", f"CPU (CUDA_VISIBLE_DEVICES={__import__('os').environ.get('CUDA_VISIBLE_DEVICES')})")


def test_the_device_param_names_the_gpu_and_its_pin():
    assert precision.describe([H100], "1") == "GPU:0 NVIDIA H100 80GB HBM3 (CUDA_VISIBLE_DEVICES=1)"
    assert precision.describe([], "0") == "CPU (CUDA_VISIBLE_DEVICES=0)"
    assert precision.describe([], None) == "CPU"


@pytest.mark.parametrize("policy,compute,loss_scaled", [
    ("mixed_bfloat16", "bfloat16", False),  # bfloat16 has float32's range: no loss scaling
    ("mixed_float16", "float16", True),  # Keras 3 wraps the optimizer when compiling
    ("float32", "float32", False),
])
def test_each_policy_computes_in_its_dtype_with_a_float32_softmax(policy, compute, loss_scaled):
    before = keras.mixed_precision.dtype_policy().name
    model = build_model("efficientnet_lite0", 3, 32, seed=0, precision=policy)
    assert keras.mixed_precision.dtype_policy().name == before, "the global policy is restored"
    assert backbone_of(model).get_layer("top_conv").compute_dtype == compute
    assert model.get_layer("classifier").compute_dtype == "float32"
    probs = model.predict(np.full((2, 32, 32, 3), 128.0, "float32"), verbose=0)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    compile_model(model, 1e-3)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == loss_scaled
    head = build_head(16, 3, precision=policy)
    compile_model(head, 1e-3)
    assert isinstance(head.optimizer, keras.optimizers.LossScaleOptimizer) == loss_scaled


def test_a_float16_model_trains_with_loss_scaling(class_folder):
    from pipeline.training import train

    data = load_data(str(class_folder), 32, seed=0)
    keras.utils.set_random_seed(0)
    model = build_model("efficientnet_lite0", 3, 32, seed=0, precision="mixed_float16")
    result = train(model, data, epochs=2, fine_tune_epochs=0, batch_size=8, seed=0, verbose=0, learning_rate=1e-2,
                   evaluate_test=False)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert all(np.isfinite(result.history["loss"])) and result.history["loss"][-1] < result.history["loss"][0]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_a_mixed_precision_model_exports_and_serves_its_own_outputs(tmp_path, policy):
    from pipeline.export import ExportedModel, export_model

    model = build_model("efficientnet_lite0", 3, 32, seed=0, precision=policy)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    served = ExportedModel(export_model(model, tmp_path / "e", ["a", "b", "c"])).predict(x)
    assert served.dtype == np.float32
    np.testing.assert_allclose(served, model.predict(x, verbose=0), atol=1e-3)


def test_the_feature_cache_key_holds_the_resolved_policy(class_folder):
    data = load_data(str(class_folder), 32, seed=0)
    spec = get_spec("efficientnet_lite0")
    keys = {p: features.key_for(spec, "imagenet", 32, data, p) for p in precision.POLICIES}
    assert len(set(keys.values())) == 3
    # float32 keys are the ones caches were written under before (no cache rebuilt for CPU users)
    assert keys["float32"] == features.feature_key(spec.name, f"imagenet:{spec.weight_source}", 32, spec.preprocessing,
                                                   data, "float32")
    assert plan(RunConfig(image_size=32, mixed_precision="mixed_bfloat16")).feature_key(data) == keys["mixed_bfloat16"]
    assert plan(RunConfig(image_size=32)).feature_key(data) == keys["float32"]


def test_a_failing_gpu_fails_only_its_trial_and_other_errors_stay_bugs():
    from sweeps.trial import TrialFailed, trial_errors

    with pytest.raises(TrialFailed, match=r"^the GPU failed \(CPU.*\): CUDA_ERROR_ILLEGAL_ADDRESS: an "):
        with trial_errors():
            raise tf.errors.InternalError(None, None, "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access\nmore")
    with pytest.raises(tf.errors.InternalError):  # not a GPU's failure: a bug, with its traceback
        with trial_errors():
            raise tf.errors.InternalError(None, None, "something else broke")
