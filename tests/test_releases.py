"""The release table and the group resolution: probed behaviour equals the documented one."""

import re

import pytest

from megatron_agg.megatron.averaging import RELEASES
from megatron_agg.megatron.model_setup import resolve_groups
from megatron_agg.megatron.releases import (
    TESTED_MEGATRON_CORE,
    _check_release_behaviour,
    check_megatron_version,
    probe_schedule,
    detect_release_behaviour,
    known_release_behaviour,
    megatron_core_version,
)


def test_installed_release_behaves_as_the_table_says():
    detected = detect_release_behaviour()
    documented = known_release_behaviour()
    assert documented is not None, f"megatron-core {megatron_core_version()} is not in RELEASES"
    assert detected == documented


def test_table_covers_every_supported_minor_release():
    assert sorted(RELEASES) == [f"0.{m}" for m in range(13, 21)]
    assert TESTED_MEGATRON_CORE == tuple(f"0.{m}" for m in range(13, 21))


@pytest.fixture
def fresh_policy():
    """The version policy's once-per-process probe, forgotten before and after the test."""
    _check_release_behaviour.cache_clear()
    yield
    _check_release_behaviour.cache_clear()


def test_the_installed_schedule_scales_as_the_table_says():
    differs = probe_schedule()
    assert differs in ([], None)  # None: 0.13, whose schedule reads parallel_state (source probe only)


def test_a_newer_release_with_known_arithmetic_is_accepted_with_a_warning(fresh_policy):
    installed = known_release_behaviour()
    with pytest.warns(UserWarning, match=r"megatron-core 0\.99\.0 is newer .* accepted .* that of release\(s\) .*"
                      + re.escape(installed.release)):
        assert check_megatron_version("0.99.0") == "0.99.0"


def test_a_tested_release_that_behaves_otherwise_is_refused(fresh_policy):
    other = "0.13.1" if known_release_behaviour().release != "0.13" else "0.19.2"
    with pytest.raises(RuntimeError, match=r"does not behave as megatron_agg's table says its release"):
        check_megatron_version(other)


def _changed_rule(original):
    """A stand-in for a future schedule: the 3-tuple path without per-token loss also multiplies
    by cp (an open upstream proposal all-reduces num_tokens over CP and corrects by × cp)."""

    def forward_step_calc_loss(model, output_tensor, loss_func, config, vp_stage, collect_non_loss_data,
                               num_microbatches, forward_data_store, cp_group_size=None, is_last_stage=None):
        lengths = []

        def recorded(output):
            outputs = loss_func(output)
            lengths.append(len(outputs))
            return outputs

        out, num_tokens = original(model, output_tensor, recorded, config, vp_stage, collect_non_loss_data,
                                   num_microbatches, forward_data_store, cp_group_size, is_last_stage)
        if lengths == [3] and not config.calculate_per_token_loss:
            out = out * cp_group_size
        return out, num_tokens

    return forward_step_calc_loss


def test_an_unrecognised_schedule_arithmetic_is_refused_with_what_differs(fresh_policy, monkeypatch):
    from megatron.core.pipeline_parallel import schedules

    if probe_schedule() is None:
        pytest.skip("this release's schedule is read from its source only")
    monkeypatch.setattr(schedules, "forward_step_calc_loss", _changed_rule(schedules.forward_step_calc_loss))
    assert probe_schedule()  # the probe sees it
    with pytest.raises(RuntimeError, match=r"scales the losses differently .*3-tuple, num_tokens=5: the loss is "
                                           r"multiplied by 0\.133333, not 0\.0666667"):
        check_megatron_version("0.99.0")
    _check_release_behaviour.cache_clear()
    with pytest.raises(RuntimeError, match="scales the losses differently"):
        check_megatron_version()  # the installed release number does not save it either


def _unclamped(original):
    """A stand-in for 0.14's schedule: the 3-tuple path divides by ``num_tokens`` without a clamp."""

    def forward_step_calc_loss(model, output_tensor, loss_func, config, vp_stage, collect_non_loss_data,
                               num_microbatches, forward_data_store, cp_group_size=None, is_last_stage=None):
        outputs = []

        def recorded(output):
            outputs.append(loss_func(output))
            return outputs[-1]

        out, num_tokens = original(model, output_tensor, recorded, config, vp_stage, collect_non_loss_data,
                                   num_microbatches, forward_data_store, cp_group_size, is_last_stage)
        if len(outputs[0]) == 3 and not config.calculate_per_token_loss and int(num_tokens) == 0:
            out = out / num_tokens  # what 1 / num_tokens gives where clamp(num_tokens, 1) gave 1
        return out, num_tokens

    return forward_step_calc_loss


def test_the_probe_holds_the_clamp_to_what_the_source_says(monkeypatch):
    from megatron.core.pipeline_parallel import schedules

    if probe_schedule() is None:
        pytest.skip("this release's schedule is read from its source only")
    assert probe_schedule(clamps_num_tokens=True) == []
    assert any("num_tokens=0: the loss is multiplied by 0.333333, not inf" in d
               for d in probe_schedule(clamps_num_tokens=False))
    monkeypatch.setattr(schedules, "forward_step_calc_loss", _unclamped(schedules.forward_step_calc_loss))
    assert probe_schedule(clamps_num_tokens=False) == []  # 0.14: no clamp, and the table says so
    assert probe_schedule(clamps_num_tokens=True) == [
        "3-tuple, num_tokens=0: the loss is multiplied by inf, not 0.333333"]


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
