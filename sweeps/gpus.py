"""One trial per GPU behind one command: ``make sweep ... GPUS=all`` (or ``GPUS=0,1,3``).

Keras Tuner leaves one-trial-per-GPU to its user (keras-tuner #220). Here the sweep's command starts,
on 127.0.0.1, what a distributed sweep needs (docs/distributed.md): an ``mlflow server`` over
the user's own store (unless that store already is a server), a chief that serves the oracle and
runs no trials, and one worker per GPU, each pinned with ``CUDA_VISIBLE_DEVICES=<id>`` (ids as
``nvidia-smi`` numbers them: ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) and with GPU memory growth on. Each
worker runs one trial at a time, so each GPU runs one trial at a time. It waits for the chief, then
stops everything it started; Ctrl-C or SIGTERM stops the chief and the workers first (their runs are
closed as KILLED through the server), then the server. The same command again resumes the sweep:
the workers keep their ids (``gpu<id>``), so each one gets back the trial it was running.

The pure parts (``parse_gpus``, ``worker_env``, ``chief_env``) are what the default tests check.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Mapping, Sequence

from pipeline import device, safepath
from pipeline.errors import UserError, typed
from tracking import server

ALL = "all"
STOP_SECONDS = 60.0  # how long stopped workers and the chief get to close their runs before SIGKILL
SERVER_START_SECONDS = 120.0
WORKERS_AFTER_CHIEF_SECONDS = 120.0  # workers leave once the chief's oracle is gone; then they are stopped
_IDS = re.compile(r"^\d+(,\d+)*$")


def parse_gpus(text: str, available: Sequence[str]) -> list[str]:
    """The GPU ids ``GPUS=`` names: ``all`` (every GPU in ``available``) or ``0,1,3``, each once.

    On a machine without GPUs (``available`` empty) explicit ids are accepted: the pinned workers run on
    the CPU (the tests do this); ``all`` is an error there, since it would mean no worker at all.
    """
    value = text.strip().replace(" ", "")
    given = typed(f"--gpus {text!r}", f"GPUS={text!r}")  # as the user typed it
    if value.lower() == ALL:
        if not available:
            raise UserError(f"{typed('--gpus all', 'GPUS=all')}, but no GPU is visible on this machine (nvidia-smi "
                            f"lists none); run without {typed('--gpus', 'GPUS=')} to sweep on the CPU, or give ids "
                            f"({typed('--gpus 0,1', 'GPUS=0,1')}) to run pinned workers on the CPU anyway")
        return list(available)
    if not _IDS.match(value):
        raise UserError(f"{given} is not 'all' or a comma-separated list of GPU ids like 0,1,3 "
                        "(the numbers nvidia-smi shows)")
    ids = value.split(",")
    twice = sorted({i for i in ids if ids.count(i) > 1}, key=int)
    if twice:
        raise UserError(f"{given} names GPU {', '.join(twice)} more than once; give each GPU once "
                        "(one worker per GPU)")
    unknown = [i for i in ids if available and i not in available]
    if unknown:
        raise UserError(f"{given} names GPU {', '.join(unknown)}, but this machine has {len(available)} "
                        f"GPU{'s' if len(available) != 1 else ''} ({', '.join(available)}); give ids among them or "
                        f"{typed('--gpus all', 'GPUS=all')}")
    return ids


def available_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids ``nvidia-smi`` lists (none without it), narrowed to ``CUDA_VISIBLE_DEVICES`` when that is set.

    Asked without TensorFlow, which would take seconds to start here and hold the GPUs (``pipeline.device``).
    """
    return [gpu.index for gpu in device.listed_gpus(env)]


def worker_id(gpu: str) -> str:
    return f"gpu{gpu}"


