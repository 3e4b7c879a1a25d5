"""torchrun is the distributed engine: rank and world size come from its environment variables;
NCCL with one GPU per rank on CUDA, gloo on CPU (so DDP runs in CI with CPU processes)."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError, RunError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def resolve_device(preference: str, local_rank: int) -> torch.device:
    """`auto` → CUDA when available; `cuda` without a GPU (or a local rank without its own
    GPU) is a ConfigError."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local_rank} has no GPU "
                          f"({torch.cuda.device_count()} visible): start at most that many "
                          f"processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(device_preference: str) -> DistInfo:
    """Read torchrun's environment, pick this rank's device, join the process group."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _attempt_store(rank, world)
        _wait_for_peers(store, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, _env_int("LOCAL_WORLD_SIZE", 1), device)


def _wait_for_peers(store: dist.Store, world: int) -> None:
    """Return once all `world` ranks of this start have reached here.

    init_process_group waits for its peers inside C++, where Python's signal handlers cannot
    run: a rank whose peer died before joining (killed while importing torch) sat there deaf to
    torchrun's SIGTERM until torchrun killed it 30 s later, without a word. This wait is in
    Python (a non-blocking check, then a sleep), so SIGTERM and Ctrl-C stop it at once; the
    group then forms among ranks that are all alive."""
    if store.add("ranks_joined", 1) == world:
        store.set("all_joined", "1")
    pause = 0.005
    while not store.check(["all_joined"]):
        time.sleep(pause)
        pause = min(2 * pause, 0.2)  # at most 5 checks per second per rank on the store


def _attempt_store(rank: int, world: int) -> dist.Store:
    """torchrun's key-value store under a prefix unique to this start of the workers.

    After a `--max-restarts` restart the store still holds the previous attempt's keys; without a
    fresh prefix a rank can read a dead peer's gloo address and fail with "Connection refused".
    The start is counted in the store (`start_round`), not taken from TORCHELASTIC_RESTART_COUNT,
    on which the nodes of a c10d rendezvous can disagree.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          int(os.environ.get("MASTER_PORT", 29500)), world,
                          is_master=rank == 0 and not agent_store,
                          timeout=timedelta(minutes=10), wait_for_workers=False)
    if agent_store:
        _job_store[0] = dist.PrefixStore("fasttrain/job", store)
        attempt = _count_start(_job_store[0], world)
    else:
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return dist.PrefixStore(f"fasttrain/attempt_{attempt}", store)


_start_round: list[int | None] = [None]


def _count_start(store: dist.Store, world: int) -> int:
    """This start of the worker group, counted in torchrun's store: every rank adds one to a
    counter of its world size as it starts, and all `world` ranks of a start add theirs before
    any rank of the next start can, so they all read the same `(count - 1) // world`. A rank
    that dies before it counts (while loading) leaves the counter uneven for the starts after:
    their ranks disagree and cannot form a group (torchrun gives no round number that all
    nodes' ranks share)."""
    _start_round[0] = (store.add(f"starts/world{world}", 1) - 1) // world
    return _start_round[0]


def start_round() -> int:
    """0 for the first start of this job's workers, k for the k-th start after it (a torchrun
    restart). Where torchrun's agent store is, counted there: TORCHELASTIC_RESTART_COUNT counts
    an agent's own restarts only, so when a c10d rendezvous restarts a node's healthy workers
    because another node's failed, that node's ranks read 0 and the other's 1 (measured, 2
    nodes): they took their process group's store prefixes from it and waited for each other
    for good, and rank 0 would have started a new run instead of continuing. Elsewhere that
    variable (0 outside torchrun)."""
    if _start_round[0] is None:
        store = _torchrun_job_store()
        if store is None:
            return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        _count_start(store, _env_int("WORLD_SIZE", 1))  # one process: no group counted it
    return _start_round[0]


# torchrun's agent store outlives the workers it restarts: what one attempt leaves there the
# next reads. None: not under torchrun, or a store that dies with the workers.
_job_store: list[dist.Store | None] = [None]
RUN_DIR_KEY = "run_dir"
STORE_TIMEOUT = timedelta(seconds=20)


