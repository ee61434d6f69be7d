# tlsweep on a GPU, in a container: `make sweep` with one worker per GPU by default (docs/gpu.md).
#   docker build -t tlsweep-gpu .
#   docker run --rm --gpus all -v "$PWD/runs:/work" -v /path/to/photos:/data:ro tlsweep-gpu
#   docker run --rm --gpus all -v "$PWD/runs:/work" tlsweep-gpu doctor
# The host needs only the NVIDIA driver (525.60.13 or later, for CUDA 12) and the NVIDIA Container Toolkit.
FROM tensorflow/tensorflow:2.21.0-gpu

# make runs the targets; the image's Python has TensorFlow 2.21 already.
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY pipeline pipeline
COPY sweeps sweeps
COPY tracking tracking
# Into the image's Python, beside its TensorFlow: tlsweep with the gpu extra, whose nvidia-* pip packages are the
# CUDA 12 / cuDNN 9 libraries this TensorFlow wheel was built against (TensorFlow finds them next to itself).
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1
RUN python3 -m pip install ".[gpu]"

# (utility: the container toolkit mounts nvidia-smi, which GPUS=all and `make doctor` ask.)
# Everything a sweep writes (mlflow.db, mlartifacts/, sweeps_state/, reports/, the cache): mount a folder on /work.
# The data set: a folder of class subfolders mounted on /data (or DATASET=tf_flowers, downloaded into /work).
WORKDIR /work
ENV TLSWEEP_CACHE=/work/.cache/tlsweep TFDS_DATA_DIR=/work/tensorflow_datasets \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
ENTRYPOINT ["make", "-f", "/app/Makefile", "PY=python3"]
CMD ["sweep", "DATASET=/data", "SWEEP=quick", "GPUS=all"]
