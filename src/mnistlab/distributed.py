"""Training with several processes: DistributedDataParallel under torchrun, or `train --nproc N`.

As in the PyTorch DDP tutorial (`multigpu_torchrun.py`), a process learns its rank from the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), and the same code runs
with one process or many. Each rank trains on its share of every batch (`BatchLoader` with
`rank`/`world`); gradients are summed weighted by each rank's share, so a step is the step one
process would take on the whole batch; metrics are summed at the loop's log points and epoch
ends; rank 0 alone prints and writes. gloo on CPU, NCCL on CUDA.

`launch` is `--nproc N`: torch's elastic launcher (what torchrun runs) starting N copies of the
same `mnistlab train` command on this machine, over loopback, with one clear line if one fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MnistlabError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's error path imports this module
    import torch
    from torch import nn

# Set in the processes `launch` starts: a folder where each rank leaves its run folder and error.
INFO_ENV = "MNISTLAB_LAUNCH_INFO"
# How long a rank waits for the others at a collective before giving up (a hung peer, not a
# dead one: a dead peer's closed sockets fail the collective at once).
TIMEOUT = datetime.timedelta(minutes=10)


def world_size() -> int:
    """The number of processes of this run (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise MnistlabError(f"${name} must be an integer, got {os.environ[name]!r}") from None


@dataclasses.dataclass(frozen=True)
class Group:
    """This process's place in a distributed run."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (the metric totals of training.Reduce)."""
        import torch.distributed as dist

        if self.backend == "nccl":
            on = tensor.cuda()
            dist.all_reduce(on)
            tensor.copy_(on.cpu())
        else:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def start(device: str = "auto") -> Group | None:
    """Join the process group torchrun described (None when this is a one-process run)."""
    world = world_size()
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    local_rank = _env_int("LOCAL_RANK", 0)
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as e:
            raise MnistlabError(
                f"cannot join the other {world - 1} training processes ({_first_line(e)})"
            ) from None
    return Group(dist.get_rank(), dist.get_world_size(), local_rank,
                 _env_int("LOCAL_WORLD_SIZE", world), backend)  # fmt: skip


def stop(group: Group | None) -> None:
    if group is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()


def wrap(model: nn.Module, group: Group, loader: Any) -> nn.Module:
    """`model` in DistributedDataParallel whose gradient all-reduce weights each rank by its
    share of the global batch (`loader.share`): a final batch split unevenly still averages
    over its samples, not its ranks."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [group.local_rank] if group.backend == "nccl" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids)
    ddp.register_comm_hook(loader, _weighted_sum)
    return ddp


def _weighted_sum(loader, bucket):  # unannotated: DDP checks a hook's annotations
    import torch.distributed as dist

    grads = bucket.buffer()
    grads.mul_(loader.share)  # this rank's mean gradient × its fraction of the batch
    work = dist.all_reduce(grads, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank went away."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError)
        and any(s in str(error) for s in ("Connection closed", "Connection reset", "Broken pipe",
                                          "Gloo", "NCCL", "ProcessGroup"))
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


# --- what launched processes tell the launcher -----------------------------------------------


def note(**fields: Any) -> None:
    """Record `fields` (run_dir, error) for the `launch` that started this process, if any."""
    folder = os.environ.get(INFO_ENV)
    if not folder:
        return
    path = Path(folder) / f"rank{rank()}.json"
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**old, **fields}))
        tmp.replace(path)
    except (OSError, ValueError):
        pass  # the launcher then says less; the run itself is unaffected


def launched() -> bool:
    """Whether `launch` started this process (it then prints the one error line)."""
    return bool(os.environ.get(INFO_ENV))


def _notes(folder: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for path in folder.glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            out[int(path.stem[4:])] = json.loads(path.read_text())
    return out


# --- `mnistlab train --nproc N` ----------------------------------------------------------------


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """`argv` less `option VALUE` and `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def launch(nproc: int, argv: Sequence[str], *, resume: str | None = None) -> None:
    """Run `mnistlab ARGV` in `nproc` processes on this machine, as `torchrun --standalone
    --nproc-per-node NPROC -m mnistlab ARGV` does; a failure is one MnistlabError line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",  # a free loopback port
        max_restarts=0, monitor_interval=0.1,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mnistlab-launch-") as folder:
        env = {INFO_ENV: folder, "MASTER_ADDR": "127.0.0.1"}
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        try:
            with _environment(env), _quiet_launcher():
                elastic_launch(config, entrypoint=sys.executable)("-m", "mnistlab", *argv)
        except ChildFailedError as e:
            failed_rank, failure = e.get_first_failure()
            notes = _notes(Path(folder))
            what = notes.get(failed_rank, {}).get("error")
            if not what:
                what = (f"training process rank {failed_rank} was killed by {failure.signal_name()}"
                        if failure.exitcode < 0 else
                        f"training process rank {failed_rank} exited with status "
                        f"{failure.exitcode}")  # fmt: skip
            raise MnistlabError(what + _where(notes, nproc, resume)) from None
        except KeyboardInterrupt:
            raise MnistlabError("interrupted" + _where(_notes(Path(folder)), nproc, resume)
                                ) from None
        except Exception as e:  # the launcher's own failures: rendezvous, a port, spawning
            if type(e).__name__ != "SignalException":
                raise MnistlabError(f"cannot start {nproc} training processes ({_first_line(e)})"
                                    ) from None
            raise MnistlabError("interrupted" + _where(_notes(Path(folder)), nproc, resume)
                                ) from None


def _where(notes: dict[int, dict[str, Any]], nproc: int, resume: str | None) -> str:
    """'; RUN holds epoch k/N. Resume with: ...' from what rank 0 recorded and the run folder."""
    from . import runs

    run_dir = notes.get(0, {}).get("run_dir") or resume
    if not run_dir:
        return "; no run folder was made"
    path = Path(run_dir)
    try:
        epochs = len(runs.read_metrics(path))
        planned = runs.read_json(path / runs.CONFIG).get("epochs", "?")
    except (MnistlabError, AttributeError):
        epochs, planned = 0, "?"
    return (f"; {path} holds epoch {epochs}/{planned}. Resume with: mnistlab train --resume "
            f"{path} --nproc {nproc}")


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """The elastic agent logs every start and failure to stderr; mnistlab says it in one line."""
    logging.disable(logging.CRITICAL)
    old = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        signal.signal(signal.SIGINT, old)
