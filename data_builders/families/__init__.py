"""Generator families other than :mod:`data_builders.synthetic`: paired crops + counts with a
nested-MC truth, each rendering images and drawing counts its own way, so a method tuned on one
family can be checked on another. Each module has ``generate(out_dir, n_cells, seed,
shared_fraction, ...)`` writing the layout of ``cosmic data synthetic`` (cells.h5ad, crops/,
truth.json)."""
