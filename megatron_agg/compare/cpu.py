"""Run Megatron-Core on the CPU with the gloo backend (tests, examples, CI).

Megatron-Core assumes CUDA in a handful of places that matter for training a small model
(``device="cuda"`` tensor factories, ``Tensor.cuda()``, ``torch.cuda.current_device()``,
the CUDA RNG tracker, streams in DDP's gradient sync). :func:`cpu_shim` redirects those to
the CPU for as long as it is active. It never changes numerics: every operation still runs
exactly as written, only on the CPU.

Two gloo gaps are bridged as well. Megatron exchanges pipeline tensor shapes (needed for
micro-batches of different sizes, ``variable_seq_lengths=True``) with one untagged
``batch_isend_irecv``; with ``pp=2`` the previous and next stage are the same peer and gloo
matches the two messages in posting order, so the shapes of activations and gradients swap.
:func:`cpu_shim` replaces that exchange with the same messages on distinct tags.

It also emulates ``ReduceOp.AVG`` (which gloo lacks) as a SUM followed by a division, so
that Megatron's ``DistributedDataParallelConfig(average_in_collective=True)`` can be tested,
and NCCL's ``PREMUL_SUM`` (Megatron-FSDP's default ``gradient_reduce_div_fusion=True``) as a
multiplication followed by a SUM, so that Megatron-FSDP runs the code path it runs on GPUs.

Not for GPU runs: on a machine with CUDA, do not enable it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

__all__ = ["cpu_shim", "CpuDeviceMode"]


def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and makes ``Tensor.cuda()`` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron asserts e.g. ``grad.type() == 'torch.cuda.FloatTensor'`` before clipping.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a) and not isinstance(a, bool)) else a
                         for i, a in enumerate(args))
        return func(*args, **kwargs)


class _NullEvent:
    """A stand-in for ``torch.cuda.Event``: already complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """A stand-in for ``torch.cuda.Stream`` whose methods do nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> _NullEvent:
        return _NullEvent()  # MoE's token dispatcher synchronizes on it

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _PremulSum:
    """NCCL's ``PREMUL_SUM`` reduction for gloo (what ``torch.distributed._make_nccl_premul_sum(f)``
    returns under :func:`cpu_shim`): every rank's input times ``factor``, then summed."""

    def __init__(self, factor: Any) -> None:
        self.factor = factor

    def __repr__(self) -> str:
        return f"PREMUL_SUM({self.factor})"


def _avg_emulating(collective, eager_in_coalescing: bool = False):
    """Wrap a gloo collective so that ``op=ReduceOp.AVG`` becomes SUM then ÷ group size, and
    ``op=PREMUL_SUM(f)`` (:class:`_PremulSum`) becomes ×f then SUM. ``eager_in_coalescing``: the
    collective has an output apart from its input (``reduce_scatter_tensor``).

    Inside ``torch.distributed._coalescing_manager`` a collective is only recorded and runs when
    the manager exits, so the division would come first. For an in-place ``all_reduce`` that is
    still the mean (÷ then SUM); for ``reduce_scatter_tensor`` the output is overwritten afterwards
    and the division lost (a SUM instead of an AVG): that one runs at once, outside the coalescing
    (same result; coalescing only batches the launches). ``PREMUL_SUM`` scales the in-place
    ``all_reduce`` tensor first, and a copy of ``reduce_scatter_tensor``'s input (the input itself
    is left as NCCL leaves it).
    """

    @functools.wraps(collective)
    def wrapper(*args: Any, **kwargs: Any):
        op = kwargs.get("op")
        premul = isinstance(op, _PremulSum)
        if op != dist.ReduceOp.AVG and not premul:
            return collective(*args, **kwargs)
        kwargs["op"] = dist.ReduceOp.SUM
        group = kwargs.get("group")
        size = dist.get_world_size(group)
        out = kwargs.get("output", args[0] if args else None)
        if premul and not eager_in_coalescing:  # in place: scale, then sum (also when deferred)
            kwargs.get("tensor", out).mul_(op.factor)
            return collective(*args, **kwargs)
        if premul:
            if "input" in kwargs:
                kwargs["input"] = kwargs["input"] * op.factor
            else:
                args = (args[0], args[1] * op.factor, *args[2:])
        async_op = kwargs.get("async_op", False)
        kwargs["async_op"] = False
        pending = None
        coalescing = getattr(dist.distributed_c10d, "_world", None)
        coalescing = getattr(coalescing, "pg_coalesce_state", None)
        key = group if group is not None else dist.distributed_c10d._get_default_group()
        if eager_in_coalescing and coalescing is not None and key in coalescing:
            pending = coalescing.pop(key)
        try:
            collective(*args, **kwargs)
        finally:
            if pending is not None:
                coalescing[key] = pending
        if not premul:
            out.div_(size)
        if async_op:
            return _DoneWork()
        return None

    wrapper.__wrapped_collective__ = collective  # type: ignore[attr-defined]
    return wrapper


def _cpu_mesh_from_group(from_group):
    """``DeviceMesh.from_group`` with a ``"cuda"`` device type built as a ``"cpu"`` mesh."""

    @functools.wraps(from_group)
    def wrapper(group: Any, device_type: str, *args: Any, **kwargs: Any):
        if isinstance(device_type, str) and device_type.startswith("cuda"):
            device_type = "cpu"
        return from_group(group, device_type, *args, **kwargs)

    return wrapper


