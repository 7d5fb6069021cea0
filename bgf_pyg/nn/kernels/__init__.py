"""Attention kernels behind :class:`~bgf_pyg.nn.BatchGraphConv`'s edge-list paths.

- :mod:`.csr`: the target-sorted (CSR) layout of an edge list, shared by the kernels.
- :mod:`.sparse_cpu`: SSA as per-head sparse-matrix products (``sampled_addmm`` + CSR SpMM), a
  ``torch.library`` custom op with its own backward: no (E, H, d) tensor in forward or backward.
- :mod:`.fused_triton`: a fused Triton kernel (online softmax over each target's in-edges,
  recompute in backward) for ``attention_path="fused"``; Triton is optional.
"""

from .sparse_cpu import csr_attention, csr_attention_supported

__all__ = ["csr_attention", "csr_attention_supported"]
