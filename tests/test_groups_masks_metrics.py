"""token-sum, prompt-mean, per-term masks and exact metrics through LossHook on one rank with a real
GPTModel: exact against the definition, no host sync per micro-batch, every user mistake a
ValueError that says what to do. (Their multi-rank gradient proof: the matrix, tests/test_matrix.py;
FSDP: tests/test_fsdp.py; StepShares: tests/test_shares.py.)"""

from __future__ import annotations

import pytest
import torch

from megatron_agg import AggConfig, LossHook, LossTerm, reference_loss
from megatron_agg.compare import data as data_mod
from megatron_agg.compare.gpt import grad_error, reference_grads
from megatron_agg.compare.reference_gpt import per_token_loss
from megatron_agg.step_math import TotalsLayout
from harness.sync_guard import forbid_host_sync

from test_hook_single_process import SPEC, Setup

TERMS = {"pg": LossTerm("token-mean"), "nll": LossTerm("token-mean", weight=0.5, mask="correct")}
METRICS = {"entropy": LossTerm("token-mean"), "clipfrac": LossTerm("prompt-mean", mask="correct"),
           "kl": LossTerm("seq-mean-token-mean", exclude_fully_masked_seqs=True, mask="correct"),
           "ratio": "token-sum"}
GROUPS = dict(num_groups=data_mod.NUM_GROUPS, group_scope="global")


def fn(out):
    return {"pg": out, "nll": 0.5 * out * out, "entropy": torch.exp(-out), "clipfrac": (out > 4.0).float(),
            "kl": 0.1 * out * out, "ratio": 1.0 + 0.01 * out}


def group_ids(mbs):
    return [torch.tensor([data_mod.GROUP_IDS[r] for r in mb.rows]) for mb in mbs]


def step(setup, hook, *, names=("default", "correct"), loss_fn=fn, guard=True, mbs=None, ids="default",
         loss_masks="default", loss_func_mask=None):
    mbs = setup.mbs if mbs is None else mbs
    for m in setup.model:
        m.zero_grad_buffer()

    def forward_step(it, chunk):
        mb = next(it)
        out = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels)
        mask = loss_func_mask(mb) if loss_func_mask else {n: mb.masks[n] for n in names}
        inner = hook.loss_func(mask, loss_fn)

        def guarded(*a, **k):
            if not guard:
                return inner(*a, **k)
            with forbid_host_sync():
                return inner(*a, **k)

        return out, guarded

    masks = {n: [mb.full_masks[n] for mb in mbs] for n in names} if loss_masks == "default" else loss_masks
    return hook.wrap(setup.fb)(forward_step_func=forward_step, data_iterator=iter(mbs), model=setup.model,
                               num_microbatches=len(mbs), seq_length=16, micro_batch_size=1, forward_only=False,
                               loss_masks=masks, group_ids=group_ids(mbs) if ids == "default" else ids)


@pytest.fixture
def setup(megatron_cpu):
    return Setup()


def references(setup, terms, metrics):
    b = setup.batch
    pos = torch.arange(b.seq_length).unsqueeze(0).expand_as(b.tokens)
    masks = b.masks
    ids = [list(data_mod.GROUP_IDS)]

    def ref(values, term):
        return reference_loss([values], [masks[term.mask]], term, group_ids=ids if term.agg_mode.needs_groups else None)

    def loss(w):
        parts = fn(per_token_loss(w, SPEC, b.tokens, pos, b.labels))
        return sum(ref(parts[n], t) for n, t in terms.items())

    with torch.no_grad():
        parts = fn(per_token_loss(setup.full, SPEC, b.tokens, pos, b.labels))
        metric_values = {n: float(ref(parts[n], t if isinstance(t, LossTerm) else LossTerm(t)))
                         for n, t in metrics.items()}
    return reference_grads(setup.full, loss), float(loss(setup.full)), metric_values


def test_terms_over_their_own_masks_and_exact_metrics(setup):
    hook = LossHook(terms=TERMS, metrics=METRICS, **GROUPS)
    losses = step(setup, hook)
    grads, value, metrics = references(setup, TERMS, METRICS)
    assert max(grad_error(setup.model, grads).values()) < 1e-5
    out = hook.global_loss()
    assert float(out["loss"]) == pytest.approx(value, rel=1e-5)
    for name, expected in metrics.items():
        assert float(out[name]) == pytest.approx(expected, rel=1e-5), name
        pair = torch.stack([r[name] for r in losses]).sum(dim=0)  # Megatron-LM's sum / count
        assert float(pair[0] / pair[1]) == pytest.approx(expected, rel=1e-5), name
    # a term's denominator from its own mask: the default mask's count gives another loss
    assert hook.last_step.totals[3] != hook.last_step.totals[0]  # T_correct != T_default


