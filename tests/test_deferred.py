"""The deferred mode's contract (its gradients are in the matrix: variant deferred-3-tuple)."""

import pytest
import torch

from megatron_agg import DeferredLossHook, LossTerm, PackedSequences


def test_terms_with_different_denominators_need_the_prepared_mode():
    with pytest.raises(ValueError, match=r"different ones .*'pg': valid tokens \(T\).*'kl': sequences \(N\).*prepared mode"):
        DeferredLossHook(terms={"pg": LossTerm("token-mean"), "kl": LossTerm("seq-mean-token-mean")})
    with pytest.raises(ValueError, match="non-empty sequences"):
        DeferredLossHook(terms={"a": LossTerm("seq-mean-token-sum"),
                                "b": LossTerm("seq-mean-token-mean", exclude_fully_masked_seqs=True)})
    # one denominator, several terms: fine
    DeferredLossHook(terms={"a": LossTerm("seq-mean-token-sum"), "b": LossTerm("seq-mean-token-mean", weight=0.1)})


def test_config_must_route_num_tokens():
    hook = DeferredLossHook("seq-mean-token-mean")

    class Config:
        calculate_per_token_loss = False
        finalize_model_grads_func = object()

    with pytest.raises(ValueError, match="calculate_per_token_loss=True"):
        hook.check_config(Config())
    Config.calculate_per_token_loss = True
    hook.check_config(Config())
    Config.finalize_model_grads_func = None
    with pytest.raises(ValueError, match="finalize_model_grads_func"):
        hook.check_config(Config())


def test_sequence_token_counts_of_rows_and_packs():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    assert DeferredLossHook.sequence_token_counts(mask).tolist() == [2.0, 0.0]
    packed = PackedSequences([0, 3, 5], [0, 4, 8])
    row = torch.tensor([[1, 0, 1, 1, 1, 1, 0, 1]])  # position 3 and 7 are padding: not counted
    assert DeferredLossHook.sequence_token_counts(row, packed).tolist() == [2.0, 2.0]


def test_one_rank_deferred_loss_values(megatron_cpu):
    """On one rank the returned numerator / num_tokens is L, and num_tokens counts sequences."""
    from megatron_agg import reference_loss

    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    for term in [LossTerm("token-mean"), LossTerm("seq-mean-token-mean"),
                 LossTerm("seq-mean-token-mean", exclude_fully_masked_seqs=True),
                 LossTerm("seq-mean-token-sum-norm")]:
        hook = DeferredLossHook(terms={"loss": term})
        hook.install(_Config())
        numerator, num_tokens, report = hook.loss_func(mask)(loss)
        expected = {"token-mean": 4, "seq-mean-token-mean": 2 if term.exclude_fully_masked_seqs else 3,
                    "seq-mean-token-sum-norm": 3}[term.agg_mode.value]
        assert int(num_tokens) == expected and num_tokens.dtype == torch.int32
        assert float(numerator / num_tokens) == pytest.approx(float(reference_loss([loss], [mask], term)))
        assert report["loss"].tolist() == pytest.approx([float(numerator), float(expected)])


class _Config:
    """A Megatron config as far as the deferred mode reads it."""

    calculate_per_token_loss = True

    def __init__(self, per_token: bool = True) -> None:
        self.calculate_per_token_loss = per_token
        self.finalize_model_grads_func = lambda *a, **k: "finalized"


def test_deferred_refuses_megatrons_default_config_before_the_first_loss(megatron_cpu):
    """calculate_per_token_loss=False (Megatron's default) would divide every micro-batch by its own
    num_tokens: refused by install, and by the first loss when the model is passed."""
    hook = DeferredLossHook("token-mean")
    with pytest.raises(ValueError, match="calculate_per_token_loss=True.*silently wrong"):
        hook.install(_Config(per_token=False))
    assert not hook.installed
    mask, loss = torch.ones(2, 4), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"must check Megatron's config before the first loss.*install\(model\)"):
        hook.loss_func(mask)(loss)
    with pytest.raises(ValueError, match="calculate_per_token_loss=True"):
        hook.loss_func(mask, model=_Config(per_token=False))(loss)


