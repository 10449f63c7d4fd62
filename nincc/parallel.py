"""Data-parallel training over the devices of one machine and over many machines.

Caffe's multi-GPU semantics, on JAX's own sharding and multi-process runtime:

- ``batch_size`` in the prototxt is per device. Each device runs the net on its own batch; the
  gradients are averaged over the devices (Caffe 1.0 sums them and scales by 1/solver_count),
  so with batch-mean losses an update equals that of one device running the combined batch.
- One jitted step per iteration: :func:`jax.shard_map` over a 1-D device mesh (axis ``data``)
  runs the iter_size passes on each device's rows, then one ``pmean`` of the gradients (XLA's
  all-reduce), and Caffe's solver update, which every device computes identically: params and
  solver state stay replicated.
- Blobs that forward updates (BatchNorm's running statistics) are averaged over the devices
  at the end of each step, so the replicas stay identical (Caffe lets each GPU keep its own and
  snapshots rank 0's). Batch statistics inside forward are per device, as in Caffe.
- Record ``i`` of a data source goes to rank ``i % world`` (Caffe's DataLayer::Skip); a process
  reads the records of its own devices only (nincc.data.Shard).
- Many machines: ``jax.distributed`` (a coordinator address, the process count and this
  process's id, from flags, ``NINCC_*`` variables or a cluster JAX detects). Only process 0
  writes snapshots, logs, metrics and runs the test nets, as Caffe's root solver does.

A stop or snapshot request (SIGINT, SIGTERM, SIGHUP) of any process rides on the step as a
``pmax``, so all processes act on it after the same iteration.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .data.sources import Shard
from .errors import InputError, NinccError
from .solver import CaffeState, SolverConfig
from .train import StepResult, Trainer, caffe_mean_loss

AXIS = "data"
ENV_COORDINATOR = "NINCC_COORDINATOR"
ENV_NUM_PROCESSES = "NINCC_NUM_PROCESSES"
ENV_PROCESS_ID = "NINCC_PROCESS_ID"
# Set by the supervising process for its worker: the file the worker's native (XLA, gRPC, Gloo)
# log goes to. Not for users.
ENV_WORKER = "NINCC_DISTRIBUTED_WORKER"
REQUESTS = {None: 0, "snapshot": 1, "stop": 2}
REQUEST_NAMES = {v: k for k, v in REQUESTS.items()}
DEFAULT_INIT_TIMEOUT = 120.0
DEFAULT_HEARTBEAT_TIMEOUT = 60
SHUTDOWN_TIMEOUT = 24 * 3600


class DistributedError(NinccError):
    """A multi-device or multi-process run that cannot start or cannot go on."""


# ============================================================================ the cluster


@dataclass(frozen=True)
class Cluster:
    """How this process joins a multi-process job.

    ``coordinator`` is ``host:port`` (process 0 serves it) or ``auto``: JAX reads the cluster
    from the environment a launcher sets (SLURM, Open MPI, ...). ``init_timeout`` bounds the
    wait for the coordinator and all processes; ``heartbeat_timeout`` is how long a silent
    process counts as alive.
    """

    coordinator: str
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: float = DEFAULT_INIT_TIMEOUT
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT

    @property
    def auto(self) -> bool:
        return self.coordinator == "auto"

    @property
    def label(self) -> str:
        """``process I/N`` for messages."""
        if self.process_id is None:
            return "this process"
        return f"process {self.process_id}/{self.num_processes}"


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} is not an integer") from None


def cluster_from(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    init_timeout: float | None = None,
    heartbeat_timeout: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Cluster | None:
    """The job this process belongs to, from flags, then ``NINCC_COORDINATOR``,
    ``NINCC_NUM_PROCESSES`` and ``NINCC_PROCESS_ID``; None when no multi-process run is asked.

    Checks the values (``host:port``, ``0 <= process_id < num_processes``) with one-line errors.
    """
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV_COORDINATOR, "").strip() or None
    if num_processes is None:
        num_processes = _env_int(env, ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(env, ENV_PROCESS_ID)
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise DistributedError(
                "--num-processes / --process-id need --coordinator HOST:PORT (or "
                f"{ENV_COORDINATOR}; 'auto' lets JAX read a SLURM or Open MPI job)"
            )
        return None
    init = DEFAULT_INIT_TIMEOUT if init_timeout is None else float(init_timeout)
    beat = DEFAULT_HEARTBEAT_TIMEOUT if heartbeat_timeout is None else int(heartbeat_timeout)
    if not init > 0 or beat < 1:
        raise DistributedError(
            f"timeouts must be positive: --init-timeout {init}, --heartbeat-timeout {beat}"
        )
    if coordinator != "auto":
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedError(
                f"--coordinator wants HOST:PORT (process 0's address and a free port), "
                f"got {coordinator!r}"
            )
        if num_processes is None or process_id is None:
            raise DistributedError(
                f"--coordinator {coordinator} needs --num-processes N and --process-id I "
                f"(or {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})"
            )
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None:
        if not 0 <= process_id < num_processes:
            raise DistributedError(
                f"--process-id must be in 0..{num_processes - 1} for {num_processes} "
                f"processes, got {process_id}"
            )
    return Cluster(coordinator, num_processes, process_id, init, beat)


def _wait_for_coordinator(host: str, port: int, deadline: float, cluster: Cluster) -> None:
    """Block until a TCP connection to the coordinator succeeds, or fail at ``deadline``."""
    last = ""
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            last = e.strerror or str(e)
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"{cluster.label}: cannot reach the coordinator at {host}:{port} within "
                f"{_seconds(cluster.init_timeout)} s ({last}); start process 0 with the same "
                "--coordinator, check the address and that the port is open "
                "(--init-timeout sets the wait)"
            )
        time.sleep(0.2)


def _seconds(seconds: float) -> str:
    """A duration for messages: ``2``, ``0.5``, ``120``."""
    return f"{seconds:g}"


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check else False


def initialize(cluster: Cluster) -> None:
    """Join the job: ``jax.distributed.initialize`` with CPU collectives over Gloo.

    Must run before any JAX computation (XLA builds its backends once). Processes other than 0
    first wait (up to ``init_timeout``) for the coordinator's port to answer, so an address
    nobody serves ends in one clear line rather than in the runtime's abort.
    """
    if jax.distributed.is_initialized():
        return
    if _backend_started():
        raise DistributedError(
            "the distributed runtime must start before any JAX computation in this process"
        )
    # Collectives between the CPU devices of several processes (GPUs use NCCL on their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    start = time.monotonic()
    deadline = start + cluster.init_timeout
    kwargs: dict[str, Any] = {
        "heartbeat_timeout_seconds": int(cluster.heartbeat_timeout),
        # At the end the other processes wait for process 0's last snapshot and test round,
        # which can be long; a process that dies meanwhile is still caught by its heartbeats.
        "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT,
    }
    if not cluster.auto:
        host, _, port = cluster.coordinator.rpartition(":")
        if cluster.process_id != 0:
            _wait_for_coordinator(host.strip("[]"), int(port), deadline, cluster)
        kwargs.update(
            coordinator_address=cluster.coordinator,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
        )
    left = max(1, math.ceil(deadline - time.monotonic()))
    # JAX waits longer than its timeout and then aborts the process natively; a timer of our
    # own ends the wait at the deadline with one line instead.
    formed = threading.Event()

    def expire() -> None:
        if not formed.is_set():
            print(f"nincc: error: {cluster.label}: {not_formed(cluster)}", file=sys.stderr,
                  flush=True)
            os._exit(1)

    timer = threading.Timer(left + 1.0, expire)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(initialization_timeout=left, **kwargs)
    except (ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if cluster.auto:
            raise DistributedError(
                f"--coordinator auto: JAX found no cluster to join ({first}); under SLURM or "
                "Open MPI run one process per task, or give --coordinator HOST:PORT "
                "--num-processes N --process-id I"
            ) from None
        raise DistributedError(f"{cluster.label}: joining the job failed: {first}") from None
    finally:
        formed.set()
        timer.cancel()
    # JAX's preemption notifier takes SIGTERM over, and only records it; until the solver
    # installs its own handler, SIGTERM ends the process as it would any other.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def not_formed(cluster: Cluster) -> str:
    """Why a job did not start in time."""
    n = cluster.num_processes or "the"
    where = "JAX's cluster" if cluster.auto else f"the coordinator at {cluster.coordinator}"
    return (
        f"the job did not start: not all {n} processes joined {where} within "
        f"{_seconds(cluster.init_timeout)} s (start every process with the same --coordinator and "
        "--num-processes; --init-timeout sets the wait)"
    )


# ============================================================================ devices


def select_devices(devices: str | int | None = "all") -> list[Any]:
    """The mesh's devices: the first ``devices`` (or all) local devices of every process.

    Ordered process by process, so process ``p``'s devices are the ranks
    ``p * n .. p * n + n - 1`` and its data shard is one block of consecutive ranks.
    """
    local = jax.local_devices()
    if devices is None or str(devices).strip().lower() == "all":
        n = len(local)
    else:
        try:
            n = int(devices)
        except ValueError:
            raise InputError(f"--devices wants a number or 'all', got {devices!r}") from None
        if n < 1:
            raise InputError(f"--devices must be >= 1, got {n}")
        if n > len(local):
            kind = local[0].platform if local else "?"
            hint = (
                " (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before the start "
                "gives N virtual devices)" if kind == "cpu" else ""
            )
            where = "this process has" if jax.process_count() > 1 else "this machine has"
            raise InputError(
                f"--devices {n}: {where} {len(local)} {kind} device"
                f"{'s' if len(local) != 1 else ''}{hint}"
            )
    by_process: dict[int, list[Any]] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    chosen = []
    for p in sorted(by_process):
        chosen += sorted(by_process[p], key=lambda d: d.id)[:n]
    return chosen


class DataParallel:
    """A data-parallel layout: a 1-D mesh over the chosen devices of all processes.

    ``devices`` is a count per process or ``"all"``. ``shard`` is the data this process reads
    (its devices' ranks); ``replicate``, ``rows`` and ``host`` move arrays between this
    process's host memory and global arrays.
    """

    def __init__(self, devices: str | int | None = "all"):
        self.devices = select_devices(devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.world = len(self.devices)
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        mine = [i for i, d in enumerate(self.devices) if d.process_index == self.process_index]
        self.local_count = len(mine)
        self.shard = Shard(mine[0], len(mine), self.world)
        self.replicated = NamedSharding(self.mesh, P())

    @property
    def distributed(self) -> bool:
        return self.process_count > 1

    @property
    def is_main(self) -> bool:
        """Process 0: the one that logs, tests and writes snapshots and metrics."""
        return self.process_index == 0

    def describe(self) -> str:
        kind = self.devices[0].platform
        if self.distributed:
            return (f"{self.world} {kind} devices in {self.process_count} processes "
                    f"({self.local_count} here, ranks {self.shard.first}.."
                    f"{self.shard.first + self.local_count - 1})")
        return f"{self.world} {kind} device{'s' if self.world > 1 else ''}"

    def replicate(self, tree: Any) -> Any:
        """Host values (the same on every process) → arrays replicated on every device."""

        def one(x):
            a = np.asarray(x)
            if not self.distributed:
                return jax.device_put(a, self.replicated)
            return jax.make_array_from_callback(a.shape, self.replicated, lambda idx: a[idx])

        return jax.tree_util.tree_map(one, tree)

    def rows(self, local: np.ndarray, axis: int = 0) -> jax.Array:
        """This process's rows (its devices' blocks along ``axis``, rank by rank) → one global
        array sharded along ``axis``."""
        local = np.asarray(local)
        if local.shape[axis] % self.local_count:
            raise InputError(
                f"{local.shape[axis]} rows cannot be split over this process's "
                f"{self.local_count} devices"
            )
        shape = list(local.shape)
        shape[axis] = shape[axis] // self.local_count * self.world
        sharding = NamedSharding(self.mesh, P(*([None] * axis), AXIS))
        return jax.make_array_from_process_local_data(sharding, local, tuple(shape))

    @staticmethod
    def host(tree: Any) -> Any:
        """Replicated global arrays → NumPy, from this process's own copy (no communication)."""

        def one(x):
            if isinstance(x, jax.Array):
                return np.asarray(x.addressable_data(0))
            return np.asarray(x)

        return jax.tree_util.tree_map(one, tree)

    def check_same(self, what: str, data: bytes) -> None:
        """Stop every process with one line unless all of them hold the same ``data``."""
        if not self.distributed:
            return
        from jax.experimental import multihost_utils

        digest = np.frombuffer(hashlib.sha256(data).digest()[:16], np.uint32)
        gathered = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1, 4)
        differ = [p for p in range(len(gathered)) if not np.array_equal(gathered[p], gathered[0])]
        if differ:
            who = ", ".join(str(p) for p in differ)
            raise DistributedError(
                f"the processes disagree: process {who} started with other {what} than "
                "process 0; start every process with the same files and options"
            )

    def agree_seed(self, seed: int) -> int:
        """Process 0's seed on every process (params are initialised identically)."""
        if not self.distributed:
            return seed
        from jax.experimental import multihost_utils

        return int(multihost_utils.broadcast_one_to_all(np.int32(seed)))

    def trainer(
        self, net: Any, cfg: SolverConfig, outputs: Sequence[str] = ()
    ) -> DataParallelTrainer:
        return DataParallelTrainer(net, cfg, self, outputs)


