"""The version policy: which installed megatron-core is accepted, read from what its code does.

A megatron-core is accepted when the arithmetic of its loss path, probed from the installed code,
is a row of the release table (:data:`megatron_agg.megatron.averaging.RELEASES`):
:func:`check_megatron_version` (once per process) reads where the schedule takes its groups and
whether it clamps ``num_tokens`` (:func:`detect_release_behaviour`) and runs Megatron's own
``forward_step_calc_loss`` on every loss path (:func:`probe_schedule`); a newer release than the
newest tested one is accepted with a one-time warning naming the row it matched; anything else is
refused with what differs. Megatron is imported lazily (:func:`_import`); no collective.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import importlib
import warnings
from typing import Any, List, Optional

import torch

from .averaging import RELEASES, LossReturn, ReleaseBehaviour, schedule_factor

__all__ = [
    "SUPPORTED_MEGATRON_CORE",
    "MegatronSymbolError",
    "megatron_core_version",
    "check_megatron_version",
    "TESTED_MEGATRON_CORE",
    "probe_schedule",
    "minor_release",
    "detect_release_behaviour",
    "known_release_behaviour",
]


#: The megatron-core requirement (setup.py declares the same). There is no ceiling: a release is
#: accepted by what its code does (:func:`check_megatron_version`), not by its number.
SUPPORTED_MEGATRON_CORE = (">=0.13.0",)
_SUPPORTED_MIN = (0, 13)
#: The minor releases the version matrix runs (scripts/run_version_matrix.sh); 0.20 is
#: Megatron-LM ``main``. Each has a row in :data:`megatron_agg.megatron.averaging.RELEASES`.
TESTED_MEGATRON_CORE = tuple(sorted(RELEASES, key=lambda r: tuple(int(p) for p in r.split("."))))


class MegatronSymbolError(ImportError):
    """A Megatron-Core symbol megatron_agg relies on is missing (moved or renamed upstream)."""


def _import(module: str, name: Optional[str] = None) -> Any:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise MegatronSymbolError(
            f"megatron_agg needs {module!r} from megatron-core "
            f"{' '.join(SUPPORTED_MEGATRON_CORE)} and could not import it ({exc}). "
            "Install a supported release: pip install 'megatron-core>=0.13'."
        ) from exc
    if name is None:
        return mod
    try:
        return getattr(mod, name)
    except AttributeError as exc:
        raise MegatronSymbolError(
            f"megatron-core {megatron_core_version()} has no {module}.{name}, which megatron_agg "
            f"uses; supported releases are {' '.join(SUPPORTED_MEGATRON_CORE)}."
        ) from exc


@functools.lru_cache(maxsize=None)
def megatron_core_version() -> str:
    """The installed megatron-core version string (``'unknown'`` if it has none); read once per
    process (``importlib.metadata`` scans every installed distribution: ~3 ms a call, and every
    step asks)."""
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # noqa: BLE001 - a source checkout has no distribution metadata
        mod = _import("megatron.core")
        return str(getattr(mod, "__version__", "unknown"))


def _release(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_megatron_version(version: Optional[str] = None) -> str:
    """Apply the version policy to the installed megatron-core (``version``: its version string,
    read from the installed package when left out); returns the version.

    1. Older than 0.13: ``RuntimeError`` (the process-group APIs megatron_agg reads are missing).
    2. The loss path is probed from the installed code (:func:`detect_release_behaviour`: where
       the schedule takes its groups, whether it clamps ``num_tokens``, ...; and
       :func:`probe_schedule`: Megatron's own ``forward_step_calc_loss`` run on every loss path
       with a stand-in config, factor by factor against the schedule column of
       :mod:`megatron_agg.megatron.averaging`).
    3. A tested minor release (:data:`TESTED_MEGATRON_CORE`) must match its own row; a newer one
       must match some row and is accepted with a one-time warning naming that row; a probe that
       matches no row, or a schedule that scales a loss path differently, is a ``RuntimeError``
       that says what differs. Nothing is guessed from a version number alone.

    The probe runs once per process and issues no collective.
    """
    version = version or megatron_core_version()
    if version == "unknown":
        return version
    release = _release(version)
    if release < _SUPPORTED_MIN:
        raise RuntimeError(
            f"megatron_agg supports megatron-core {' '.join(SUPPORTED_MEGATRON_CORE)}, but "
            f"{version} is installed; install a supported release or upgrade megatron_agg."
        )
    _check_release_behaviour(f"{release[0]}.{release[1]}", version)
    return version


@functools.lru_cache(maxsize=None)
def _check_release_behaviour(minor: str, version: str) -> ReleaseBehaviour:
    try:
        detected = detect_release_behaviour()
        schedule_differs = probe_schedule(detected.schedule_clamps_num_tokens)
    except MegatronSymbolError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means: not recognised
        raise RuntimeError(
            f"megatron_agg could not probe the loss arithmetic of megatron-core {version} "
            f"({type(exc).__name__}: {exc}); it refuses a release whose arithmetic it cannot read. "
            f"Tested releases: {', '.join(TESTED_MEGATRON_CORE)}."
        ) from exc
    if schedule_differs is None and minor not in RELEASES:
        raise RuntimeError(
            f"megatron-core {version} is not a tested release and its schedule cannot be probed on its "
            "own (no forward_step_calc_loss(..., cp_group_size, is_last_stage)); megatron_agg refuses it "
            f"rather than guess. Tested releases: {', '.join(TESTED_MEGATRON_CORE)}."
        )
    if schedule_differs:
        raise RuntimeError(
            f"megatron-core {version} scales the losses differently from every release megatron_agg "
            f"knows ({'; '.join(schedule_differs)}), so its rescaling would not be exact; use a tested "
            f"release ({', '.join(TESTED_MEGATRON_CORE)}) or a megatron_agg that knows this one."
        )
    facts = dataclasses.replace(detected, release="")
    matches = [r for r, row in RELEASES.items() if dataclasses.replace(row, release="") == facts]
    own = RELEASES.get(minor)
    if own is not None:
        if minor not in matches:
            raise RuntimeError(
                f"megatron-core {version} does not behave as megatron_agg's table says its release "
                f"{minor} does: {_differences(own, detected)}. Is it a modified build? Use an unmodified "
                "release, or a megatron_agg that knows this one."
            )
        return detected
    if not matches or _release(minor) < _release(TESTED_MEGATRON_CORE[-1]):
        closest = min(RELEASES.values(), key=lambda row: len(_differences(row, detected).split("; ")))
        raise RuntimeError(
            f"megatron-core {version} is not a tested release and its probed loss arithmetic matches "
            f"no known one (closest: {closest.release}, which differs in: {_differences(closest, detected)}); "
            f"megatron_agg refuses it rather than guess. Tested releases: {', '.join(TESTED_MEGATRON_CORE)}."
        )
    warnings.warn(
        f"megatron-core {version} is newer than the newest release megatron_agg was tested with "
        f"({TESTED_MEGATRON_CORE[-1]}); accepted because its probed loss arithmetic (the schedule's "
        f"factors on every loss path, {_facts(detected)}) is that of release(s) {', '.join(matches)}.",
        stacklevel=3,
    )
    return detected


def _facts(behaviour: ReleaseBehaviour) -> str:
    return ", ".join(f"{f.name}={getattr(behaviour, f.name)!r}" for f in dataclasses.fields(behaviour)
                     if f.name != "release")


def _differences(row: ReleaseBehaviour, detected: ReleaseBehaviour) -> str:
    return "; ".join(f"{f.name} is {getattr(detected, f.name)!r}, not {getattr(row, f.name)!r}"
                     for f in dataclasses.fields(row) if f.name != "release"
                     and getattr(row, f.name) != getattr(detected, f.name)) or "nothing"


def probe_schedule(clamps_num_tokens: Optional[bool] = None) -> Optional[List[str]]:
    """Run the installed ``schedules.forward_step_calc_loss`` on every loss path and compare the
    factor it applies to a loss with :func:`megatron_agg.megatron.averaging.schedule_factor`; returns what
    differs (empty: the schedule column of the table holds; ``None``: this release's schedule cannot
    be run on its own, see below).

    The stand-in is the last pipeline stage of a step with ``cp = 2`` and ``M = 3`` micro-batches,
    a loss of 1 and ``num_tokens`` 5 and 0 (the clamp), with a config that has no MoE, MTP or
    timers; the probe also checks that ``num_tokens`` comes back as the ``loss_func`` returned it.
    ``clamps_num_tokens`` is what the source probe read (left out: read here); at ``num_tokens = 0``
    a release that does not clamp must divide by 0 (``inf``), one that clamps by 1.
    Releases whose schedule has no ``forward_step_calc_loss`` taking ``cp_group_size`` and
    ``is_last_stage`` (0.13, which reads them from ``parallel_state``) are read from their
    source by :func:`detect_release_behaviour` only. No collective, no process group.
    """
    import inspect
    import types

    schedules = _import("megatron.core.pipeline_parallel.schedules")
    calc_loss = getattr(schedules, "forward_step_calc_loss", None)
    if calc_loss is None or not {"cp_group_size", "is_last_stage"} <= set(inspect.signature(calc_loss).parameters):
        return None
    if clamps_num_tokens is None:
        clamps_num_tokens = detect_release_behaviour().schedule_clamps_num_tokens
    cp, microbatches = 2, 3
    differs = []
    for loss_return in LossReturn:
        for per_token in (False, True):
            for nt in (5, 0):
                if loss_return is LossReturn.TWO_TUPLE and nt == 0:
                    continue
                config = types.SimpleNamespace(calculate_per_token_loss=per_token, timers=None,
                                               grad_scale_func=None)
                num_tokens = torch.tensor(nt, dtype=torch.int)

                def loss_func(output, nt=num_tokens, loss_return=loss_return):
                    loss = torch.ones((), dtype=torch.float32)
                    return (loss, nt, {}) if loss_return is LossReturn.THREE_TUPLE else (loss, {})

                out, returned = calc_loss(types.SimpleNamespace(), torch.zeros(()), loss_func, config, None,
                                          False, microbatches, [], cp_group_size=cp, is_last_stage=True)
                path = f"{loss_return.value}{' with calculate_per_token_loss' if per_token else ''}, num_tokens={nt}"
                expected = schedule_factor(loss_return, per_token, cp, microbatches, nt, clamps_num_tokens)
                if not math.isclose(float(out), expected, rel_tol=1e-6):
                    differs.append(f"{path}: the loss is multiplied by {float(out):.6g}, not {expected:.6g}")
                expected_nt = nt if loss_return is LossReturn.THREE_TUPLE else 0
                if int(returned) != expected_nt:
                    differs.append(f"{path}: num_tokens comes back as {int(returned)}, not {expected_nt}")
    return differs


def minor_release() -> str:
    """The installed megatron-core's minor release (``"0.16"``), the key of the tables."""
    release = _release(megatron_core_version())
    return f"{release[0]}.{release[1]}" if len(release) >= 2 else ""