def test_token_sum_and_prompt_mean_are_exact(setup):
    for mode, kwargs in (("token-sum", {}), ("prompt-mean", GROUPS)):
        for exclude in (False, True):
            term = LossTerm(mode, exclude_fully_masked_seqs=exclude)
            hook = LossHook(terms={"loss": term}, **kwargs)
            step(setup, hook, names=("default",), loss_fn=None, ids="default" if kwargs else None,
                 loss_masks=[mb.full_loss_mask for mb in setup.mbs], loss_func_mask=lambda mb: mb.loss_mask)
            grads, value, _ = references(setup, {"pg": LossTerm(mode, exclude_fully_masked_seqs=exclude)}, {})
            assert max(grad_error(setup.model, grads).values()) < 1e-5, (mode, exclude)
            assert float(hook.global_loss()["loss"]) == pytest.approx(value, rel=1e-5)


def test_prompt_mean_excluding_empty_groups_differs(setup):
    """Group 8 holds only fully masked sequences: counted in P without exclude, not with it."""
    vals = []
    for exclude in (False, True):
        hook = LossHook(terms={"loss": LossTerm("prompt-mean", exclude_fully_masked_seqs=exclude)}, **GROUPS)
        step(setup, hook, names=("default",), loss_fn=None, loss_masks=[mb.full_loss_mask for mb in setup.mbs],
             loss_func_mask=lambda mb: mb.loss_mask)
        vals.append(float(hook.global_loss()["loss"]))
    assert vals[0] == pytest.approx(vals[1] * 8 / 9, rel=1e-6)  # P = 9 groups present, 8 with tokens


def test_configuration_mistakes():
    with pytest.raises(ValueError, match=r"prompt-mean \(\['loss'\]\) needs num_groups=G.*group_scope='global'"):
        LossHook("prompt-mean")
    with pytest.raises(ValueError, match="group_scope must be one of"):
        LossHook("prompt-mean", num_groups=4, group_scope="local")
    with pytest.raises(ValueError, match="num_groups must be an int >= 1"):
        LossHook("prompt-mean", num_groups=0, group_scope="global")
    with pytest.raises(ValueError, match="only apply to prompt-mean"):
        LossHook("token-mean", num_groups=4, group_scope="global")
    with pytest.raises(ValueError, match="already a loss term's name"):
        LossHook("token-mean", metrics={"loss": "token-mean"})
    with pytest.raises(ValueError, match="a metric is reported, not added to the loss"):
        LossHook("token-mean", metrics={"kl": LossTerm("token-mean", weight=0.1)})
    with pytest.raises(ValueError, match="LossTerm objects or modes"):
        LossHook("token-mean", metrics={"kl": 3})
    with pytest.raises(ValueError, match="mask must be the name"):
        LossTerm("token-mean", mask="")
    config = AggConfig(TERMS, metrics={"ent": "token-mean"})
    assert config.mask_names == ("default", "correct")
    assert config.totals_layout().size == 5
    # the masks a prompt-mean term or metric uses carry per-group counts, in the order of the masks
    grouped = AggConfig(TERMS, metrics=METRICS, **GROUPS).totals_layout(extra=1)
    assert grouped == TotalsLayout(("default", "correct"), ("correct",), data_mod.NUM_GROUPS, "global", extra=1)
    assert AggConfig({"a": LossTerm("token-mean", mask="correct")}).mask_names == ("correct",)


