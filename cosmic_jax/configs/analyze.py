"""``cosmic analyze`` settings: ``default`` and ``quick`` (CPU minutes; ``--quick`` picks it).

Sub-configs: ``pretrain`` (the MAE trained when the workdir holds none and no ``--mae`` is given)
and ``joint`` (the cross-fitted joint model). Example:
``cosmic analyze --data D --workdir W --quick --config.n_folds=5 --config.joint.steps=2000``.
"""

from __future__ import annotations

import ml_collections

from cosmic_jax.configs import joint, pretrain

VARIANTS = ("default", "quick")


def get_config(name: str = "default") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.n_folds = 5  # cross-fitting folds
    c.num_samples = 16  # draws per held-out cell for E[.|.]
    c.n_boot = 300  # bootstrap replicates of the CI
    c.expr_comps = 30  # expression PCs (with gene read-out)
    c.morph_comps = 16  # PCs of the MAE embedding in the joint model's morphology input
    c.n_top_genes = ml_collections.config_dict.placeholder(int)  # None = all genes
    # Re-fits of the whole K-fold cross-fit (new fold split and model seeds): the CI combines them by
    # Rubin's rules so it carries the fit's own variability; "side" = each representation alone
    # (MAE, features) next to the headline "both" (0 = skip them). Cost: notes/uncertainty.md.
    c.refit_repeats = 3
    c.refit_repeats_side = 2
    # Learning-curve correction: every cross-fit is repeated with each fold's model fitted on this
    # share of its training cells and the pair extrapolated to unlimited training data
    # (variance.extrapolate_to_full_data; doubles the joint fits; 0 = off). notes/science.md round 4.
    c.extrapolate_fraction = 0.5
    # How fast a fit's learning curve rises is not known (1 = parametric, the estimate's assumption;
    # a flexible fit on few cells is slower): the CI also covers the extrapolation at this slower
    # rate (variance.refit_decompose band_rate; 1 = off). notes/science.md round 7.
    c.extrapolate_band_rate = 0.5
    c.estimator = "cov"  # "cov": Cov(held-out conditional mean, target); "var": finite-S-corrected Var
    c.seed = 0
    # inputs
    # obs columns; "auto" uses cell_type / response when present, a named column must exist, "" = skip
    c.label_key = "auto"  # cell types
    c.response_key = "auto"  # untreated / resistant / responder
    c.use_raw = False  # read expression from adata.raw
    c.input_kind = "auto"  # "auto" | "counts" (normalised + log1p here) | "lognorm" (used as is)
    c.morph_key = ""  # obsm key of a morphology representation to use instead of the MAE embedding
    c.features_key = ""  # obsm key of morphology features; "" = measure them from the crops
    # measured from crops: also the generic profile (morph_features.PROFILE_NAMES) as extra
    # morphology input (never a target); notes/science.md round 3
    c.morph_profile = True
    # pretrain and embed on copies of the crops rotated onto their nucleus's major axis and centred
    # (W/oriented_crops; data/orient.py): the MAE then reads elongation and texture without spending
    # itself on the angle (notes/science.md round 8). The measured features use the crops as given.
    c.orient = True
    # ... and magnified by one factor per dataset so its 95th-percentile nucleus spans this share of
    # the crop side (more patches on the nucleus, relative sizes kept; 0 = keep the scale)
    c.orient_fill = 0.85
    c.pretrain = pretrain.get_config("small")
    c.pretrain.steps = 2000
    c.pretrain.progress = True
    c.joint = joint.get_config("default")
    if name == "quick":
        # 2 re-fits (1 per side table) because each is two cross-fits with the extrapolation
        c.update(dict(n_folds=3, num_samples=8, n_boot=100, expr_comps=20, morph_comps=8, refit_repeats=2,
                      refit_repeats_side=1))
        c.pretrain.steps = 300
        c.joint = joint.get_config("analysis")
    return c