def test_deferred_install_wraps_finalize_and_uninstall_restores_it(megatron_cpu):
    config = _Config()
    original = config.finalize_model_grads_func
    hook = DeferredLossHook("seq-mean-token-mean")
    hook.install(config)
    hook.install(config)  # idempotent
    assert config.finalize_model_grads_func.__wrapped__ is original
    hook.loss_func(torch.ones(2, 4))(torch.ones(2, 4))
    assert config.finalize_model_grads_func([]) == "finalized"  # the step's checks pass, then Megatron's
    with pytest.raises(ValueError, match="already wrapped by another DeferredLossHook"):
        DeferredLossHook("seq-mean-token-mean").install(config)
    hook.uninstall()
    assert config.finalize_model_grads_func is original


@pytest.mark.parametrize("case", ["nan-valid", "nan-masked", "mask-values", "counts-rows", "counts-packed",
                                  "counts-values", "boundaries"])
def test_deferred_checks_run_before_megatron_reduces_the_gradients(megatron_cpu, case):
    from megatron_agg import NonFiniteLossError

    config = _Config()
    hook = DeferredLossHook("seq-mean-token-mean")
    hook.install(config)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    loss = torch.ones(2, 4)
    kwargs = {}
    error, match = ValueError, None
    if case == "nan-valid":
        loss[0, 0] = float("nan")
        error, match = NonFiniteLossError, r"valid token's loss was NaN.*micro-batch\(es\) \[0\]"
    elif case == "nan-masked":
        loss[0, 3] = float("nan")
        error, match = NonFiniteLossError, "masked positions.*mask the \\*inputs\\*"
    elif case == "mask-values":
        mask[0, 0] = 0.5
        match = "Mask values other than 0 and 1.*1 value"
    elif case == "counts-rows":  # counts of a packed row handed with an unpacked mask
        kwargs["sequence_token_counts"] = torch.tensor([1.0, 1.0, 1.0])
        with pytest.raises(ValueError, match=r"holds 2 sequence\(s\).*packed_seqs in both"):
            hook.loss_func(mask, **kwargs)(loss)
        return
    elif case == "counts-packed":  # a packed row whose counts forgot the packing: no IndexError
        row = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0]])
        kwargs = {"packed_seqs": PackedSequences([0, 3, 6], [0, 4, 8]),
                  "sequence_token_counts": DeferredLossHook.sequence_token_counts(row)}
        with pytest.raises(ValueError, match=r"has shape \(1,\).*holds 2 sequence"):
            hook.loss_func(row, **kwargs)(torch.ones(1, 8))
        return
    elif case == "counts-values":
        kwargs["sequence_token_counts"] = torch.tensor([5.0, 3.0])
        match = "sequence_token_counts do not fit"
    elif case == "boundaries":
        row = torch.ones(1, 8)
        kwargs["packed_seqs"] = PackedSequences([0, 5, 3], [0, 6, 4])  # not cumulative
        mask, loss = row, torch.ones(1, 8)
        match = "not cumulative"
    hook.loss_func(mask, **kwargs)(loss)  # nothing is raised per micro-batch (no host sync)
    with pytest.raises(error, match=match):
        config.finalize_model_grads_func([])  # the wrapped finalize: before Megatron's own
    hook.loss_func(torch.ones(2, 4))(torch.ones(2, 4))  # the next step starts clean
    assert config.finalize_model_grads_func([]) == "finalized"


_DYNAMIC_CP = [("hybrid_context_parallel", True), ("dynamic_context_parallel", True),
               ("sequence_packing_scheduler", "default_hybrid_cp")]


@pytest.mark.parametrize("switch,value", _DYNAMIC_CP)
@pytest.mark.parametrize("term,metrics", [(LossTerm("seq-mean-token-mean"), None),
                                          (LossTerm("seq-mean-token-sum", exclude_fully_masked_seqs=True), None),
                                          (LossTerm("token-mean"), {"kl": "seq-mean-token-sum-norm"})])