# ============================================================================ the step


def _output_reduce(x: Any) -> Any:
    """A net output over the devices: scalars (losses, accuracy) averaged, which is the
    combined batch's value for batch means; other blobs concatenated along the batch."""
    if x.ndim == 0:
        return jax.lax.pmean(x.astype(jnp.float32), AXIS)
    return jax.lax.all_gather(x, AXIS, tiled=True, to="invarying")


class DataParallelTrainer(Trainer):
    """Trainer whose one jitted step runs on every device of a :class:`DataParallel` layout.

    ``step(params, opt_state, feeds, rng, it, request)`` takes this process's rows (its
    devices' batches, rank by rank: ``local_count * batch_size`` rows per blob) and returns
    replicated params and state. ``params`` and ``opt_state`` are global arrays
    (``DataParallel.replicate``); ``init`` builds the state from host params.
    """

    def __init__(
        self, net: Any, cfg: SolverConfig, dp: DataParallel, outputs: Sequence[str] = ()
    ):
        super().__init__(net, cfg, outputs)
        self.dp = dp
        self.rank_batch = {b: tuple(s) for b, s in net.input_shapes.items()}
        rep = P()
        fn = jax.shard_map(
            self._device_step,
            mesh=dp.mesh,
            in_specs=(rep, rep, P(None, AXIS), rep, P(AXIS)),
            out_specs=(rep, rep, rep, rep, rep),
        )
        self._step = jax.jit(fn, donate_argnums=(0, 1))

    def init(self, params: Mapping[str, Sequence[Any]]) -> CaffeState:
        return self.dp.replicate(self.tx.init(self.dp.host(params)))

    def _device_step(self, params, opt_state, feeds, keys, request):
        # Each rank draws its own dropout masks. (Selecting the unfolded key for rank 0, so that
        # one device would repeat Trainer's masks, made the 4-device step ~30% slower on CPU.)
        rank = jax.lax.axis_index(AXIS)
        keys = jnp.stack([jax.random.fold_in(keys[i], rank) for i in range(keys.shape[0])])
        # Each device's gradients stay its own through the iter_size passes (varying over the
        # mesh), then one all-reduce: not one per pass.
        local = jax.lax.pcast(params, AXIS, to="varying")
        new, grads, losses, outs, state_layers = self._passes(local, feeds, keys)
        grads = jax.lax.pmean(grads, AXIS)
        params = {**params, **{n: jax.lax.pmean(new[n], AXIS) for n in state_layers}}
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses = jax.lax.pmean(losses, AXIS)
        outs = {b: _output_reduce(v) for b, v in outs.items()}
        return params, opt_state, losses, outs, jax.lax.pmax(request[0], AXIS)

    def _check_rows(self, stacked: Mapping[str, np.ndarray]) -> None:
        n = self.dp.local_count
        for blob, arr in stacked.items():
            want = self.rank_batch.get(blob)
            if want is None:
                raise InputError(f"blob '{blob}' is not an input of the train net")
            rows = arr.shape[1] if arr.ndim > 1 else 0
            if rows != want[0] * n or tuple(arr.shape[2:]) != tuple(want[1:]):
                raise InputError(
                    f"blob '{blob}': {rows} rows of shape {list(arr.shape[2:])} given; this "
                    f"process's {n} device{'s' if n > 1 else ''} take {n} x {want[0]} rows of "
                    f"shape {list(want[1:])} (batch_size is per device, as in Caffe's "
                    "multi-GPU training)"
                )

    def step(
        self,
        params,
        opt_state: CaffeState,
        feeds: Sequence[Mapping[str, Any]],
        rng=None,
        it: int | None = None,
        request: int = 0,
    ):
        """One iteration on every device; ``request`` (0 none, 1 snapshot, 2 stop) is this
        process's, the result's ``request`` the largest of all processes'."""
        dp = self.dp
        it = int(dp.host(opt_state.iter)) if it is None else it
        rate, keys = self._iteration(feeds, it, rng)
        keys = np.asarray(keys)
        opt_state = opt_state._replace(rate=dp.replicate(np.float32(rate)))
        stacked = {k: np.stack([np.asarray(f[k], np.float32) for f in feeds]) for k in feeds[0]}
        self._check_rows(stacked)
        args = (
            {k: dp.rows(v, axis=1) for k, v in stacked.items()},
            dp.replicate(keys),
            dp.rows(np.full(dp.local_count, request, np.int32)),
        )
        try:
            params, opt_state, losses, outputs, agreed = self._step(params, opt_state, *args)
            values = [float(x) for x in dp.host(losses)]
            agreed = int(dp.host(agreed))
        except (RuntimeError, ValueError) as e:
            if dp.distributed:
                where = f"process {dp.process_index}/{dp.process_count}, iteration {it}"
                raise DistributedError(f"{where}: {peer_lost(e)}") from None
            raise
        result = StepResult(caffe_mean_loss(values), float(rate), values, dp.host(outputs), agreed)
        return params, opt_state, result


