"""Embedding API and portable export.

``Embedder`` turns crops into MAE embeddings (from a checkpoint, an export or in-memory params);
``artifact`` reads and verifies an export directory, ``export`` writes one (safetensors +
StableHLO). Imports point one way: artifact <- embedder <- export.
"""

from cosmic_jax.embed.artifact import ExportError, load_export
from cosmic_jax.embed.embedder import (
    DEFAULT_POOL,
    POOLS,
    EmbedInputError,
    Embedder,
)
from cosmic_jax.embed.export import export_checkpoint, export_embedder

__all__ = ["Embedder", "EmbedInputError", "DEFAULT_POOL", "POOLS",
           "export_embedder", "export_checkpoint", "load_export", "ExportError"]
