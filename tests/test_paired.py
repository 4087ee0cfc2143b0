"""``cosmic data paired``: AnnData + stack and AnnData + folder round trips, and every mismatch refused
in one line naming the file or cell."""

import os

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import tifffile

from cosmic_jax import cli
from cosmic_jax.data import records


@pytest.fixture()
def paired_inputs(tmp_path):
    """12 cells: integer counts (sparse), obs/obsm, non-square uint16 images, masks."""
    rng = np.random.default_rng(0)
    n, g = 12, 15
    counts = rng.poisson(3.0, (n, g)).astype(np.float32)
    ids = [f"c{i:02d}" for i in rng.permutation(n)]  # not sorted: row order must be kept
    obs = {"cell_id": ids, "cell_type": [f"t{i % 3}" for i in range(n)]}
    ad = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var={"gene": [f"g{j}" for j in range(g)]})
    ad.obs_names = [f"row{i}" for i in range(n)]
    ad.var_names = [f"g{j}" for j in range(g)]
    ad.obsm["X_pca"] = rng.normal(size=(n, 3))
    path = tmp_path / "cells.h5ad"
    ad.write_h5ad(path)
    imgs = rng.integers(1, 4000, (n, 20, 16)).astype(np.uint16)  # H != W: padded to 20x20
    masks = np.zeros((n, 20, 16), np.uint8)
    masks[:, 4:16, 3:13] = 1
    return {"adata": path, "counts": counts, "ids": ids, "obs": obs, "imgs": imgs, "masks": masks, "dir": tmp_path}


