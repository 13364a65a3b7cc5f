"""Test and example support: run Megatron-Core on the CPU and check gradients against the
single-process definition. Shipped with the package (like ``torch.testing``) so that the test
suite, the examples and users' own checks share one implementation. Imports Megatron lazily.
"""

__all__ = ["cpu", "parallel", "gpt", "data", "sync_guard"]
