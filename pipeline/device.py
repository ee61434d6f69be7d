"""Which device a run is meant for, and never a silent fall back to the CPU.

Since TensorFlow 2.14 the Linux wheel finds a GPU only when the CUDA 12 / cuDNN 9 libraries are there
(``pip install tensorflow[and-cuda]``, our ``gpu`` extra, brings them). Without them TensorFlow runs on
the CPU, 20 to 100 times slower, and says so only in start-up lines. So a run is *meant* for a GPU when
``nvidia-smi`` lists one for this process (narrowed by ``CUDA_VISIBLE_DEVICES``), when ``GPUS=`` names
GPUs, or with ``--device gpu``; if TensorFlow then sees none, ``train`` and ``sweep`` stop with one line
naming the cause and the fix (``refuse_cpu``), and so does a trial (``check_trial``). ``--device cpu``
(``DEVICE=cpu``; ``TLSWEEP_DEVICE`` for the processes a command starts) runs on the CPU on purpose.

``nvidia-smi`` is asked, not TensorFlow, for what the machine has: it answers in milliseconds, holds
no GPU and needs no CUDA library. ``refusal`` and ``causes`` are pure: the tests give them made-up facts.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
from typing import Any, Literal, Mapping, Sequence

from pipeline.errors import UserError, typed

AUTO, CPU, GPU = "auto", "cpu", "gpu"
SETTINGS = (AUTO, CPU, GPU)
Setting = Literal["auto", "cpu", "gpu"]  # SETTINGS as the type of the commands' --device
ENV = "TLSWEEP_DEVICE"  # the setting, passed on to the processes a command starts (trials, GPU workers)
# The oldest Linux driver for CUDA 12.x (minor-version compatibility), as TensorFlow's pip install page states it.
DRIVER_MIN = "525.60.13"
# What the TensorFlow 2.18-2.21 Linux wheels load for a GPU: (library, the pip package of the gpu extra that has it)
LIBRARIES = (("libcudart.so.12", "nvidia-cuda-runtime-cu12"), ("libcublas.so.12", "nvidia-cublas-cu12"),
             ("libcudnn.so.9", "nvidia-cudnn-cu12"))
INSTALL_FIX = ("install the gpu extra: make install GPU=1 (or pip install 'tlsweep[gpu]', which brings "
               "tensorflow[and-cuda])")
CPU_ANYWAY = "or run on the CPU on purpose with --device cpu (make ... DEVICE=cpu)"
HELP = ("auto (default): a GPU where nvidia-smi lists one (or GPUS= names them), and stop when TensorFlow sees "
        "none; cpu: the CPU on purpose; gpu: a GPU or stop (default: $TLSWEEP_DEVICE, else auto)")
_FIELDS = "index,uuid,name,memory.total,driver_version,compute_cap"


@dataclasses.dataclass(frozen=True)
class ListedGpu:
    """One GPU as ``nvidia-smi`` lists it."""

    index: str
    uuid: str
    name: str
    memory_mib: int | None
    driver: str
    compute_capability: str | None  # "9.0"; None from drivers older than 510, which cannot say

    def describe(self) -> str:
        extra = [f"compute {self.compute_capability}"] if self.compute_capability else []
        extra += [f"{self.memory_mib} MiB"] if self.memory_mib else []
        return f"{self.index}: {self.name}" + (f" ({', '.join(extra)})" if extra else "")


def nvidia_smi() -> tuple[list[ListedGpu], str | None]:
    """Every GPU ``nvidia-smi`` lists, and its error if it is there but fails (a driver not loaded)."""
    return _query(shutil.which("nvidia-smi"))


@functools.lru_cache(maxsize=4)
def _query(smi: str | None) -> tuple[list[ListedGpu], str | None]:
    if smi is None:
        return [], None
    fields = _FIELDS
    for _ in range(2):  # drivers older than 510 do not know compute_cap: asked again without it
        try:
            out = subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            return [], f"{smi} could not run ({e})"
        if out.returncode == 0:
            return [_row(line, fields) for line in out.stdout.splitlines() if line.strip()], None
        if "compute_cap" not in out.stdout + out.stderr:
            break
        fields = fields.removesuffix(",compute_cap")
    said = (out.stdout + out.stderr).strip().splitlines()
    return [], f"{smi} failed (exit {out.returncode}): {said[0] if said else 'no output'}"


def _row(line: str, fields: str) -> ListedGpu:
    parts = [p.strip() for p in line.split(",")]
    n = len(fields.split(","))
    name = ", ".join(parts[2:len(parts) - (n - 3)])  # a name holding commas keeps them
    index, uuid, (memory, driver, *cap) = parts[0], parts[1], parts[len(parts) - (n - 3):]
    return ListedGpu(index, uuid, name, int(memory) if memory.isdigit() else None, driver,
                     cap[0] if cap and cap[0][:1].isdigit() else None)


def visible(gpus: Sequence[ListedGpu], env: Mapping[str, str] | None = None) -> list[ListedGpu]:
    """The listed GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs) narrows them."""
    env = os.environ if env is None else env
    pin = env.get("CUDA_VISIBLE_DEVICES")
    if pin is None:
        return list(gpus)
    allowed = [p.strip() for p in pin.split(",") if p.strip()]
    return [g for g in gpus if g.index in allowed or g.uuid in allowed]


def listed_gpus(env: Mapping[str, str] | None = None) -> list[ListedGpu]:
    """The GPUs ``nvidia-smi`` lists for this process (none without ``nvidia-smi``)."""
    return visible(nvidia_smi()[0], env)


def setting(flag: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``--device``, else ``$TLSWEEP_DEVICE``, else ``auto``; anything else is a ``UserError``."""
    env = os.environ if env is None else env
    value = (flag or env.get(ENV) or AUTO).strip().lower()
    if value not in SETTINGS:
        given = f"--device {flag!r}" if flag else f"{ENV}={env.get(ENV)!r}"
        raise UserError(f"{given} is not one of {', '.join(SETTINGS)} (auto: a GPU when nvidia-smi lists one; "
                        "cpu: the CPU on purpose; gpu: a GPU or stop)")
    return value


