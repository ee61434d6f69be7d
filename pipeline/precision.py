"""Which numeric precision a run computes in, chosen to fit the device it runs on.

``mixed_precision`` (a ``RunConfig`` setting, the sweep YAML key, ``make train MIXED_PRECISION=``) is
one of ``SETTINGS``. ``auto`` (the default) resolves, per process, against the devices TensorFlow sees:

- a GPU of compute capability >= 8.0 (A100, H100, L4, RTX 30xx/40xx): ``mixed_bfloat16``, bfloat16
  compute with float32 weights; bfloat16 has float32's range, so no loss scaling is needed;
- an older GPU (V100, T4): ``mixed_float16``; Keras 3 wraps the optimizer in a ``LossScaleOptimizer``
  when a model with that policy is compiled (``compile(auto_scale_loss=True)``, its default);
- no GPU: ``float32`` (mixed precision on a CPU is slower, not faster).

The softmax output is float32 whatever the policy (``pipeline.model``). ``resolve`` is a pure
function of the device list, so it is tested here with made-up device details.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Sequence

from pipeline.errors import UserError

AUTO = "auto"
FLOAT32, MIXED_FLOAT16, MIXED_BFLOAT16 = "float32", "mixed_float16", "mixed_bfloat16"
POLICIES = (FLOAT32, MIXED_FLOAT16, MIXED_BFLOAT16)  # Keras dtype policy names
# true/false were the setting before `auto`: true meant float16 compute.
ALIASES: dict[Any, str] = {True: MIXED_FLOAT16, False: FLOAT32, "true": MIXED_FLOAT16, "false": FLOAT32}
SETTINGS = (AUTO, *POLICIES, "true", "false")
BF16_MIN_CAPABILITY = (8, 0)  # Ampere and later compute bfloat16 natively

Device = Mapping[str, Any]  # {"device_type": "GPU", "device_name": ..., "compute_capability": (8, 0)}


def setting(value: Any, where: str = "") -> str:
    """A user's ``mixed_precision`` as ``auto`` or a policy name; anything else is a ``UserError``
    (``where``: the sweep file or "the command line", named in the message)."""
    if isinstance(value, str):
        value = value.strip().lower()
    if isinstance(value, bool) or value in ("true", "false"):
        return ALIASES[value]
    if value in (AUTO, *POLICIES):
        return value
    raise UserError(f"mixed_precision {value!r}{' in ' + where if where else ''} is not one of {', '.join(SETTINGS)} (auto: bfloat16 on GPUs of "
                    "compute capability 8.0 and up, float16 below, float32 on CPU; true means mixed_float16)")


def resolve(value: Any, devices: Sequence[Device]) -> str:
    """The Keras dtype policy for ``value`` on these devices (the first GPU is the one Keras uses)."""
    chosen = setting(value)
    if chosen != AUTO:
        return chosen
    gpus = [d for d in devices if d.get("device_type", "GPU") == "GPU"]
    if not gpus:
        return FLOAT32
    capability = tuple(gpus[0].get("compute_capability") or (0, 0))
    return MIXED_BFLOAT16 if capability >= BF16_MIN_CAPABILITY else MIXED_FLOAT16


@functools.lru_cache(maxsize=1)
def local_devices() -> tuple[dict[str, Any], ...]:
    """The GPUs this process's TensorFlow sees, with name and compute capability (empty without GPUs).

    Listing physical devices does not allocate GPU memory; memory growth is switched on first.
    """
    import tensorflow as tf

    enable_memory_growth()
    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except (ValueError, RuntimeError):  # no details on some platforms
            details = {}
        found.append({"device_type": "GPU", "index": int(gpu.name.rsplit(":", 1)[-1]),
                      "device_name": details.get("device_name", "unknown GPU"),
                      "compute_capability": details.get("compute_capability")})
    return tuple(found)


def enable_memory_growth() -> None:
    """Let TensorFlow take GPU memory as it needs it instead of all of it at start, on every visible GPU.

    Must run before TensorFlow initializes the GPUs; the entry points also set ``TF_FORCE_GPU_ALLOW_GROWTH``
    in the environment, which TensorFlow reads at that moment, so a late call changes nothing and is harmless.
    """
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialized: the environment variable has done it
            pass


def describe(devices: Sequence[Device], visible: str | None = None) -> str:
    """The device a run computes on, as recorded in its ``device`` param: ``GPU:0 NVIDIA H100 80GB HBM3
    (CUDA_VISIBLE_DEVICES=1)`` or ``CPU (CUDA_VISIBLE_DEVICES=0)``; the pin is left out when there is none."""
    gpus = [d for d in devices if d.get("device_type", "GPU") == "GPU"]
    if gpus:
        first = gpus[0]
        text = f"GPU:{first.get('index', 0)} {first.get('device_name', 'unknown GPU')}"
    else:
        text = "CPU"
    return text if visible is None else f"{text} (CUDA_VISIBLE_DEVICES={visible})"


def this_device() -> str:
    """``describe`` for this process: what its TensorFlow sees and how it was pinned."""
    return describe(local_devices(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def policy_for(value: Any) -> str:
    """``resolve`` on this process's devices."""
    chosen = setting(value)
    return chosen if chosen != AUTO else resolve(chosen, local_devices())
