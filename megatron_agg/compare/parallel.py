"""Initialize and tear down Megatron's model parallel state many times in one process.

``destroy_model_parallel()`` forgets Megatron's groups but leaves them alive; after a few dozen
re-initializations their threads make every gloo collective crawl. :func:`model_parallel`
records every group created while it initializes and destroys them on exit.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import torch.distributed as dist

__all__ = ["Layout", "model_parallel"]


@dataclass(frozen=True)
class Layout:
    """A parallel layout. ``dp`` is derived from the world size.

    ``ep`` (expert model parallel) and ``etp`` (expert tensor parallel; ``None``: Megatron's
    default, ``tp``) only matter for MoE models; the expert data-parallel size is
    ``world / (etp·ep·pp)`` (:meth:`edp`).
    """

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None

    def dp(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by tp·pp·cp = {model_parallel}")
        return world_size // model_parallel

    def edp(self, world_size: int) -> int:
        """The expert data-parallel size (Megatron's ``expert_data_parallel`` group)."""
        expert_parallel = (self.etp or self.tp) * self.ep * self.pp
        if world_size % expert_parallel:
            raise ValueError(f"world size {world_size} is not divisible by etp·ep·pp = {expert_parallel}")
        return world_size // expert_parallel

    def name(self, world_size: int) -> str:
        parts = [f"dp{self.dp(world_size)}", f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp:
            parts.append(f"vpp{self.vpp}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.etp is not None:
            parts.append(f"etp{self.etp}")
        return "-".join(parts)


def _expert_sizes(layout: Layout) -> dict:
    """The expert-parallel arguments of ``initialize_model_parallel`` (none for a dense layout,
    so that dense layouts initialize exactly as before)."""
    sizes = {}
    if layout.ep > 1:
        sizes["expert_model_parallel_size"] = layout.ep
    if layout.etp is not None:
        sizes["expert_tensor_parallel_size"] = layout.etp
    return sizes


@contextlib.contextmanager
def model_parallel(layout: Layout, **options: Any) -> Iterator[None]:
    """``initialize_model_parallel`` for ``layout`` (``options``: further keyword arguments of it,
    e.g. ``hybrid_context_parallel=True``); on exit destroy it and all its groups."""
    from megatron.core import parallel_state as ps

    created: List[object] = []
    original = dist.new_group

    def tracking_new_group(*args, **kwargs):
        group = original(*args, **kwargs)
        created.append(group)
        return group

    dist.new_group = tracking_new_group
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            context_parallel_size=layout.cp,
            create_gloo_process_groups=False,
            **_expert_sizes(layout),
            **options,
        )
    finally:
        dist.new_group = original
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        for group in created:
            if group is None or group == dist.GroupMember.NON_GROUP_MEMBER:
                continue
            with contextlib.suppress(Exception):
                dist.destroy_process_group(group)
        # A destroyed group's gloo threads end when its last reference goes; references caught in
        # reference cycles (models, configs, hooks of the layout) wait for the cyclic collector,
        # and a launch that builds hundreds of layouts piled up thousands of idle threads.
        del created
        gc.collect()