class _DoneWork:
    def wait(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


_DOWNSTREAM_TAG, _UPSTREAM_TAG = 7101, 7102


def _exchange_shapes(tensor_send_next, tensor_send_prev, recv_prev, recv_next, prev_rank, next_rank, group):
    """Megatron's pipeline shape exchange with one tag per direction (see the module doc)."""

    def shape_of(t):
        return torch.tensor(t.size(), dtype=torch.int64)

    reqs = []
    recv_prev_shape = torch.zeros(3, dtype=torch.int64) if recv_prev else None
    recv_next_shape = torch.zeros(3, dtype=torch.int64) if recv_next else None
    if tensor_send_next is not None:
        reqs.append(dist.isend(shape_of(tensor_send_next), next_rank, group, _DOWNSTREAM_TAG))
    if recv_prev_shape is not None:
        reqs.append(dist.irecv(recv_prev_shape, prev_rank, group, _DOWNSTREAM_TAG))
    if tensor_send_prev is not None:
        reqs.append(dist.isend(shape_of(tensor_send_prev), prev_rank, group, _UPSTREAM_TAG))
    if recv_next_shape is not None:
        reqs.append(dist.irecv(recv_next_shape, next_rank, group, _UPSTREAM_TAG))
    for req in reqs:
        req.wait()
    return (
        recv_prev_shape.tolist() if recv_prev_shape is not None else [0, 0, 0],
        recv_next_shape.tolist() if recv_next_shape is not None else [0, 0, 0],
    )


def _tagged_communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """``P2PCommunicator._communicate_shapes`` (megatron-core >= 0.14), tagged."""
    return _exchange_shapes(tensor_send_next, tensor_send_prev, recv_prev, recv_next,
                            self.prev_rank, self.next_rank, self.pp_group)


def _tagged_communicate_shapes_module(tensor_send_next, tensor_send_prev, recv_prev, recv_next, config):
    """``p2p_communication._communicate_shapes`` (megatron-core 0.13), tagged."""
    from megatron.core import parallel_state as ps

    return _exchange_shapes(tensor_send_next, tensor_send_prev, recv_prev, recv_next,
                            ps.get_pipeline_model_parallel_prev_rank(),
                            ps.get_pipeline_model_parallel_next_rank(), None)


@contextlib.contextmanager
def cpu_shim() -> Iterator[None]:
    """Make Megatron-Core run on the CPU while active (see the module docstring).

    Patches ``torch.cuda.{current_device, synchronize, current_stream, default_stream, Stream,
    Event, stream, set_stream, empty_cache, device_count, manual_seed}``, the no-op
    ``CudaRNGStatesTracker.fork``, the MoE router's missing ``te_general_gemm`` name, AVG and
    PREMUL_SUM emulation for ``all_reduce``/``reduce_scatter_tensor`` (with
    ``_make_nccl_premul_sum``), ``DeviceMesh.from_group(...,
    "cuda")`` as a CPU mesh and ``torch.cuda.{get,set}_rng_state`` (FSDP wrappers,
    :mod:`megatron_agg.compare.wrappers`); all are restored on exit.
    """
    patches: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        patches.append((obj, name, getattr(obj, name, None)))
        setattr(obj, name, value)

    patch(torch.cuda, "current_device", lambda: 0)
    patch(torch.cuda, "synchronize", lambda *a, **k: None)
    patch(torch.cuda, "current_stream", lambda *a, **k: _NullStream())
    patch(torch.cuda, "default_stream", lambda *a, **k: _NullStream())
    patch(torch.cuda, "Stream", _NullStream)
    patch(torch.cuda, "Event", _NullEvent)
    patch(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    patch(torch.cuda, "set_stream", lambda *a, **k: None)
    patch(torch.cuda, "empty_cache", lambda *a, **k: None)
    patch(torch.cuda, "manual_seed", lambda *a, **k: None)
    patch(torch.cuda, "manual_seed_all", lambda *a, **k: None)
    patch(dist, "all_reduce", _avg_emulating(dist.all_reduce))
    patch(dist, "reduce_scatter_tensor", _avg_emulating(dist.reduce_scatter_tensor, eager_in_coalescing=True))
    # FSDP on the CPU (Megatron's TorchFullyShardedDataParallel and Megatron-FSDP build their
    # meshes with DeviceMesh.from_group(group, "cuda")); the Megatron-FSDP adapter syncs the CUDA
    # RNG state over TP, which a CPU build of torch has none of.
    from torch.distributed.device_mesh import DeviceMesh

    patches.append((DeviceMesh, "from_group", DeviceMesh.__dict__["from_group"]))  # the staticmethod itself
    DeviceMesh.from_group = staticmethod(_cpu_mesh_from_group(DeviceMesh.from_group))
    patch(dist, "_make_nccl_premul_sum", _PremulSum)  # Megatron-FSDP's gradient_reduce_div_fusion
    patch(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    patch(torch.cuda, "set_rng_state", lambda *a, **k: None)
    try:
        from megatron.core.tensor_parallel import random as mrandom

        @contextlib.contextmanager
        def _fork(self: Any, name: Any = None) -> Iterator[None]:
            yield

        patch(mrandom.CudaRNGStatesTracker, "fork", _fork)
        from megatron.core.pipeline_parallel import p2p_communication as p2p

        if hasattr(getattr(p2p, "P2PCommunicator", None), "_communicate_shapes"):
            patch(p2p.P2PCommunicator, "_communicate_shapes", _tagged_communicate_shapes)
        elif hasattr(p2p, "_communicate_shapes"):
            patch(p2p, "_communicate_shapes", _tagged_communicate_shapes_module)
    except ImportError:  # Megatron not installed: the torch part still helps
        pass
    try:
        # The MoE router's gating GEMM tests ``te_general_gemm is not None``; without Transformer
        # Engine some releases (0.16) never define the name: the torch path it falls back to.
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            patch(moe_utils, "te_general_gemm", None)
    except ImportError:
        pass
    mode = CpuDeviceMode()
    try:
        with mode:
            yield
    finally:
        for obj, name, old in reversed(patches):
            setattr(obj, name, old)
