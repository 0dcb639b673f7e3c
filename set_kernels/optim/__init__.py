"""Optimizers: ``MaskedAdam`` (fused masked Adam/AdamW)."""
from .masked_adam import MaskedAdam

__all__ = ["MaskedAdam"]
