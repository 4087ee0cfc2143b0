"""Embedding API and portable export.

``Embedder`` turns crops into MAE embeddings (from a checkpoint, an export or in-memory params);
``export`` writes / reads the self-contained export directory (safetensors + StableHLO).
"""

from cosmic_jax.embed.embedder import (
    DEFAULT_POOL,
    POOLS,
    EmbedInputError,
    Embedder,
)

__all__ = ["Embedder", "EmbedInputError", "DEFAULT_POOL", "POOLS",
           "export_embedder", "export_checkpoint", "load_export", "ExportError"]


def __getattr__(name):
    # export.py pulls in safetensors/jax.export only when used.
    if name in ("export_embedder", "export_checkpoint", "load_export", "ExportError"):
        from cosmic_jax.embed import export

        return getattr(export, name)
    raise AttributeError(name)