def _torchrun_job_store() -> dist.Store | None:
    """The job-wide part of torchrun's agent store (a single-process run connects to it
    here; a multi-process one kept it when it joined the process group)."""
    if _job_store[0] is None and "TORCHELASTIC_RESTART_COUNT" in os.environ and (
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"):
        addr = (os.environ.get("MASTER_ADDR", "127.0.0.1"),
                int(os.environ.get("MASTER_PORT", 29500)))
        try:  # torchrun starts its store before the workers: it answers at once
            # a plain connection first: TCPStore retries for twice its timeout, printing
            # C++ stack dumps
            socket.create_connection(addr, timeout=STORE_TIMEOUT.total_seconds()).close()
            store = dist.TCPStore(*addr, is_master=False, timeout=STORE_TIMEOUT,
                                  wait_for_workers=False)
        except (RuntimeError, OSError) as e:  # DistNetworkError is a RuntimeError
            raise RunError(f"torchrun's store at {addr[0]}:{addr[1]} does not answer "
                           f"({(str(e).strip() or type(e).__name__).splitlines()[0][:120]}); "
                           f"TORCHELASTIC_* "
                           f"variables set outside torchrun? unset them") from None
        _job_store[0] = dist.PrefixStore("fasttrain/job", store)
    return _job_store[0]


def remember_run_dir(run_dir: str) -> None:
    """Record, for the attempts torchrun may restart, the run folder this job trains into."""
    store = _torchrun_job_store()
    if store is not None:  # bytes: a folder name that is not UTF-8 stays exact
        store.set(RUN_DIR_KEY, os.fsencode(run_dir))


def remembered_run_dir() -> str | None:
    """The run folder an earlier attempt of this torchrun job trained into, if any."""
    store = _torchrun_job_store()
    if store is None or not store.check([RUN_DIR_KEY]):
        return None
    return os.fsdecode(store.get(RUN_DIR_KEY))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no-op on a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def data_parallel(model: torch.nn.Module, device: torch.device,
                  deterministic: bool) -> torch.nn.parallel.DistributedDataParallel:
    """`model` under DDP as the training loop uses it.

    Gradients are views of DDP's buckets (no copy of every gradient out of its bucket after
    the all-reduce, one gradient-sized buffer less). Buffers are synchronised when DDP is built,
    not at every forward: the training loop evaluates and saves rank 0's BatchNorm statistics,
    which it broadcasts before each validation, so the per-step broadcast of rank 0's buffers
    (about 160 tensors for a ResNet-50) changed nothing that is used. `deterministic`: gradients
    summed in rank order (bit-identical resumes on any number of ranks).
    """
    wrapped = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True)
    # Set after construction, not as the argument: torch 2.14 deprecates `broadcast_buffers`
    # for `forward_sync_buffers`, which 2.11 lacks; the attribute works in both, and keeps
    # the initial synchronisation.
    wrapped.broadcast_buffers = False
    if deterministic:
        wrapped.register_comm_hook(None, rank_ordered_mean_hook)
    return wrapped


# No annotations: DDP checks a hook's against the real classes, and this module's are strings.
def rank_ordered_mean_hook(group, bucket):  # (ProcessGroup | None, GradBucket) -> Future[Tensor]
    """DDP communication hook: the ranks' gradients gathered, then summed in rank order and
    divided by the world size, the same arithmetic whatever the bucket's layout.

    DDP rebuilds its buckets after the first step of every construction, in the order the
    gradients became ready, so the first step after a resume packs them differently from the
    uninterrupted run's step; a ring all-reduce sums each element in an order that depends on
    where it lies in the bucket, which on 3 or more ranks changes the rounding. Costs a
    world-size times larger transfer: only for `train.deterministic`."""
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    grads = bucket.buffer()
    gathered = [torch.empty_like(grads) for _ in range(world)]
    future = dist.all_gather(gathered, grads, group=group, async_op=True).get_future()

    def mean(_: torch.futures.Future) -> torch.Tensor:
        total = gathered[0].clone()
        for other in gathered[1:]:
            total += other
        return total.div_(world)

    return future.then(mean)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank `src`'s buffers (BatchNorm running statistics) into `module` on every rank, in
    place (no-op on a single process)."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (no-op on a single process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] on a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