def detect_release_behaviour() -> ReleaseBehaviour:
    """The :class:`ReleaseBehaviour` of the installed megatron-core, found by probing its
    signatures and code rather than its version string."""
    import inspect

    schedules = _import("megatron.core.pipeline_parallel.schedules")
    finalize = _import("megatron.core.distributed.finalize_model_grads")
    ps = _import("megatron.core.parallel_state")
    params = inspect.signature(schedules.forward_backward_no_pipelining).parameters
    if "pg_collection" in params:
        groups = "pg_collection"
    elif "grad_finalize_pgs" in params:
        groups = "grad_finalize_pgs"
    else:
        groups = "parallel_state"
    calc_loss = getattr(schedules, "forward_step_calc_loss", None) or schedules.forward_step
    calc_src = inspect.getsource(calc_loss)
    finalize_src = inspect.getsource(finalize.finalize_model_grads)
    return ReleaseBehaviour(
        release=".".join(str(p) for p in _release(megatron_core_version())),
        schedule_clamps_num_tokens="clamp(num_tokens" in calc_src,
        finalize_clamps_num_tokens="clamp(num_tokens" in finalize_src,
        schedule_groups=groups,
        moe_aux_loss_cp_factor="cp_group_size / num_microbatches" in calc_src
        or "cp_size_for_scaling / num_microbatches" in calc_src,
        gtp_remat="with_gtp_remat" in inspect.signature(ps.get_data_parallel_group).parameters,
    )


def known_release_behaviour(version: Optional[str] = None) -> Optional[ReleaseBehaviour]:
    """The documented behaviour of a release (``None`` if it is not in the table)."""
    release = _release(version or megatron_core_version())
    return RELEASES.get(f"{release[0]}.{release[1]}")