def worker_env(gpu: str, base: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment: pinned to one GPU (numbered as nvidia-smi numbers them), memory growth on."""
    return {**base, "CUDA_VISIBLE_DEVICES": gpu, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def chief_env(base: Mapping[str, str]) -> dict[str, str]:
    """The chief runs no trials: it sees no GPU, so it holds no GPU memory."""
    return {**base, "CUDA_VISIBLE_DEVICES": ""}


# A chief or worker gets SIGKILL when the launcher dies (even by ``kill -9``; tracking.server.dies_with_parent): the
# server dies with the launcher too (SIGTERM, which it passes on to its workers), so a chief or worker could not close
# its runs anyway, and trying (MLflow retries a server that is gone for minutes) kept them alive. The same command
# again closes those runs ("resume: its process died") and writes out journaled trials.
SWEEP_DEATH_SIGNAL = signal.SIGKILL


# TensorFlow's start-up lines, printed by every process it starts in (not errors: E lines are relayed; nor the
# diagnosis of a GPU TensorFlow cannot use, which a worker lets through where nvidia-smi lists its GPU: tfstart).
_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IW]\d{4} (?!.*Could not find cuda)"
                    r"|To enable the following "
                    r"instructions|rebuild TensorFlow with the appropriate|\U0001f3c3 View run |\U0001f9ea View "
                    r"experiment at)")  # and MLflow's links, printed for every run closed through a server
LAUNCHER = "TLSWEEP_GPU_LAUNCHER"  # set in the chief's and workers' environment: the launcher prints the leaderboard


class Launch:
    """The processes of one GPU sweep: server (if started here), chief, workers. ``stop()`` ends them all."""

    def __init__(self, sweep_args: Sequence[str], gpus: Sequence[str], store_uri: str, log_dir: Path):
        self.sweep_args, self.gpus, self.store_uri, self.log_dir = list(sweep_args), list(gpus), store_uri, log_dir
        self.server: subprocess.Popen | None = None
        self.procs: dict[str, subprocess.Popen] = {}  # chief and workers, by name
        self._relays: list[threading.Thread] = []
        self.uri = store_uri

    # -- starting ---------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.store_uri.startswith(("http://", "https://")):
            self.uri = self._start_server()
        oracle = f"127.0.0.1:{server.free_port()}"
        common = [*self.sweep_args, "--tracking-uri", self.uri, "--oracle", oracle]
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri, LAUNCHER: str(os.getpid())}
        env.pop("KERASTUNER_TUNER_ID", None)
        self._spawn("chief", [*common, "--role", "chief"], chief_env(env))
        for gpu in self.gpus:
            name = worker_id(gpu)
            self._spawn(name, [*common, "--role", "worker", "--worker-id", name], worker_env(gpu, env))
        pins = ", ".join(f"{worker_id(g)} on CUDA_VISIBLE_DEVICES={g}" for g in self.gpus)
        print(f"[gpus] chief on {oracle}, tracking {self.uri}; workers: {pins}", flush=True)

    def _start_server(self) -> str:
        """``mlflow server`` on a free local port over the user's store: what ``make ui``/``make report`` read."""
        log = self.log_dir / "mlflow-server.log"
        try:  # its own process group: stop() ends the server's uvicorn workers with it
            self.server, uri = server.start_local(self.store_uri, self._artifact_root(), log,
                                                  seconds=SERVER_START_SECONDS)
        except RuntimeError as e:
            raise UserError(f"GPUS= shares the store through a local server, and {e}; check the tracking "
                            "store (MLFLOW_TRACKING_URI) and the log's last lines") from None
        return uri

    def _artifact_root(self) -> str:
        """Where the server puts artifacts of experiments it creates: ``mlartifacts/`` beside a SQLite file."""
        if self.store_uri.startswith("sqlite:///"):
            return str(Path(self.store_uri[len("sqlite:///"):]).parent / "mlartifacts")
        return str(Path.cwd() / "mlartifacts")

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        # Own session: a Ctrl-C in the terminal reaches the launcher only, which stops the workers first,
        # the chief next and the server last, so every run can still be closed through it.
        proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "sweep", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True, preexec_fn=server.dies_with_parent(SWEEP_DEATH_SIGNAL))
        self.procs[name] = proc
        relay = threading.Thread(target=_relay, args=(name, proc.stdout), daemon=True, name=f"tlsweep-relay-{name}")
        relay.start()
        self._relays.append(relay)

    # -- waiting and stopping -------------------------------------------------------------------

    def wait(self, poll: float = 0.5) -> int:
        """Until the chief ends; returns its exit code. A worker that dies is reported; its trial goes to
        another worker after ``TLSWEEP_WORKER_TIMEOUT``. If every worker is gone, the sweep stops."""
        chief = self.procs["chief"]
        reported: set[str] = set()
        while chief.poll() is None:
            workers = {n: p for n, p in self.procs.items() if n != "chief"}
            for name, proc in workers.items():
                code = proc.poll()
                if code is not None and code != 0 and name not in reported:
                    reported.add(name)
                    print(f"[gpus] worker {name} exited with code {code}; the chief gives its trial to another "
                          "worker after TLSWEEP_WORKER_TIMEOUT (default 600 s)", file=sys.stderr, flush=True)
            if workers and all(p.poll() is not None for p in workers.values()):
                codes = {n: p.returncode for n, p in workers.items()}
                if any(codes.values()):
                    raise UserError(f"every GPU worker has exited ({', '.join(f'{n}: code {c}' for n, c in codes.items())})"
                                    " before the sweep ended; see their output above, then run the same command "
                                    "again to continue")
            time.sleep(poll)
        deadline = time.monotonic() + WORKERS_AFTER_CHIEF_SECONDS
        for name, proc in self.procs.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.monotonic(), 0.1))
        return chief.returncode

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """The chief, then at once the workers, get ``sig`` (they close their runs as KILLED) and ``STOP_SECONDS`` to
        exit, then SIGKILL; the server goes last. The chief is told first: a chief that saw its workers' trials
        end before its own signal came would finish the sweep as FINISHED. SIGTERM, not SIGINT: a command started in
        the background by a shell without job control (``cmd &`` in a script, CI steps) starts with SIGINT ignored,
        and its children inherit that, so SIGINT stopped nothing there (seen: the workers trained on and the
        sweep ended FINISHED). Safe to call twice."""
        workers = [p for n, p in self.procs.items() if n != "chief"]
        chief = [self.procs["chief"]] if "chief" in self.procs else []
        for proc in chief + workers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
        for group in (workers, chief):
            _reap(group, STOP_SECONDS)
        for proc in workers + chief:  # what they started and left (a trial process): each is its own process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for relay in self._relays:
            relay.join(5)
        if self.server is not None:
            server.stop_group(self.server, 30)  # last, with its uvicorn workers: runs were closed through it


def _reap(procs: Sequence[subprocess.Popen], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _relay(name: str, stream: IO[str]) -> None:
    """A child's output on ours, each line prefixed with its name."""
    for line in stream:
        if not _NOISE.match(line):
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()


def run_on_gpus(gpus: Sequence[str], found_any: bool, sweep_args: Sequence[str], store_uri: str, log_dir: Path) -> int:
    """Run the sweep with one worker per GPU id (``parse_gpus``); returns the chief's exit code.
    Interrupts (Ctrl-C, SIGTERM) stop every process it started before they propagate."""
    if not found_any:
        print(f"[gpus] warning: no GPU visible on this machine; the {len(gpus)} pinned workers run on the CPU",
              file=sys.stderr, flush=True)
    safepath.make_dir(safepath.check_own(log_dir, safepath.STATE, "--state-dir"), safepath.STATE)
    launch = Launch(sweep_args, gpus, store_uri, log_dir)
    try:
        launch.start()
        code = launch.wait()
    except BaseException:
        launch.stop()
        raise
    launch.stop()  # after a clean end only stragglers (none, normally) and the server are left
    return code
