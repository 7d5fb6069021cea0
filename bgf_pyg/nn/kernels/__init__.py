"""Attention kernels behind :class:`~bgf_pyg.nn.BatchGraphConv`.

- :mod:`.ssa`: :func:`ssa_attention`, the one entry to every execution path (dense, CPU
  sparse-matrix, fused Triton, regular layout, edge by edge) and the rules choosing among them.
- :mod:`.csr`: the target-sorted (CSR) layout of an edge list, shared by the kernels.
- :mod:`.sparse_cpu`: SSA as per-head sparse-matrix products (``sampled_addmm`` + CSR SpMM), a
  ``torch.library`` custom op with its own backward: no (E, H, d) tensor in forward or backward.
- :mod:`.fused_triton`: a fused Triton kernel (online softmax over each target's in-edges,
  recompute in backward) for the ``"fused"`` path; Triton is optional.
"""

from .sparse_cpu import csr_attention, csr_attention_supported
from .ssa import select_path, ssa_attention

__all__ = ["csr_attention", "csr_attention_supported", "select_path", "ssa_attention"]
