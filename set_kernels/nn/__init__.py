"""Sparse layers: ``SparseLinear`` (block-sparse storage), ``MaskedLinear`` (element mask), ``sparsify``."""
from .masked_linear import MaskedLinear
from .sparse_linear import SparseLinear
from .sparsify import layer_densities, sparsify

__all__ = ["MaskedLinear", "SparseLinear", "layer_densities", "sparsify"]
