"""cosmic_jax: COSMIC (nuclei morphology <-> gene expression) in JAX/Flax."""

__version__ = "0.1.0"

__all__ = ["Embedder", "__version__"]


def __getattr__(name):
    # Lazy so `import cosmic_jax` does not pull in jax for CLI/data-only users.
    if name == "Embedder":
        from cosmic_jax.embed import Embedder

        return Embedder
    raise AttributeError(name)