def test_step_mistakes_are_refused_before_the_step(setup):
    hook = LossHook(terms=TERMS, metrics=METRICS, **GROUPS)
    masks = [mb.full_loss_mask for mb in setup.mbs]
    with pytest.raises(ValueError, match=r"use the masks \['default', 'correct'\]; pass loss_masks=\{name"):
        step(setup, hook, loss_masks=masks)
    with pytest.raises(ValueError, match=r"missing: \['correct'\]"):
        step(setup, hook, loss_masks={"default": masks})
    with pytest.raises(ValueError, match=r"used by no term or metric: \['other'\]"):
        step(setup, hook, loss_masks={"default": masks, "correct": masks, "other": masks})
    with pytest.raises(ValueError, match=r"loss_masks\['correct'\]\[0\] has shape \(5, 15\)"):
        step(setup, hook, loss_masks={"default": masks, "correct": [masks[0][:, :15]] + masks[1:]})
    with pytest.raises(ValueError, match=r"prompt-mean needs group_ids=\[ids_0"):
        step(setup, hook, ids=None)
    with pytest.raises(ValueError, match=r"group_ids\[2\] must be a 1-D integer tensor with one id per sequence \(7 row\(s\)\)"):
        step(setup, hook, ids=[torch.zeros(b.tokens.shape[0], dtype=torch.long) for b in setup.mbs[:2]]
             + [torch.zeros(3, dtype=torch.long)] + [torch.zeros(b.tokens.shape[0], dtype=torch.long) for b in setup.mbs[3:]])
    with pytest.raises(ValueError, match=r"group_ids\[0\] must be a 1-D integer tensor"):
        step(setup, hook, ids=[torch.zeros(5)] + group_ids(setup.mbs)[1:])
    with pytest.raises(ValueError, match="no term or metric uses prompt-mean"):
        step(setup, LossHook("token-mean"), names=("default",), loss_fn=None,
             loss_masks=masks, loss_func_mask=lambda mb: mb.loss_mask)
    with pytest.raises(ValueError, match=r"needs this micro-batch's mask of every name.*'default', 'correct'"):
        step(setup, hook, loss_func_mask=lambda mb: mb.loss_mask)
    with pytest.raises(ValueError, match=r"returned terms \['pg'\], expected exactly .*\(the terms and the metrics\)"):
        step(setup, hook, loss_fn=lambda out: {"pg": out})


def test_group_ids_out_of_range_raise_at_the_end_of_the_step(setup):
    hook = LossHook("prompt-mean", **GROUPS)
    ids = group_ids(setup.mbs)
    ids[2] = ids[2].clone()
    ids[2][1] = data_mod.NUM_GROUPS  # one past the last id
    ids[4] = ids[4].clone()
    ids[4][0] = -1
    with pytest.raises(ValueError, match=r"Group ids outside \[0, num_groups\): group_ids: 2 id\(s\).*"
                                         r"group_scope='global' ids name the step's prompts 0 … 9"):
        step(setup, hook, names=("default",), loss_fn=None, ids=ids,
             loss_masks=[mb.full_loss_mask for mb in setup.mbs], loss_func_mask=lambda mb: mb.loss_mask)
    with pytest.raises(ValueError, match="the last step raised"):
        hook.global_loss()


def test_the_loss_functions_masks_are_checked_per_name(setup):
    hook = LossHook(terms=TERMS, metrics=METRICS, **GROUPS)
    with pytest.raises(ValueError, match=r"Micro-batch 0: the mask 'correct' given to .* differs from "
                                         r"loss_masks\['correct'\]\[0\] \(mask 'correct'\)"):
        step(setup, hook, loss_func_mask=lambda mb: {"default": mb.masks["default"],
                                                     "correct": torch.ones_like(mb.masks["correct"])})


def test_step_preparation_with_groups_and_masks_makes_no_host_sync(setup):
    from megatron_agg.engine import PreparedStep
    from megatron_agg.megatron.model_setup import resolve_groups
    from megatron_agg.scaling import MegatronScaling

    hook = LossHook(terms=TERMS, metrics=METRICS, **GROUPS)
    groups = resolve_groups()
    scaling = MegatronScaling.for_step(setup.model, hook.loss_return, len(setup.mbs), groups)
    masks = {n: [mb.full_masks[n] for mb in setup.mbs] for n in ("default", "correct")}
    with forbid_host_sync():
        prepared = PreparedStep(hook.config, masks, groups, scaling, group_ids=group_ids(setup.mbs))
        prepared.scales()
    assert prepared.layout.size == 3 + 2 + 10 * 2  # [T, N, N⁺], T/N⁺ of 'correct', S_g and M_g of 'correct'


def test_a_loss_function_mask_dict_without_a_name_raises_at_the_end_of_the_step(setup):
    """Recorded, not raised mid-schedule (another rank may be in Megatron's gradient all-reduce):
    the end-of-step check raises it on every rank; the gradients followed loss_masks meanwhile."""
    hook = LossHook(terms=TERMS, metrics=METRICS, **GROUPS)
    with pytest.raises(ValueError, match=r"got masks \['default'\] for micro-batch 0, but the step has the masks "
                                         r"\['default', 'correct'\].*Raised on every rank of the step"):
        step(setup, hook, loss_func_mask=lambda mb: {"default": mb.masks["default"]})
    assert hook.last_step is None