def peer_lost(error: BaseException) -> str:
    """A one-line account of a failed collective (the usual cause: a process went away)."""
    text = " ".join(str(error).split())
    m = re.search(r"(Connection closed by peer[^\]]*\]?(?::\d+)?|Connection reset[^;]*)", text)
    cause = m.group(1) if m else text[:160]
    return (
        f"lost another process of the job ({cause}): it died, was stopped or its network "
        "failed; this process stops too"
    )


# ============================================================================ nets for devices


_BATCH_FIELDS = {
    "Data": "data_param",
    "ImageData": "image_data_param",
    "HDF5Data": "hdf5_data_param",
    "MemoryData": "memory_data_param",
    "WindowData": "window_data_param",
}


def split_batch(
    net_param: Any, world: int, phase: str = "TRAIN", level: int = 0, stages: Sequence[str] = ()
) -> Any:
    """A copy of a net whose data layers (those of the given NetState) take ``1/world`` of
    their batch: the prototxt's batch_size read as the combined batch of all devices
    (``nincc train --split-batch``)."""
    from .build import layer_included, net_state

    out = type(net_param)()
    out.CopyFrom(net_param)
    state = net_state(out, phase, level, stages)

    def part(layer: str, what: str, n: int) -> int:
        if n % world:
            raise InputError(
                f"--split-batch: layer '{layer}' has {what} {n}, not divisible by the "
                f"{world} devices of the job"
            )
        return n // world

    for layer in out.layer:
        if not layer_included(layer, state):
            continue
        field = _BATCH_FIELDS.get(layer.type)
        if field is not None:
            p = getattr(layer, field)
            p.batch_size = part(layer.name, "batch_size", p.batch_size)
        elif layer.type in ("Input", "DummyData"):
            p = layer.input_param if layer.type == "Input" else layer.dummy_data_param
            for shape in p.shape:
                if len(shape.dim):
                    shape.dim[0] = part(layer.name, "batch (first dim)", shape.dim[0])
            if layer.type == "DummyData":
                for i, n in enumerate(p.num):
                    p.num[i] = part(layer.name, "num", n)
    return out


