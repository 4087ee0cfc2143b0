"""Joint latent model of morphology and expression embeddings with conditional flow-matching decoders.

    from cosmic_jax.joint import fit_joint, JointModel, get_config
    model = fit_joint(m, e, get_config("quick"))
    e_samples = model.sample_expr_given_morph(m_test, num_samples=100, seed=0)  # (S, N, De)
"""

from cosmic_jax.configs.joint import get_config
from cosmic_jax.joint.fit import fit_joint
from cosmic_jax.joint.model import JointModel

__all__ = ["JointModel", "fit_joint", "get_config"]
