"""Expert kernels: grouped SwiGLU over local slots (reference, Triton, torch._grouped_mm)."""

from .select import IMPLS, choose_impl, expert_mlp

__all__ = ["IMPLS", "choose_impl", "expert_mlp"]
