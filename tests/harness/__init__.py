"""The test harness (not shipped): the gradient-equivalence matrix (:mod:`harness.matrix`), the
features suite (:mod:`harness.features`), Megatron-LM's real training script end to end
(:mod:`harness.megatron_lm`) and the host-sync / collective guard (:mod:`harness.sync_guard`).

Importable as ``harness`` with ``tests/`` on ``sys.path`` (pytest puts it there;
``tests/conftest.py``'s ``torchrun()`` and the scripts set ``PYTHONPATH``). The CPU kit it builds
on (CPU shim, tiny GPT, plain-PyTorch reference, batches, layouts, wrappers) ships with
``megatron-agg compare`` as :mod:`megatron_agg.compare`. Imports Megatron lazily.
"""

__all__ = ["features", "matrix", "megatron_lm", "sync_guard"]
