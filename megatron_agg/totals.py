"""The step's totals vector (layout, local counts, denominators) under its earlier import path: it
lives in :mod:`megatron_agg.step_math`, whose docstring has the vector's layout table."""

from .step_math import GROUP_SCOPES, LocalTotals, StepTotals, TotalsLayout, checked_group_ids, local_totals_vector

__all__ = ["GROUP_SCOPES", "TotalsLayout", "LocalTotals", "StepTotals", "checked_group_ids", "local_totals_vector"]