# -- why TensorFlow sees no GPU ----------------------------------------------------------------------


def build_info() -> dict[str, Any]:
    """TensorFlow's build: whether it is a CUDA build and the CUDA / cuDNN versions it was built for."""
    import tensorflow as tf

    info = dict(tf.sysconfig.get_build_info())
    return {"tensorflow": tf.__version__, "is_cuda_build": bool(info.get("is_cuda_build")),
            "cuda_version": info.get("cuda_version"), "cudnn_version": info.get("cudnn_version")}


def nvidia_packages() -> dict[str, str]:
    """The ``nvidia-*`` pip packages installed (what ``tensorflow[and-cuda]`` brings), with their versions."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-"):
            found[name] = dist.version
    return dict(sorted(found.items()))


def cuda_libraries() -> dict[str, str | None]:
    """Where each library of ``LIBRARIES`` is: in a pip package (``site-packages/nvidia/*/lib``, where
    TensorFlow looks), on the system's library path (ctypes loads it), or ``None``: missing."""
    found: dict[str, str | None] = {}
    for library, _ in LIBRARIES:
        hits = [hit for entry in sys.path if entry
                for hit in glob.glob(os.path.join(entry, "nvidia", "*", "lib", library))]
        if hits:
            found[library] = hits[0]
            continue
        try:
            ctypes.CDLL(library)
            found[library] = "system"
        except OSError:
            found[library] = None
    return found


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def causes(listed: Sequence[ListedGpu], build: Mapping[str, Any], libraries: Mapping[str, str | None],
           smi_error: str | None = None) -> list[tuple[str, str]]:
    """``(cause, fix)`` of each reason found why TensorFlow would see no GPU; empty when none is found."""
    if not listed:  # no GPU here: nothing else matters
        return [(f"nvidia-smi {'fails: ' + smi_error if smi_error else 'lists no GPU for this process'}",
                 "run on a machine with an NVIDIA GPU and its driver (nvidia-smi must list it), and check "
                 "CUDA_VISIBLE_DEVICES")]
    found = []
    if not build.get("is_cuda_build", True):
        found.append((f"this TensorFlow {build.get('tensorflow', '')} is built without CUDA (a CPU-only package)",
                      INSTALL_FIX))
    old = sorted({g.driver for g in listed if g.driver and _version(g.driver) < _version(DRIVER_MIN)})
    if old:
        found.append((f"NVIDIA driver {', '.join(old)} is older than {DRIVER_MIN}, the oldest for CUDA 12",
                      f"update the NVIDIA driver to {DRIVER_MIN} or later"))
    missing = [name for name, where in libraries.items() if where is None]
    if missing and build.get("is_cuda_build", True):
        cuda = f"CUDA {build.get('cuda_version') or '12'} / cuDNN {build.get('cudnn_version') or '9'}"
        found.append((f"the {cuda} libraries TensorFlow {build.get('tensorflow', '')} needs are not installed "
                      f"({', '.join(missing)} not found)", INSTALL_FIX))
    return found


def explain(found: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """``causes`` as one cause and one fix text (an unknown cause when none was found)."""
    found = list(found) or [("TensorFlow could not initialize them (its start-up lines above say why)",
                             "run `tlsweep doctor` (make doctor) and fix what it marks as a problem")]
    return "; ".join(cause for cause, _ in found), "; ".join(dict.fromkeys(fix for _, fix in found))


def refusal(meant: str, seen: Sequence[Any], found: Sequence[tuple[str, str]]) -> str | None:
    """The one line that stops a run meant for a GPU (``meant``: why, e.g. "nvidia-smi lists 2 GPUs (...)")
    when TensorFlow sees none (``seen``: its GPUs); ``None`` when it may go on."""
    if not meant or seen:
        return None
    why, fix = explain(found)
    return f"{meant}, but TensorFlow sees no GPU: {why}. Fix: {fix}; {CPU_ANYWAY}"


def meant_for_gpu(device: str, listed: Sequence[ListedGpu], gpus: str | None = None) -> str:
    """Why a run is meant for a GPU, in words ("" when it is not): ``--device gpu``, ``GPUS=``, or nvidia-smi."""
    if device == CPU:
        return ""
    if listed:
        n = len(listed)
        return f"nvidia-smi lists {n} GPU{'s' if n != 1 else ''} ({', '.join(f'{g.index}: {g.name}' for g in listed)})"
    if gpus:
        return f"{typed(f'--gpus {gpus}', f'GPUS={gpus}')} asks for GPUs"
    return "--device gpu asks for a GPU" if device == GPU else ""


def _check(device: str, gpus: str | None = None, prefix: str = "") -> None:
    meant = meant_for_gpu(device, listed_gpus(), gpus)
    if not meant:
        return
    from pipeline.precision import local_devices

    seen = local_devices()
    if seen:
        return
    listed, error = nvidia_smi()
    line = refusal(prefix + meant, seen, causes(visible(listed), build_info(), cuda_libraries(), error))
    if line:
        raise UserError(line)


def refuse_cpu(flag: str | None = None, gpus: str | None = None) -> str:
    """Before ``train`` or a sweep's first trial: a ``UserError`` when the run is meant for a GPU and TensorFlow
    sees none. Returns the device setting, also put in ``$TLSWEEP_DEVICE`` for the processes the command starts."""
    device = setting(flag)
    os.environ[ENV] = device
    _check(device, gpus)
    return device


def check_trial() -> None:
    """Where a trial starts: a trial meant for a GPU (``$TLSWEEP_DEVICE``, what nvidia-smi lists for its
    process) that would run on the CPU fails instead of finishing."""
    _check(setting(), prefix="this trial was meant for a GPU: ")