def _paired(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(["data", "paired", *map(str, argv)])
    return rc, capsys.readouterr().err


def _read(out):
    ad = anndata.read_h5ad(out / "cells.h5ad")
    src = records.CropSource(str(out / "crops"), with_meta=True)
    return ad, [src.read(i) for i in range(len(src))]


def test_round_trip_stack(paired_inputs, capsys):
    d = paired_inputs
    np.save(d["dir"] / "imgs.npy", d["imgs"])
    out = d["dir"] / "out"
    rc, err = _paired(capsys, "--adata", d["adata"], "--images", d["dir"] / "imgs.npy", "--out", out, "--config.crop.norm=none")
    assert rc == 0, err
    ad, recs = _read(out)
    assert np.array_equal(ad.X.toarray(), d["counts"]) and list(ad.obs["cell_id"]) == d["ids"]
    assert list(ad.obs_names) == d["ids"] and list(ad.obs["cell_type"]) == d["obs"]["cell_type"]
    assert ad.obsm["X_pca"].shape == (12, 3)
    assert [r["cell_id"] for r in recs] == d["ids"]
    for i, r in enumerate(recs):
        # 20x16 padded to 20x20 (2 columns each side), pixels and integer dtype unchanged
        assert r["image"].shape == (20, 20, 1) and r["image"].dtype == np.uint16
        assert np.array_equal(r["image"][:, 2:18, 0], d["imgs"][i]) and not r["image"][:, :2].any()
        assert r["meta"]["source_dtype"] == "<u2" and (r["meta"]["pad_top"], r["meta"]["pad_left"]) == (0, 2)
    # the same through a multi-page TIFF, with masks and the default dataset-wide scale
    tifffile.imwrite(d["dir"] / "imgs.tif", d["imgs"], photometric="minisblack")
    tifffile.imwrite(d["dir"] / "masks.tif", d["masks"], photometric="minisblack")
    rc, err = _paired(capsys, "--adata", d["adata"], "--images", d["dir"] / "imgs.tif",
                      "--masks", d["dir"] / "masks.tif", "--out", out)  # fmt: skip
    assert rc == 0, err
    _, recs = _read(out)
    inside_all = d["masks"] > 0
    hi = np.percentile(d["imgs"].astype(np.float64)[inside_all], 99.9)
    for i, r in enumerate(recs):
        img, inside = d["imgs"][i].astype(np.float64), d["masks"][i] > 0
        want = np.where(inside, np.clip(img / hi, 0, 1), 0)  # one scale: brightness between cells kept
        assert r["image"].dtype == np.float32 and r["meta"]["area"] == inside.sum()
        # stored as uint16 per crop (records.py): error <= (max - min) / 131070 = 7.6e-6 here
        np.testing.assert_allclose(r["image"][:, 2:18, 0], want, atol=1e-5)
    # per-cell normalisation on request
    rc, err = _paired(capsys, "--adata", d["adata"], "--images", d["dir"] / "imgs.tif",
                      "--masks", d["dir"] / "masks.tif", "--out", out, "--config.crop.norm=crop")  # fmt: skip
    assert rc == 0, err
    _, recs = _read(out)
    for i, r in enumerate(recs):
        img, inside = d["imgs"][i].astype(np.float64), d["masks"][i] > 0
        lo, hi = np.percentile(img[inside], [1, 99])
        np.testing.assert_allclose(r["image"][:, 2:18, 0], np.where(inside, np.clip((img - lo) / (hi - lo), 0, 1), 0),
                                   atol=1e-5)


def test_round_trip_folder(paired_inputs, capsys):
    d = paired_inputs
    folder, mfolder = d["dir"] / "cells", d["dir"] / "cellmasks"
    folder.mkdir()
    mfolder.mkdir()
    for i, cid in enumerate(d["ids"]):
        [lambda p, a: tifffile.imwrite(str(p) + ".tif", a), lambda p, a: np.save(str(p) + ".npy", a),
         lambda p, a: tifffile.imwrite(str(p) + ".tiff", a)][i % 3](folder / cid, d["imgs"][i])  # fmt: skip
        tifffile.imwrite(mfolder / f"{cid}.tif", d["masks"][i].astype(bool))
    (folder / "README.txt").write_text("not an image")  # other files are ignored
    out = d["dir"] / "out"
    rc, err = _paired(capsys, "--adata", d["adata"], "--images", folder, "--masks", mfolder, "--out", out, "--config.crop.norm=none")
    assert rc == 0, err
    ad, recs = _read(out)
    assert [r["cell_id"] for r in recs] == d["ids"] == list(ad.obs["cell_id"])
    for i, r in enumerate(recs):
        assert np.array_equal(r["image"][:, 2:18, 0], np.where(d["masks"][i] > 0, d["imgs"][i], 0))


def test_mismatches_are_one_line_errors(paired_inputs, capsys):
    d = paired_inputs
    base = ("--adata", d["adata"], "--out", d["dir"] / "out")
    np.save(d["dir"] / "short.npy", d["imgs"][:-1])
    np.save(d["dir"] / "imgs.npy", d["imgs"])
    np.save(d["dir"] / "badmask.npy", d["masks"][:, :10])
    folder = d["dir"] / "cells"
    folder.mkdir()
    for i, cid in enumerate(d["ids"][:-1]):
        np.save(folder / f"{cid}.npy", d["imgs"][i])
    np.save(folder / "stranger.npy", d["imgs"][0])
    odd = d["dir"] / "odd"
    odd.mkdir()
    for i, cid in enumerate(d["ids"]):
        np.save(odd / f"{cid}.npy", d["imgs"][i] if i != 5 else d["imgs"][i][:, :10])
    ad = anndata.read_h5ad(d["adata"])
    lognorm = ad.copy()
    lognorm.layers["counts"] = lognorm.X.copy()
    lognorm.X = sp.csr_matrix(np.log1p(ad.X.toarray()))
    lognorm.write_h5ad(d["dir"] / "lognorm.h5ad")
    neg = ad.copy()
    neg.X = ad.X.toarray()
    neg.X[3, 4] = -1
    neg.write_h5ad(d["dir"] / "neg.h5ad")
    dup = ad.copy()
    dup.obs["cell_id"] = ["same"] * 2 + d["ids"][2:]
    dup.write_h5ad(d["dir"] / "dup.h5ad")
    (d["dir"] / "junk.h5ad").write_bytes(b"not hdf5" * 10)
    cases = [
        (("--images", d["dir"] / "short.npy"), "short.npy: image stack holds 11 images but the AnnData has 12 cells"),
        (("--images", folder), f"1 cell(s) have no image file, e.g. ['{d['ids'][-1]}']; 1 file(s) name no cell"),
        (("--images", odd), f"{d['ids'][5]}.npy (cell '{d['ids'][5]}'): image is (20, 10, 1) uint16 but"),
        (("--images", d["dir"] / "imgs.npy", "--masks", d["dir"] / "badmask.npy"),
         "badmask.npy [0] (cell 'c"),
        (("--images", d["dir"] / "imgs.npy", "--adata", d["dir"] / "lognorm.h5ad"),
         "lognorm.h5ad: X is not raw counts (non-integer values"),
        (("--images", d["dir"] / "imgs.npy", "--adata", d["dir"] / "neg.h5ad"),
         "neg.h5ad: X is not raw counts (negative values, e.g. -1.0 for cell 'row3', gene 'g4')"),
        (("--images", d["dir"] / "imgs.npy", "--adata", d["dir"] / "dup.h5ad"), "dup.h5ad: 1 duplicate cell id(s) in cell_id, e.g. ['same']"),
        (("--images", d["dir"] / "imgs.npy", "--adata", d["dir"] / "junk.h5ad"), "junk.h5ad: not an HDF5"),
        (("--images", d["dir"] / "nope.npy"), "images not found: "),
    ]
    for extra, message in cases:
        rc, err = _paired(capsys, *base, *extra)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and message in lines[0], (message, err)
    assert "--layer NAME (layers: ['counts'])" in _paired(capsys, *base, *cases[4][0])[1]
    assert not os.path.exists(d["dir"] / "out")  # nothing written by any failed run
    # the hint works: counts from the layer
    rc, err = _paired(capsys, *base, "--images", d["dir"] / "imgs.npy", "--adata", d["dir"] / "lognorm.h5ad",
                      "--layer", "counts")  # fmt: skip
    assert rc == 0, err
    assert np.array_equal(anndata.read_h5ad(d["dir"] / "out" / "cells.h5ad").X.toarray(), d["counts"])


def test_existing_output(paired_inputs, capsys):
    d = paired_inputs
    np.save(d["dir"] / "imgs.npy", d["imgs"])
    out = d["dir"] / "out"
    args = ("--adata", d["adata"], "--images", d["dir"] / "imgs.npy", "--out", out)
    assert _paired(capsys, *args)[0] == 0
    before = {n: os.path.getmtime(out / n) for n in ("cells.h5ad", "crops")}
    np.save(d["dir"] / "imgs.npy", d["imgs"][:3])
    rc, err = _paired(capsys, *args)
    assert rc == 2 and {n: os.path.getmtime(out / n) for n in before} == before
    (out / "truth.json").write_text("{}")  # not something this command writes
    np.save(d["dir"] / "imgs.npy", d["imgs"])
    rc, err = _paired(capsys, *args)
    assert rc == 2 and "holds files that are not part of a paired dataset" in err and (out / "truth.json").exists()
