"""Start TensorFlow without the lines it prints on every start on a CPU machine.

TensorFlow writes them from C++ before its logging is configured, so ``TF_CPP_MIN_LOG_LEVEL`` does not
stop them (measured with TF 2.21: ``WARNING: All log messages before absl::InitializeLog() …``,
``oneDNN custom operations are on …``, ``Could not find cuda drivers …``, and at the first device
query ``E0000 … failed call to cuInit``). The CLIs import TensorFlow through ``start_tensorflow``,
which holds back those lines, and only those, and passes every other line through.

Where ``nvidia-smi`` lists a GPU for the process, the CUDA lines are not noise but the diagnosis (why
TensorFlow sees no GPU: ``Could not find cuda drivers``, ``failed call to cuInit``): there only the others
are held back (``startup_noise``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

# Said once here: nothing in them is actionable on a machine without a GPU.
CPU_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog"
    r"|[IWE]\d{4} .*(port\.cc:\d+\] oneDNN custom operations|cudart_stub|cuda_platform|cuda_executor|cuda_diagnostics"
    r"|cpu_feature_guard|cuda_fft|cuda_dnn|cuda_blas|cuInit)"
    r"|To enable the following instructions|rebuild TensorFlow with the appropriate)"
)
# Where nvidia-smi lists a GPU: the same minus every CUDA line but the factories' double registration.
GPU_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog"
    r"|[IWE]\d{4} .*(port\.cc:\d+\] oneDNN custom operations|cpu_feature_guard"
    r"|Unable to register cu(DNN|FFT|BLAS) factory)"
    r"|To enable the following instructions|rebuild TensorFlow with the appropriate)"
)


def startup_noise() -> re.Pattern:
    """``GPU_NOISE`` where nvidia-smi lists a GPU for this process (``pipeline.device``), else ``CPU_NOISE``."""
    from pipeline.device import listed_gpus

    return GPU_NOISE if listed_gpus() else CPU_NOISE


STARTUP_NOISE = startup_noise()  # this process's (its trial processes inherit its CUDA_VISIBLE_DEVICES)


def quiet_environment() -> None:
    """Before TensorFlow is imported: C++ messages below FATAL off (errors reach Python as exceptions;
    libjpeg's own lines about a bad file are held back by ``quiet_decoders``; our lines name the file)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def start_tensorflow() -> None:
    """Import TensorFlow and let it find its devices, holding back its start-up lines."""
    if "tensorflow" in sys.modules:
        return
    quiet_environment()
    with filtered_stderr(STARTUP_NOISE):
        import tensorflow as tf

        tf.config.list_physical_devices()  # the cuInit attempt happens here, inside the filter


def filter_stderr_for_good(noise: re.Pattern = STARTUP_NOISE) -> None:
    """For a process whose whole stderr should lose ``noise`` (a sweep's trial worker, which imports TensorFlow,
    Keras and TF-Hub at several moments): file descriptor 2 becomes a pipe, and a thread passes every other line on
    to the real stderr."""
    sys.stderr.flush()
    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def relay() -> None:
        with os.fdopen(read, "rb") as lines, os.fdopen(real, "wb", buffering=0) as out:
            for line in lines:
                if not noise.match(line.decode(errors="replace")):
                    out.write(line)

    threading.Thread(target=relay, daemon=True, name="tlsweep-stderr").start()


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern) -> Iterator[None]:
    """Everything written to file descriptor 2 (C++ included) in the block, minus lines matching ``noise``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not noise.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


# What libjpeg (and libpng) write to file descriptor 2 themselves about a bad file, without its name (messages of
# libjpeg's jerror.h; seen here for a truncated JPEG: "Improper call to JPEG library in state 201"). The lines that
# name the skipped files say it instead.
DECODER_NOISE = re.compile(
    r"^(Premature end of JPEG file|Not a JPEG file: .*|Improper call to JPEG library in state \d+"
    r"|Invalid JPEG file structure: .*|Unsupported JPEG process: .*|JPEG datastream contains no image"
    r"|Corrupt JPEG data: .*|Input file read error|Bogus .*|Unsupported marker type .*|Huffman table .* was not defined"
    r"|Quantization table .* was not defined|Empty input file|Invalid SOS parameters.*|Invalid component ID .*"
    r"|Backing store not supported|Sampling factors too large.*|libpng (warning|error): .*)\s*$"
)


@contextlib.contextmanager
def quiet_decoders() -> Iterator[None]:
    """While images are decoded: the image libraries' own unnamed lines about bad files held back."""
    with filtered_stderr(DECODER_NOISE):
        yield