def test_dynamic_context_parallelism_refuses_sequence_means_before_the_first_loss(megatron_cpu, switch, value,
                                                                                  term, metrics):
    """Under every name Megatron gives it (0.16-0.20 and Megatron-LM's development branch): a
    sequence mean (term or metric) needs each sequence counted once, on a rank the hook cannot see."""
    config = _Config()
    setattr(config, switch, value)
    hook = DeferredLossHook(terms={"loss": term}, metrics=metrics)
    with pytest.raises(ValueError, match=rf"cannot make .* exact under dynamic \(hybrid\) context parallelism "
                                         rf"\({switch}=.*use mode='token-mean' or 'token-sum'"):
        hook.install(config)
    assert not hook.installed and config.finalize_model_grads_func([]) == "finalized"


@pytest.mark.parametrize("switch,value", _DYNAMIC_CP)
def test_dynamic_context_parallelism_token_modes_return_megatrons_own_pair(megatron_cpu, switch, value):
    """token-mean and token-sum under dynamic CP: each rank's slice gives Σ m·l and its valid tokens
    (token-mean) or 1 on the step's first micro-batch (token-sum), whatever packing or
    whole-sequence counts the caller passes (a dynamic-CP slice's CP size is the sample's own). The
    gradient proof through Megatron's hybrid-CP schedule: tests/test_dynamic_cp.py."""
    mask = torch.tensor([[1, 1, 0, 1, 0, 1]])
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    # the whole sequence's packing and counts, as Megatron-LM's get_batch stashes them before the cut
    kwargs = {"packed_seqs": PackedSequences([0, 7, 12], [0, 8, 12]),
              "sequence_token_counts": torch.tensor([5.0, 3.0])}
    for mode, numerator, tokens in [("token-mean", 13.0, 4), ("token-sum", 13.0, 1)]:
        config = _Config()
        setattr(config, switch, value)
        hook = DeferredLossHook(mode, metrics={"m": "token-mean"})
        hook.install(config)
        both = lambda x: {"loss": x, "m": x}  # noqa: E731
        out, num_tokens, report = hook.loss_func(mask, both, **kwargs)(loss)
        assert float(out) == numerator and int(num_tokens) == tokens
        assert report["m"].tolist() == [13.0, 4.0]
        assert config.finalize_model_grads_func([]) == "finalized"  # the step's checks pass
        out, num_tokens, _ = hook.loss_func(mask, both, **kwargs)(loss)  # the next step's first micro-batch
        assert int(num_tokens) == tokens
        setattr(config, switch, None if isinstance(value, str) else False)  # switched off after install
        with pytest.raises(ValueError, match="dynamic context parallelism was switched off after"):
            config.finalize_model_grads_func([])


def test_prepared_entry_points_still_refuse_dynamic_context_parallelism():
    from types import SimpleNamespace

    from megatron_agg.megatron.model_setup import refuse_unsupported_layouts

    with pytest.raises(ValueError, match=r"does not support dynamic \(hybrid\) context parallelism "
                                         r"\(hybrid_context_parallel=True\).*deferred mode with token-mean"):
        refuse_unsupported_layouts(SimpleNamespace(hybrid_context_parallel=True), "LossHook")
    refuse_unsupported_layouts(SimpleNamespace(hybrid_context_parallel=False, sequence_packing_scheduler=None), "x")


# -- MoE auxiliary losses and MTP: token-scaled by Megatron -------------------------------------
def test_token_scaled_auxiliary_losses_are_read_from_the_config():
    from types import SimpleNamespace

    from megatron_agg.megatron.model_setup import token_scaled_auxiliary_losses as aux

    dense = SimpleNamespace(num_moe_experts=None, moe_aux_loss_coeff=0.01, mtp_num_layers=None)
    assert aux(dense) == []  # no experts: no router
    moe = dict(num_moe_experts=4, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0,
               moe_z_loss_coeff=None, mtp_num_layers=None)
    assert aux(SimpleNamespace(**moe)) == []
    assert aux(SimpleNamespace(**{**moe, "moe_aux_loss_coeff": 0.01})) == [
        "MoE load-balancing loss 'aux_loss' (moe_aux_loss_coeff=0.01)"]
    assert aux(SimpleNamespace(**{**moe, "moe_router_load_balancing_type": "sinkhorn", "moe_aux_loss_coeff": 0.01})) == []
    assert aux(SimpleNamespace(**{**moe, "moe_router_load_balancing_type": ["seq_aux_loss", "global_aux_loss"],
                                  "moe_aux_loss_coeff": [0.0, 0.02]})) == [
        "MoE load-balancing loss 'global_aux_loss' (moe_aux_loss_coeff=0.02)"]
    assert aux(SimpleNamespace(**{**moe, "moe_z_loss_coeff": 1e-3})) == ["MoE router z-loss (moe_z_loss_coeff=0.001)"]
    assert aux(SimpleNamespace(**{**moe, "moe_z_loss_coeff": 0.0})) == []
    assert aux(SimpleNamespace(num_moe_experts=None, mtp_num_layers=1, mtp_loss_scaling_factor=0.1)) == [
        "multi-token prediction loss (mtp_num_layers=1, mtp_loss_scaling_factor=0.1)"]