def job_digest(*parts: Any) -> bytes:
    """Bytes that identify a run's definition (protobuf messages, strings, numbers)."""
    h = hashlib.sha256()
    for part in parts:
        if hasattr(part, "SerializeToString"):
            data = part.SerializeToString(deterministic=True)
        else:
            data = repr(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


# ============================================================================ the supervisor


def _die_with_parent() -> None:
    """In the worker, before exec: the kernel kills it when its supervisor dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(argv: Sequence[str], cluster: Cluster) -> int:
    """Run ``nincc <argv>`` as this process's worker and report how it ended.

    JAX's distributed runtime ends a process with a native abort (a multi-line log, no Python
    exception) when the coordinator cannot be reached, a peer stops sending heartbeats or the
    coordinator goes away. The worker sends its native log to a file; if it dies that way, this
    supervisor turns the log into one line. Signals are passed on to the worker; a worker whose
    supervisor is killed is killed with it.
    """
    fd, native_log = tempfile.mkstemp(prefix="nincc-native-", suffix=".log")
    os.close(fd)
    env = {**os.environ, ENV_WORKER: native_log}
    child = subprocess.Popen(
        [sys.executable, "-m", "nincc.cli", *argv],
        env=env,
        start_new_session=True,  # a terminal's Ctrl-C reaches the worker once, through us
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    wanted = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP")
                                                 else [])
    old = {s: signal.signal(s, forward) for s in wanted}
    try:
        code = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if code >= 0:  # the worker finished or reported its own error
        with contextlib.suppress(OSError):
            os.remove(native_log)
        return code
    try:
        with open(native_log, errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    raise DistributedError(f"{cluster.label}: {diagnose(text, cluster, -code)} "
                           f"[native log: {native_log}]")


def diagnose(log: str, cluster: Cluster, signum: int) -> str:
    """Why the distributed runtime ended a worker, from its native log."""
    flat = " ".join(log.split())
    addr = cluster.coordinator
    if "RegisterTask" in flat or ("DEADLINE_EXCEEDED" in flat and "Connect" in flat):
        return not_formed(cluster)
    m = re.search(r"stopped sending heartbeats\):?\s*([\d ,]+)", flat)
    if m or "heartbeat timeout" in flat.lower():
        who = f"process {m.group(1).strip().rstrip(',')}" if m else "a process"
        return (
            f"{who} stopped sending heartbeats for {cluster.heartbeat_timeout} s (it died, was "
            "killed or hangs); the job stops"
        )
    if "PollForError" in flat or "coordination service" in flat.lower():
        return (
            f"lost the coordinator at {addr} (process 0 died, was stopped or the network "
            "failed); the job stops"
        )
    fatal = re.findall(r"^F\d{4} [^\]]*\] (.*)$", log, re.M)
    if fatal:
        return f"the distributed runtime stopped this process: {fatal[-1][:200]}"
    try:
        name: Any = signal.Signals(signum).name
    except ValueError:
        name = signum
    return f"the worker process ended with signal {name}"


_WORKER = False


def become_worker() -> None:
    """In the supervised worker: native output (fd 1 and 2) goes to the supervisor's log file,
    Python's own stdout and stderr keep the terminal."""
    path = os.environ.pop(ENV_WORKER, None)
    if not path:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    out = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), line_buffering=True,
                           encoding=sys.stdout.encoding, errors="backslashreplace")
    err = io.TextIOWrapper(os.fdopen(os.dup(2), "wb"), line_buffering=True,
                           encoding=sys.stderr.encoding, errors="backslashreplace")
    log = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout, sys.stderr = out, err
    global _WORKER
    _WORKER = True


def exit_worker(code: int) -> None:
    """A failed worker leaves at once: JAX's exit hook would wait for the other processes at a
    shutdown barrier they may never reach."""
    if _WORKER and code:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


__all__ = [
    "AXIS",
    "Cluster",
    "DataParallel",
    "DataParallelTrainer",
    "DistributedError",
    "cluster_from",
    "initialize",
    "job_digest",
    "select_devices",
    "split_batch",
    "supervise",
]
