"""The release table and the group resolution: probed behaviour equals the documented one."""

import pytest

from megatron_agg.averaging import RELEASES
from megatron_agg.integration import (
    detect_release_behaviour,
    known_release_behaviour,
    megatron_core_version,
    resolve_groups,
)


def test_installed_release_behaves_as_the_table_says():
    detected = detect_release_behaviour()
    documented = known_release_behaviour()
    assert documented is not None, f"megatron-core {megatron_core_version()} is not in RELEASES"
    assert detected == documented


def test_table_covers_every_supported_minor_release():
    assert sorted(RELEASES) == [f"0.{m}" for m in range(13, 20)]


def test_groups_come_from_the_callers_collection(megatron_cpu):
    from megatron.core import parallel_state as ps

    class Collection:  # what a caller passes: another object per field is taken as given
        pass

    pgs = Collection()
    pgs.dp = ps.get_data_parallel_group()
    pgs.cp = ps.get_context_parallel_group()
    pgs.dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    pgs.pp = ps.get_pipeline_model_parallel_group()
    groups = resolve_groups(pgs)
    assert groups.dp is pgs.dp and groups.cp is pgs.cp and groups.dp_cp is pgs.dp_cp and groups.pp is pgs.pp


def test_a_collection_with_a_missing_or_none_group_is_refused(megatron_cpu):
    from megatron.core import parallel_state as ps

    class Collection:
        pass

    pgs = Collection()
    pgs.dp = None  # 0.19's ProcessGroupCollection answers None for unset fields: not WORLD
    pgs.cp = ps.get_context_parallel_group()
    pgs.pp = ps.get_pipeline_model_parallel_group()
    with pytest.raises(ValueError, match="pg_collection has no dp, dp_cp group"):
        resolve_groups(pgs)
    with pytest.raises(ValueError, match="grad_finalize_pgs has no dp_cp group"):
        resolve_groups(None, pgs)
