"""Joint latent model of morphology and expression embeddings with conditional flow-matching decoders.

    from cosmic_jax.joint import fit_joint, JointModel, JointConfig
    model = fit_joint(m, e, JointConfig(steps=2000))
    e_samples = model.sample_expr_given_morph(m_test, num_samples=100, seed=0)  # (S, N, De)
"""

from cosmic_jax.configs.joint import JointConfig, get_config
from cosmic_jax.joint.model import JointModel, fit_joint

__all__ = ["JointConfig", "JointModel", "fit_joint", "get_config"]