def _moe_step(mode: str, deferred: bool, aux_coeff: float, full=None):
    """One step of a small MoE GPT (4 experts, top-2, EP 1) on one rank, 3 micro-batches of
    different token and sequence counts, through the deferred or the prepared hook (3-tuple,
    calculate_per_token_loss). Returns (every parameter's main_grad, the full weights used)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_agg import LossHook
    from megatron_agg.compare import data as data_mod
    from megatron_agg.compare.gpt import TinyGPT, build_chunks, full_state_dict, load_full_weights, wrap_ddp
    from megatron_agg.compare.parallel import Layout

    spec = TinyGPT(num_layers=2, layer_spec=lambda: get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False))
    chunks = build_chunks(spec, Layout(), calculate_per_token_loss=True, num_moe_experts=4, moe_router_topk=2,
                          add_bias_linear=False, moe_router_load_balancing_type="aux_loss",
                          moe_aux_loss_coeff=aux_coeff)
    full = full if full is not None else full_state_dict(chunks[0])
    load_full_weights(chunks, full)
    model = wrap_ddp(chunks)
    batch = data_mod.make_global_batch(spec.vocab_size, 16)
    mbs = data_mod.split_for_rank(batch, 1, 0)[:3]
    hook = DeferredLossHook(mode) if deferred else LossHook(mode, loss_return="3-tuple")
    if deferred:
        hook.install(model)

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        output = chunk(mb.tokens, mb.position_ids, None, labels=mb.labels)
        return output, hook.loss_func(mb.loss_mask)

    fb = get_forward_backward_func()
    kwargs = dict(forward_step_func=forward_step, data_iterator=iter(mbs), model=model, num_microbatches=len(mbs),
                  seq_length=16, micro_batch_size=mbs[0].tokens.shape[0], forward_only=False)
    try:
        if deferred:
            fb(**kwargs)
        else:
            hook.wrap(fb)(loss_masks=[mb.full_loss_mask for mb in mbs], **kwargs)
    finally:
        if deferred:
            hook.uninstall()
    grads = {name: p.main_grad.detach().clone() for name, p in model[0].module.named_parameters()}
    return grads, full


def _max_rel(a, b):
    return max(float((a[n] - b[n]).abs().max()) / max(float(b[n].abs().max()), 1e-30) for n in b)


def test_deferred_keeps_the_weight_megatron_gives_moe_aux_losses(megatron_cpu):
    """With the aux loss on (calculate_per_token_loss: the router pre-multiplies it by the local
    token count), the deferred token-mean hook, whose num_tokens are Megatron-LM's own valid-token
    counts, gives every gradient of the prepared hook (router and experts included); a seq-mean
    mode, whose num_tokens count sequences, is refused before the first gradient — and is exact
    against the prepared hook once the aux coefficient is 0."""
    prepared, full = _moe_step("token-mean", deferred=False, aux_coeff=1e-2)
    deferred, _ = _moe_step("token-mean", deferred=True, aux_coeff=1e-2, full=full)
    no_aux, _ = _moe_step("token-mean", deferred=False, aux_coeff=0.0, full=full)
    router = [n for n in prepared if "router" in n]
    assert router and _max_rel(deferred, prepared) <= 1e-5
    # the aux loss really is on: it moves the router's gradient
    assert max(float((prepared[n] - no_aux[n]).abs().max()) / float(prepared[n].abs().max()) for n in router) > 1e-3

    with pytest.raises(ValueError, match=r"'seq-mean-token-mean' sends the step's sequences \(N\).*"
                                         r"MoE load-balancing loss 'aux_loss' \(moe_aux_loss_coeff=0.01\).*prepared"):
        _moe_step("seq-mean-token-mean", deferred=True, aux_coeff=1e-2, full=full)
    # Control: what the refusal prevents (the check switched off in a subclass): the router's
    # gradient is off by a factor of several and most parameters are wrong, with no error.
    global DeferredLossHook
    refusing = DeferredLossHook

    class Unchecked(refusing):
        def _auxiliary_loss_problem(self, config):
            return ""

    DeferredLossHook = Unchecked
    try:
        unchecked, _ = _moe_step("seq-mean-token-mean", deferred=True, aux_coeff=1e-2, full=full)
    finally:
        DeferredLossHook = refusing
    prepared_seq_aux, _ = _moe_step("seq-mean-token-mean", deferred=False, aux_coeff=1e-2, full=full)
    assert _max_rel(unchecked, prepared_seq_aux) > 0.1
    prepared_seq, _ = _moe_step("seq-mean-token-mean", deferred=False, aux_coeff=0.0, full=full)
    deferred_seq, _ = _moe_step("seq-mean-token-mean", deferred=True, aux_coeff=0.0, full=full)
    assert _max_rel(deferred_seq, prepared_seq) <= 1e-5


def test_deferred_refuses_an_auxiliary_loss_switched_on_after_install(megatron_cpu):
    config = _Config()
    config.num_moe_experts, config.moe_router_load_balancing_type, config.moe_aux_loss_coeff = 4, "aux_loss", 0.0
    config.moe_z_loss_coeff, config.mtp_num_layers = None, None
    hook = DeferredLossHook("seq-mean-token-sum")
    hook.install(config)
    config.moe_z_loss_coeff = 1e-3
    hook.loss_func(torch.ones(2, 4))(torch.ones(2, 4))
    with pytest.raises(ValueError, match="config changed after DeferredLossHook.install.*z-loss"):
        config.finalize_model_grads_func([])
    with pytest.raises(ValueError, match="z-loss"):
        DeferredLossHook("seq-mean-token-sum").check_config(config)
    DeferredLossHook("token-mean").check_config(config)  # token-mean: Megatron's own denominator


# -- issue 13: token-sum, prompt-mean, per-term masks, metrics -----------------------------------
def test_prompt_mean_and_per_term_masks_need_the_prepared_mode():
    for kwargs in ({"mode": "prompt-mean"},
                   {"terms": {"a": LossTerm("token-mean"), "b": LossTerm("prompt-mean")}},
                   {"mode": "token-mean", "metrics": {"clip": "prompt-mean"}}):
        mode = kwargs.pop("mode", None)
        with pytest.raises(ValueError, match=r"cannot make prompt-mean exact.*1/M_g.*LossHook\('prompt-mean'"):
            DeferredLossHook(mode, **kwargs)
    with pytest.raises(ValueError, match=r"one mask per micro-batch.*\{'nll': 'correct'\}.*loss_masks=\{name"):
        DeferredLossHook(terms={"pg": LossTerm("token-mean"), "nll": LossTerm("token-mean", mask="correct")})
    with pytest.raises(ValueError, match=r"\{'kl': 'correct'\}"):
        DeferredLossHook("token-mean", metrics={"kl": LossTerm("token-mean", mask="correct")})
    with pytest.raises(ValueError, match=r"'a': no denominator \(token-sum: 1\).*'b': valid tokens"):
        DeferredLossHook(terms={"a": LossTerm("token-sum"), "b": LossTerm("token-mean")})


def test_token_sum_sends_a_total_of_one_through_num_tokens(megatron_cpu):
    """token-sum has no denominator: num_tokens is 1 on the step's first micro-batch of DP×CP rank 0
    and 0 elsewhere, so that Megatron divides the summed gradients by Σ num_tokens = 1."""
    hook = DeferredLossHook("token-sum")
    config = _Config()
    hook.install(config)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    loss = torch.arange(9.0).reshape(3, 3)
    outs = [hook.loss_func(mask)(loss) for _ in range(3)]
    assert [int(nt) for _, nt, _ in outs] == [1, 0, 0]
    assert float(outs[0][0]) == float((loss * mask).sum())
    pairs = torch.stack([rep["loss"] for _, _, rep in outs]).sum(dim=0)
    assert float(pairs[0] / pairs[1]) == pytest.approx(3 * float((loss * mask).sum()))  # L over the step
    config.finalize_model_grads_func([])  # a new step: the first micro-batch counts again
    assert int(hook.loss_func(mask)(loss)[1]) == 1
    hook.uninstall()
    moe = _Config()
    moe.num_moe_experts, moe.moe_router_load_balancing_type, moe.moe_aux_loss_coeff = 4, "aux_loss", 0.01
    moe.moe_z_loss_coeff, moe.mtp_num_layers = None, None
    with pytest.raises(ValueError, match=r"'token-sum' sends a total of 1.*MoE load-balancing"):
        DeferredLossHook("token-sum").check_config(moe)


def test_deferred_metrics_ride_in_the_reports(megatron_cpu):
    """Each metric's [sum, count] pairs add up over micro-batches (and ranks) to its exact value,
    whatever its mode; they never reach the loss."""
    from megatron_agg import reference_loss

    metrics = {"ent": LossTerm("token-mean"), "kl": LossTerm("seq-mean-token-mean"),
               "kl_ex": LossTerm("seq-mean-token-mean", exclude_fully_masked_seqs=True),
               "n": LossTerm("token-sum"), "r": LossTerm("seq-mean-token-sum-norm")}
    hook = DeferredLossHook("seq-mean-token-sum", metrics=metrics)
    hook.install(_Config())
    g = torch.Generator().manual_seed(1)
    masks = [torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), torch.tensor([[0, 1, 1, 1]]),
             torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])]
    losses = [torch.rand(m.shape, generator=g, requires_grad=True) for m in masks]
    outs = [hook.loss_func(m, lambda out: {"loss": out, **{n: 2 * out + i for i, n in enumerate(metrics)}})(l)
            for m, l in zip(masks, losses)]
    for i, (name, term) in enumerate(metrics.items()):
        pair = torch.stack([rep[name] for _, _, rep in outs]).sum(dim=0)
        expected = reference_loss([(2 * l + i).detach() for l in losses], masks, term)
        assert float(pair[0] / pair[1]) == pytest.approx(float(expected), rel=1e-6), name
    numerator = sum(o[0] for o in outs)
    (grad,) = torch.autograd.grad(numerator, losses[0])
    assert torch.equal(grad, masks[0].float())  # seq-mean-token-sum's numerator only: no metric in it
    hook.uninstall()


def test_evaluation_micro_batches_are_kept_apart_from_the_training_step(megatron_cpu):
    """Megatron-LM's evaluate() calls the same loss_func under torch.no_grad() (forward_only, no
    finalize): those micro-batches must neither shift the training step's count (token-sum's 1 on
    its first micro-batch) nor leave findings for the training step's check."""
    hook = DeferredLossHook("token-sum")
    config = _Config()
    hook.install(config)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    loss = torch.arange(6.0).reshape(2, 3)
    bad = loss.clone()
    bad[0, 0] = float("nan")
    with torch.no_grad():  # an evaluation pass of two micro-batches, one with a NaN at a valid token
        evals = [hook.loss_func(mask)(x) for x in (bad, loss)]
    assert [int(nt) for _, nt, _ in evals] == [1, 0]  # the pass's own token-sum: its 1 on its first
    train = [hook.loss_func(mask)(loss.requires_grad_()) for _ in range(2)]
    assert [int(nt) for _, nt, _ in train] == [1, 0]  # without the fix: [0, 0] (Σ num_tokens = 0)
    assert config.finalize_model_grads_func([]) == "finalized"  # the evaluation's NaN is not this step's
    with torch.no_grad():  # the next pass starts again at its first micro-batch
        assert int(hook.loss_func(mask)(loss)[1]) == 1
    # a NaN in a training micro-batch is still the step's
    hook.loss_func(mask)(bad.requires_grad_())
    from megatron_agg import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):
        config.finalize_model_grads_func([])
