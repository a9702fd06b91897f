"""Model building, one module per backend. Unsloth is imported only in `models/unsloth.py`."""

from .common import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
