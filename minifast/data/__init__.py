"""Data: DataBunch and fast in-memory loaders (the ImageList chain arrives with issue 3)."""
from .core import DataBunch, TensorDataLoader
from .synthetic import synthetic_classification

__all__ = ['DataBunch', 'TensorDataLoader', 'synthetic_classification']
