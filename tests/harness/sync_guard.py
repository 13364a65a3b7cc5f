"""Detect host syncs and count collectives, for tests of the hook's per-micro-batch path.

- :func:`forbid_host_sync` raises :class:`HostSyncError` on any operation that would make the
  host wait for the device on a GPU (``item``, ``tolist``, ``bool(t)``, ``float(t)``, printing a
  tensor, ``nonzero``, boolean-mask indexing, copies to the host, ...), even on the CPU where
  they are free, so that the CPU suite catches what would stall a GPU run.
- :func:`count_collectives` counts ``torch.distributed`` collectives issued from frames of a
  given package (by default ``megatron_agg`` outside ``megatron_agg.compare``, the CPU kit).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncError", "forbid_host_sync", "count_collectives", "CollectiveCounter"]


class HostSyncError(RuntimeError):
    """A host-device synchronization happened where none is allowed."""


_SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.unique,
    torch.Tensor.unique,
    torch.Tensor.any,
    torch.Tensor.all,
    torch.equal,
    torch.allclose,
}


def _has_bool_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.dtype == torch.bool
    if isinstance(obj, (tuple, list)):
        return any(_has_bool_tensor(o) for o in obj)
    return False


class _ForbidHostSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if func in _SYNCING:
            raise HostSyncError(f"host sync: {name} called on the per-micro-batch path")
        if func is torch.Tensor.__getitem__ and len(args) > 1 and _has_bool_tensor(args[1]):
            raise HostSyncError("host sync: boolean-mask indexing on the per-micro-batch path")
        if func is torch.Tensor.to and any(
            (isinstance(a, (str, torch.device)) and str(a).startswith("cpu")) for a in args[1:]
        ):
            # On the CPU a .to("cpu") is free; on a GPU run it is a device-to-host copy.
            if isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
                raise HostSyncError("host sync: device-to-host copy on the per-micro-batch path")
        return func(*args, **kwargs)


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Raise :class:`HostSyncError` on any host sync inside the block."""
    with _ForbidHostSync():
        yield


_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "gather",
    "scatter",
    "all_gather_object",
    "broadcast_object_list",
)


class CollectiveCounter:
    """Counts collectives whose caller stack has a frame of ``package`` (not of ``exclude``)."""

    def __init__(self, package: str = "megatron_agg", exclude: str = "megatron_agg.compare") -> None:
        self.package = package
        self.exclude = exclude
        self.calls: List[str] = []

    def _from_package(self) -> bool:
        """Whether the nearest caller outside torch itself is a module of ``package``."""
        frame = sys._getframe(2)
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if module == "torch" or module.startswith(("torch.", "contextlib", "functools")):
                frame = frame.f_back
                continue
            if module.startswith(self.exclude):
                return False
            return module == self.package or module.startswith(self.package + ".")
        return False

    @property
    def count(self) -> int:
        return len(self.calls)

    def by_name(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for name in self.calls:
            out[name] = out.get(name, 0) + 1
        return out


@contextlib.contextmanager
def count_collectives(
    package: str = "megatron_agg", exclude: str = "megatron_agg.compare"
) -> Iterator[CollectiveCounter]:
    """Count the collectives ``package`` issues inside the block."""
    from torch.distributed import distributed_c10d as c10d

    counter = CollectiveCounter(package, exclude)
    saved = []
    for name in _COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def make(name=name, original=original):
            @functools.wraps(original)
            def counted(*args, **kwargs):
                if counter._from_package():
                    counter.calls.append(name)
                return original(*args, **kwargs)

            return counted

        counted = make()
        # Patch both namespaces: P2POp checks ops against distributed_c10d's own isend/irecv.
        for namespace in (dist, c10d):
            if getattr(namespace, name, None) is original:
                saved.append((namespace, name, original))
                setattr(namespace, name, counted)
    try:
        yield counter
    finally:
        for namespace, name, original in reversed(saved):
            setattr(namespace, name, original)
