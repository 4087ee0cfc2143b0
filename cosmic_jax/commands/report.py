"""``cosmic report --workdir W [--out FILE]``: the Markdown report (tables + figures) of a finished `cosmic analyze`.

Reads only what `cosmic analyze` wrote to W (W/analysis/summary.json, the CSV tables, the joint
latent, W/mae's loss log and reconstructions) and writes FILE (default W/report.md) with a
``figures/`` folder beside it. Nothing is re-run, so it is cheap to rebuild.
"""

from __future__ import annotations

from cosmic_jax.commands import setup_logging


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="Markdown report with figures of a `cosmic analyze` workdir",
                              description=__doc__)
    p.add_argument("--workdir", required=True, metavar="W", help="the `cosmic analyze` workdir")
    p.add_argument("--out", default=None, metavar="FILE", help="report file (default W/report.md); figures/ goes beside it")
    p.add_argument("--crops", default=None, metavar="DIR",
                   help="the analysed crop dataset to show crops from (default: crops/ beside the analysed cells.h5ad)")
    p.add_argument("--nuclei", default=None, metavar="DIR", help="a real-crop dataset (`cosmic data nuclei --out`) to show crops from")
    p.set_defaults(func=_run)


def _run(args) -> int:
    setup_logging()
    from cosmic_jax.workflows.report import write_report  # matplotlib loads here, not at `cosmic --help` time

    print(write_report(args.workdir, out_path=args.out, nuclei_dir=args.nuclei, crops_dir=args.crops))
    return 0
