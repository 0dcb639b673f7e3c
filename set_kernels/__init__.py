"""set_kernels: block-sparse kernels, a fused masked Adam and SET sparse training for PyTorch.

    import set_kernels as sk
    layer = sk.nn.SparseLinear(1024, 1024, density=0.1, block_size=32)
    opt = sk.optim.MaskedAdam(layer.parameters(), lr=1e-3)
"""
from . import backends, nn, ops, optim
from ._info import info
from .layout import BlockSparseLayout
from .nn import MaskedLinear, SparseLinear, sparsify
from .evolution import SET

__version__ = "0.1.0"
__all__ = ["BlockSparseLayout", "MaskedLinear", "SET", "SparseLinear", "backends", "info", "nn", "ops", "optim",
           "sparsify", "__version__"]
