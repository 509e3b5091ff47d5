"""One job on several GPUs: its processes (ranks), how the calibration windows are split between them, and
what they exchange (`torch.distributed`: NCCL between GPUs, gloo on the CPU).

The engine child of the job is rank 0: it runs the whole pipeline, reports, and alone writes the checkpoint.
For the blocks of a calibrated method (GPTQ) it starts ranks 1..N-1 (`python -P -m qaas.worker.engine.ranks`,
the job's spec on stdin), one per GPU (rank r on cuda:r; on the CPU N processes), which read the same source
and run the same code in lockstep: `Ranks` is the only thing that differs, and `Ranks.alone()` -- every
exchange a no-op -- is the one-process job, so the one-process path *is* the several-process path at N = 1.

The calibration batches are cut into `SHARDS` fixed contiguous shards whatever N is; rank r owns the shards
s with s % N == r and keeps only their activations (each rank runs its shards through every block, the
quantized forward included: the next block's inputs never travel). What is summed across shards -- the
Hessians (`hessian.sum_over_shards`) -- is summed shard by shard in shard order, the same additions in the
same order for any N, which is why N GPUs write the bytes one writes.

Failure: a rank that dies (kill -9, out of memory, a crash) abandons the attempt: rank 0 logs it, kills the
other ranks and exits with `EXIT_RANK_LOST` and no verdict, which its supervisor treats as an engine crash
(the attempt's staging directory is removed, the job is retried). Rank 0 dying takes the others with it
(`PR_SET_PDEATHSIG`); cancellation and the time limit reach rank 0, and the others die with its exit.
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from qaas.kit.parent_death import die_with_parent
from qaas.quantization_rules import gpus as gpu_rules

if TYPE_CHECKING:
    from .methods.base import EngineContext

#: Calibration shards, fixed: any count of ranks up to it sums the same partial sums in the same order.
SHARDS = gpu_rules.MOST
#: Exit status of rank 0 when another rank died: no verdict, so the attempt is retried as a crash.
EXIT_RANK_LOST = 4
#: Collectives wait this long for a slow rank (a 70B block's layers take minutes); a dead rank is noticed by
#: rank 0's watch instead, a stuck one by the job's time limit.
COLLECTIVE_TIMEOUT = dt.timedelta(hours=24)


def calibration_shards(batches: int) -> list[list[int]]:
    """The batch indices of each shard: `SHARDS` contiguous, near-equal ranges (empty ones left out)."""
    bounds = [s * batches // SHARDS for s in range(SHARDS + 1)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]


def split_by_cost(costs: list[float], world: int) -> list[int]:
    """The rank each item goes to: the largest first, each to the least loaded rank (ties: the lower rank),
    a split every rank computes alike."""
    owners = [0] * len(costs)
    loads = [(0.0, r) for r in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owners


class Ranks:
    """This process's place among the job's processes, and the exchanges between them."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device
        self._watch: _Watch | None = None

    @classmethod
    def alone(cls, device: torch.device) -> "Ranks":
        """The one-process job: this process owns every shard and every exchange is a no-op."""
        return cls(0, 1, device)

    @property
    def first(self) -> bool:
        """Whether this is rank 0: the one that reports and writes."""
        return self.rank == 0

    def owner_of_shard(self, position: int) -> int:
        """The rank holding the activations of the shard at `position` among the non-empty shards."""
        return position % self.world

    def split_by_cost(self, costs: list[float]) -> list[int]:
        return split_by_cost(costs, self.world)

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """`obj` as rank `src` has it (small picklable things: a plan, a count, metrics)."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == src else None]
        self._collective(lambda: torch.distributed.broadcast_object_list(box, src=src, device=self._comm_device))
        return box[0]

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, src: int) -> dict[str, torch.Tensor]:
        """Rank `src`'s tensors, bit for bit, on every rank (on this rank's device)."""
        if self.world == 1:
            assert tensors is not None
            return tensors
        meta = self.broadcast_object({k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
                                     if self.rank == src else None, src)
        out: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in meta.items():
            if self.rank == src:
                t = tensors[name].to(self._comm_device).contiguous()
            else:
                t = torch.empty(shape, dtype=dtype, device=self._comm_device)
            # gloo and NCCL carry no bool: its bytes travel as uint8
            wire = t.view(torch.uint8) if dtype == torch.bool else t
            self._collective(lambda: torch.distributed.broadcast(wire, src=src))
            out[name] = t.to(self.device)
        return out

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _collective(self, call) -> None:
        try:
            call()
        except Exception:
            # a peer that died makes gloo raise here: that is a lost rank (a retry), not the job's error
            if self._watch is not None:
                self._watch.abandon_if_a_rank_died(wait_s=10.0)
            raise


class _Watch(threading.Thread):
    """Rank 0's eye on the other ranks: one that exits while the job still needs it abandons the attempt."""

    def __init__(self, helpers: list[subprocess.Popen], reporter: Any) -> None:
        super().__init__(name="rank-watch", daemon=True)
        self.helpers, self.reporter = helpers, reporter
        self.closing = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.closing.wait(0.2):
            self.abandon_if_a_rank_died(wait_s=0.0)

    def abandon_if_a_rank_died(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            # A rank that finished its share and exited 0 is not lost: only a non-zero status or a signal is
            # (a race at the end of a job otherwise made rank 0 exit EXIT_RANK_LOST after a good run).
            dead = [(r, p.returncode) for r, p in enumerate(self.helpers, start=1) if p.poll() not in (None, 0)]
            if self.closing.is_set() or dead or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not dead or self.closing.is_set():
            return
        with self._lock:
            rank, code = dead[0]
            why = f"signal {-code}" if code < 0 else f"exit status {code}"
            message = f"rank {rank} of {len(self.helpers) + 1} died ({why}); the attempt is abandoned and retried"
            try:
                self.reporter.log(message, level="error", data={"rank": rank, "exit_status": code})
            except Exception:  # noqa: BLE001 - the protocol stream may be gone; stderr still says it
                pass
            print(message, file=sys.stderr, flush=True)
            kill_all(self.helpers)
            os._exit(EXIT_RANK_LOST)


def kill_all(helpers: list[subprocess.Popen]) -> None:
    for p in helpers:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in helpers:
        p.wait()


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _init(rank: int, world: int, store: torch.distributed.Store, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(_backend(device), store=store, rank=rank, world_size=world,
                                         timeout=COLLECTIVE_TIMEOUT)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:r (the worker's visible GPUs), or the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # NVLink multicast (NVLS) stays off: it needs fabric resources the hosts are not set up for
    env["NCCL_NVLS_ENABLE"] = "0"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks are on one host
    return env


@contextmanager
def job_ranks(ctx: "EngineContext") -> Iterator[Ranks]:
    """The ranks of this job, for the duration of its blocks: `Ranks.alone` for one GPU; else ranks 1..N-1
    started, joined, watched, and gone (finished, or killed when rank 0 leaves early: an error, a cancel)."""
    world = int(ctx.options.gpus)
    if world == 1:
        yield Ranks.alone(ctx.device)
        return
    device = ctx.device
    if device.type == "cuda" and torch.cuda.device_count() < world:
        from .errors import EngineError

        raise EngineError(f"the job asks for {world} GPUs and this worker sees {torch.cuda.device_count()} "
                          "(QAAS_WORKER_GPUS and the devices given to the worker disagree)")
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = torch.distributed.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                                       wait_for_workers=False)
    options = ctx.options.to_dict(redact=True)
    options["hub_token"] = None  # the ranks read only the resolved local source
    helpers: list[subprocess.Popen] = []
    watch: _Watch | None = None
    try:
        for rank in range(1, world):
            spec = {"rank": rank, "world": world, "store_port": store.port, "source_dir": str(ctx.source_dir),
                    "quantization_config": ctx.quantization_config,
                    "options": {**options, "device": str(rank_device(device, rank))}}
            p = subprocess.Popen([sys.executable, "-P", "-m", __name__], stdin=subprocess.PIPE, env=_environment(),
                                 preexec_fn=die_with_parent(signal.SIGKILL))
            assert p.stdin is not None
            p.stdin.write(json.dumps(spec).encode())
            p.stdin.close()
            helpers.append(p)
        watch = _Watch(helpers, ctx.reporter)
        watch.start()
        ranks = Ranks(0, world, device)
        ranks._watch = watch
        _init(0, world, store, device)
        yield ranks
        # the others end after their last exchange; a rank that fails now still fails the attempt
        for p in helpers:
            while p.poll() is None:
                time.sleep(0.05)
            if p.returncode != 0:
                watch.abandon_if_a_rank_died(wait_s=0.0)
    finally:
        if watch is not None:
            watch.closing.set()
        kill_all(helpers)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _serve_as_rank(spec: dict[str, Any]) -> None:
    """Ranks 1..N-1: the same source and blocks as rank 0, a reporter that says nothing, no writer."""
    from .architecture import inspect_model, load_hf_config
    from .checkpoint import CheckpointReader
    from .methods.base import EngineContext
    from .options import EngineOptions
    from .progress import NullReporter
    from .source import ResolvedSource
    from pathlib import Path

    rank, world = int(spec["rank"]), int(spec["world"])
    options = EngineOptions.from_dict(spec["options"])
    device = torch.device(options.resolved_device())
    source_dir = Path(spec["source_dir"])
    fields = spec["quantization_config"]
    store = torch.distributed.TCPStore("127.0.0.1", int(spec["store_port"]), world, is_master=False,
                                       timeout=COLLECTIVE_TIMEOUT)
    _init(rank, world, store, device)
    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    hf_config = load_hf_config(source_dir, allow_remote_code=options.allow_remote_code)
    reader = CheckpointReader(source_dir, allow_pickle=options.allow_pickle)
    try:
        layout = inspect_model(source_dir, reader, block_name_to_quantize=fields.get("block_name_to_quantize"),
                               allow_remote_code=options.allow_remote_code, hf_config=hf_config)
        ctx = EngineContext(source=ResolvedSource(source_dir), source_dir=source_dir, config=config,
                            quantization_config=fields, reader=reader, writer=None, layout=layout,  # type: ignore[arg-type]
                            device=device, reporter=NullReporter(), options=options, work_dir=source_dir)
        from .methods.base import get_method

        get_method(fields["quant_method"]).quantize_blocks_as_rank(ctx, Ranks(rank, world, device))
    finally:
        reader.close()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _serve_as_rank(json.loads(sys.stdin.read()))
