"""The plain-PyTorch reference model computes what Megatron's GPTModel computes."""

import torch

from megatron_agg.compare import data as data_mod
from megatron_agg.compare.gpt import TinyGPT, build_chunks, full_name, load_full_weights, reference_grads
from megatron_agg.compare.parallel import Layout
from megatron_agg.compare.reference_gpt import init_full_weights, param_names, per_token_loss


def test_reference_matches_megatron_gpt_model(megatron_cpu):
    spec = TinyGPT(num_layers=2)
    (model,) = build_chunks(spec, Layout())
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == param_names(spec)
    full = init_full_weights(spec, seed=3)
    load_full_weights([model], full)
    batch = data_mod.make_global_batch(spec.vocab_size)
    pos = torch.arange(batch.seq_length).unsqueeze(0).expand_as(batch.tokens)

    ce = model(batch.tokens, pos, None, labels=batch.labels)
    ref = per_token_loss(full, spec, batch.tokens, pos, batch.labels)
    assert ce.shape == ref.shape == batch.tokens.shape
    assert torch.allclose(ce, ref, rtol=1e-5, atol=1e-5)

    (ce * batch.loss_mask).sum().backward()
    ref_g = reference_grads(full, lambda w: (per_token_loss(w, spec, batch.tokens, pos, batch.labels) * batch.loss_mask).sum())
    for name, p in model.named_parameters():
        g, r = p.grad, ref_g[full_name(model, name)]
        assert float((g - r).abs().max()) <= 1e-5 * float(r.abs().max()), name


def test_moe_reference_matches_megatron_moe_model(megatron_cpu):
    """The MoE reference (router top-k + softmax over the k, SequentialMLP experts, no biases)
    equals Megatron's own single-rank local-spec MoE GPTModel, per token and in the gradients."""
    from megatron_agg.compare.gpt import TinyMoEGPT

    spec = TinyMoEGPT()
    for dispatcher in ("alltoall", "allgather"):
        (model,) = build_chunks(spec, Layout(), moe_token_dispatcher_type=dispatcher)
        assert {n: tuple(p.shape) for n, p in model.named_parameters()} == param_names(spec)
        full = init_full_weights(spec, seed=3)
        load_full_weights([model], full)
        batch = data_mod.make_global_batch(spec.vocab_size)
        pos = torch.arange(batch.seq_length).unsqueeze(0).expand_as(batch.tokens)

        ce = model(batch.tokens, pos, None, labels=batch.labels)
        ref = per_token_loss(full, spec, batch.tokens, pos, batch.labels)
        assert ce.shape == ref.shape == batch.tokens.shape
        assert torch.allclose(ce, ref, rtol=1e-5, atol=1e-5), float((ce - ref).abs().max())

        (ce * batch.loss_mask).sum().backward()
        ref_g = reference_grads(full, lambda w: (per_token_loss(w, spec, batch.tokens, pos, batch.labels) * batch.loss_mask).sum())
        for name, p in model.named_parameters():
            g, r = p.grad, ref_g[full_name(model, name)]
            assert float(r.abs().max()) > 0, name  # every expert and the router get a gradient
            assert float((g - r).abs().max()) <= 1e-5 * float(r.abs().max()), name
