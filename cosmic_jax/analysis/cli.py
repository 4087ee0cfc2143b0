"""``cosmic analyze --data DIR --workdir W [--quick]``: every analysis, written to W/analysis/.

Pretrains a small MAE if W has no checkpoint, embeds the crops (obsm["X_cosmic"]), builds the
expression embedding, fits the joint model with K-fold cross-fitting and writes summary.json plus
per-gene / per-feature / response / generation CSV tables. Without crops (``--h5ad`` only, e.g.
log-normalised real data) the expression-side analyses run alone.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="variance decomposition, cell type, response, generation analyses",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset dir (cells.h5ad, crops/, optional truth.json)")
    p.add_argument("--workdir", required=True, help="run dir: MAE checkpoint, embeddings, analysis/ outputs")
    p.add_argument("--quick", action="store_true", help="CPU-minutes settings (3 folds, small models)")
    p.add_argument("--h5ad", default=None, help="expression AnnData (default DATA/cells.h5ad)")
    p.add_argument("--crops", default=None, help="crop dataset (default DATA/crops)")
    p.add_argument("--use-raw", action="store_true", help="read expression from adata.raw")
    p.add_argument("--input-kind", default="auto", choices=["auto", "counts", "lognorm"],
                   help="counts are library-size normalised + log1p; lognorm is used as is")
    p.add_argument("--label-key", default="cell_type", help="obs column with cell types")
    p.add_argument("--pretrain-steps", type=int, default=None, help="MAE steps when pretraining is needed")
    p.add_argument("--folds", type=int, default=None, help="cross-fitting folds")
    p.add_argument("--samples", type=int, default=None, help="samples per held-out cell")
    p.add_argument("--estimator", default="cov", choices=["cov", "var"],
                   help="explained variance: Cov(held-out conditional mean, target) (default, robust to the "
                        "fit's estimation noise) or the finite-S-corrected Var(conditional mean)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--joint", nargs="*", default=[], metavar="key=value", help="JointConfig overrides")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import json
    import logging

    from cosmic_jax.analysis.pipeline import AnalyzeConfig, run_analysis

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data is None and args.h5ad is None:
        raise SystemExit("cosmic analyze: give --data DIR or --h5ad FILE")
    kw = {"label_key": args.label_key, "seed": args.seed, "joint_overrides": tuple(args.joint),
          "estimator": args.estimator}
    if args.pretrain_steps is not None:
        kw["pretrain_steps"] = args.pretrain_steps
    if args.folds is not None:
        kw["n_folds"] = args.folds
    if args.samples is not None:
        kw["num_samples"] = args.samples
    cfg = AnalyzeConfig.quick(**kw) if args.quick else AnalyzeConfig(**kw)
    summary = run_analysis(args.data, args.workdir, cfg, h5ad=args.h5ad, crops_dir=args.crops,
                           use_raw=args.use_raw, input_kind=args.input_kind)
    keys = ("expr_var_explained_by_morph", "morph_var_explained_by_expr", "truth", "retrieval")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=1))
    print(f"analyze: wrote {args.workdir}/analysis/summary.json")
    return 0
