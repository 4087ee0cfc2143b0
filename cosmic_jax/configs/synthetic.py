"""``cosmic data synthetic`` generator settings: ``default``, ``no_treatment``, ``quick``.

``shared_fraction``, ``seed`` and the number of cells are command-line arguments, not config:
``cosmic data synthetic --out D --cells 600 --shared-fraction 0.4 --config quick --config.n_genes=50``.
Validation lives with the generator (``data_builders.synthetic.check_config``).
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("default", "no_treatment", "quick")


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.n_genes = 300
    c.n_cell_types = 4
    c.n_shared = 4  # shared continuous programs
    c.n_morph_private = 3
    c.n_expr_private = 4
    c.treated_fraction = 0.5
    c.responder_fraction = 0.5  # among treated cells
    c.n_responder_genes = 20
    c.responder_gene_effect = 1.0  # |log fold change| of planted genes, responders vs rest
    c.responder_morph_effect = 3.0  # latent shift of the responder render parameters
    c.expr_signal_sd = 1.5  # sd of the log-mean signal, split by the calibrated angle
    c.cell_type_weight = 0.5  # share of the shared expression signal from cell type
    c.morph_celltype_offset = 0.5  # sd of cell-type offsets of the shared render latents
    c.morph_profile_span = 0.75  # cell-type radial profiles: linspace(-span, span, K), in (0, 1)
    c.morph_param_noise = 0.08  # sd of per-cell render nuisance on the shared latents
    c.library_size_mean = 5000.0
    c.library_size_log_sd = 0.25
    c.nb_inverse_dispersion = 20.0
    c.image_size = 64
    c.pixel_noise = 0.02
    c.records_per_shard = 4096
    c.chunk_cells = 512  # cells per render / count chunk (bounds memory; fixes the RNG layout)
    c.measure_features = True  # also store measured features of every cell in obsm
    # Monte Carlo of the truth. n_inner = 4 suits fractions ~0.2-0.5 (the ANOVA estimator's variance
    # is smallest near n_inner = E[Var(x|S)] / Var(E[x|S])); at F = 0.7 its error is far below 0.01.
    c.calib_outer = 1500
    c.calib_inner = 4
    c.expr_mc_outer = 3000
    c.expr_mc_inner = 4
    c.morph_mc_outer = 2500
    c.morph_mc_inner = 2
    c.mc_groups = 20
    if name == "no_treatment":
        c.treated_fraction = 0.0
    elif name == "quick":  # fewer genes and a smaller MC, for tests and demos (morph MC error ~0.02)
        c.update(dict(n_genes=100, expr_mc_outer=2000, morph_mc_outer=300))
    return c
