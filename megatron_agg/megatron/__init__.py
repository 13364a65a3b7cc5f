"""Megatron's rules in one place: the only code in megatron_agg that imports Megatron (lazily).

- :mod:`.averaging` — what Megatron-Core does to a returned loss and to the gradients, per release
  (:data:`~.averaging.RELEASES`, :data:`~.averaging.WRAPPERS`), and the factor ``F`` that undoes it
  (:func:`~.averaging.loss_multiplier`); plain arithmetic, no Megatron import.
- :mod:`.wrapper_defects` — the set-ups in which a Megatron-FSDP wrapper gets the gradients wrong
  by itself, per release; plain data.
- :mod:`.releases` — the version policy: a megatron-core is accepted by its probed loss arithmetic
  (:func:`~.releases.check_megatron_version`), not by its version number.
- :mod:`.model_setup` — a model's set-up as Megatron holds it: the step's process groups, the
  context-parallel layout, dynamic CP, auxiliary losses, the model config and its data-parallel
  wrapper, and :func:`~.model_setup.step_averaging` (what Megatron will do to this step).
- :mod:`.deferred_rules` — what the deferred mode needs of that set-up (Megatron's per-token
  division, no sequence mean under dynamic CP, no token-scaled auxiliary loss on another denominator,
  a wrapper whose finalize divides), each as the reason it would not be exact.

Everything is read from Megatron's config objects and code on this rank: no collective. The rest
of the package imports these names from here.
"""

from .averaging import LossReturn, MegatronAveraging, loss_multiplier, report_count, wrapper_behaviour
from .model_setup import (OWNER_ATTRIBUTE, checked_cp_layout, dynamic_cp_switches, finalize_owner, model_config,
                          refuse_wrapper_defects, resolve_groups, step_averaging, step_wrapper,
                          token_scaled_auxiliary_losses, unwrap_finalize, wrap_finalize)
from .releases import SUPPORTED_MEGATRON_CORE, check_megatron_version, megatron_core_version, minor_release

__all__ = [
    "LossReturn",
    "MegatronAveraging",
    "loss_multiplier",
    "report_count",
    "wrapper_behaviour",
    "SUPPORTED_MEGATRON_CORE",
    "check_megatron_version",
    "megatron_core_version",
    "minor_release",
    "checked_cp_layout",
    "dynamic_cp_switches",
    "OWNER_ATTRIBUTE",
    "finalize_owner",
    "wrap_finalize",
    "unwrap_finalize",
    "model_config",
    "refuse_wrapper_defects",
    "resolve_groups",
    "step_averaging",
    "step_wrapper",
    "token_scaled_auxiliary_losses",
]
