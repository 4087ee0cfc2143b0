"""``cosmic analyze --data DIR --workdir W [--quick] [--mae RUN]``: every analysis, written to W/analysis/.

Pretrains a small MAE in W/mae if W has no checkpoint and no --mae RUN is given (reuse one across
analyses: `cosmic pretrain ... --workdir RUN`, then --mae RUN), embeds the crops, measures morphology
features, builds the expression embedding, fits the joint model with K-fold cross-fitting and writes
summary.json, CSV tables and cells.h5ad. Without crops (--h5ad only, e.g. log-normalised real data)
the expression-side analyses run alone; --config.morph_key / --config.features_key take the
morphology from obsm instead of crops.
"""

from __future__ import annotations

import os

from cosmic_jax.commands import add_config, setup_logging
from cosmic_jax.configs import analyze as analyze_configs


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="variance decomposition, cell type, response, generation analyses",
                              description=__doc__)
    p.add_argument("--data", default=None, help="dataset dir (cells.h5ad, crops/, optional truth.json)")
    p.add_argument("--workdir", required=True, help="run dir: MAE checkpoint, embeddings, analysis/ outputs")
    p.add_argument("--quick", action="store_true", help="same as --config quick (CPU minutes: 3 folds, small models)")
    p.add_argument("--mae", default=None, metavar="RUN", help="a `cosmic pretrain` workdir to embed with")
    p.add_argument("--h5ad", default=None, help="expression AnnData (default DATA/cells.h5ad)")
    p.add_argument("--crops", default=None, help="crop dataset (default DATA/crops)")
    add_config(p, analyze_configs, None)
    p.set_defaults(func=_run)


def _run(args) -> int:
    setup_logging()
    from cosmic_jax.workflows.analyze import analyze  # jax loads here, not at `cosmic --help` time

    if args.data is None and args.h5ad is None:
        raise ValueError("give --data DIR or --h5ad FILE")
    summary = analyze(args.data, args.workdir, args.cfg, h5ad=args.h5ad, crops_dir=args.crops, mae=args.mae)
    truth = summary.get("truth", {})
    for key, text in (("expr_var_explained_by_morph", "expression variance reflected in morphology"),
                      ("morph_var_explained_by_expr", "morphology variance explained by expression")):
        est = summary.get(key)
        if est:
            line = f"{text}: {est['estimate']:.3f} (95% CI {est['ci_low']:.3f}-{est['ci_high']:.3f})"
            print(line + (f"; truth {truth[key]:.3f}" if key in truth else ""))
    print(f"analyze: wrote {os.path.join(args.workdir, 'analysis')} (summary.json, CSV tables, cells.h5ad); "
          f"`cosmic report --workdir {args.workdir}` renders it")
    return 0
