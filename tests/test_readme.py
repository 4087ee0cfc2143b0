"""Every command of the README's "Command line" section, and its Python API example, run as written
from a temporary current directory (relative paths), with their outputs checked.

The only inputs a user would bring are made here: ``raw/*.tif`` (two fluorescence images cut from
stardist's test image) and ``data/lab_images.npy`` (one image per cell of ``data/synth``, in row order,
standing for a lab's own stack).
"""

import json
import os
import re
import subprocess
import sys

import anndata
import numpy as np
import pytest
import tifffile

from cosmic_jax.data.records import CropSource
from data_builders import images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section(title: str) -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def readme_commands() -> list[str]:
    lines = [ln.strip() for ln in _blocks(_section("Command line"), "bash")[0].splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _prepare(cmd: str, cwd: str) -> None:
    """Inputs a user would bring, made just before the first command that reads them."""
    if "raw/" in cmd and not os.path.isdir(os.path.join(cwd, "raw")):
        img = tifffile.imread(images.stardist_sample()[0])
        os.makedirs(os.path.join(cwd, "raw"))
        tifffile.imwrite(os.path.join(cwd, "raw", "left.tif"), img[:, :256])
        tifffile.imwrite(os.path.join(cwd, "raw", "right.tif"), img[:, 256:])
    if "data/lab_images.npy" in cmd and not os.path.exists(os.path.join(cwd, "data/lab_images.npy")):
        cells = anndata.read_h5ad(os.path.join(cwd, "data/synth/cells.h5ad"))
        src = CropSource(os.path.join(cwd, "data/synth/crops"))
        order = {c: i for i, c in enumerate(src.cell_ids())}
        stack = src.read_images([order[c] for c in cells.obs["cell_id"]])[..., 0]
        np.save(os.path.join(cwd, "data/lab_images.npy"), stack)


@pytest.mark.slow
def test_readme_command_line_and_api_run_as_written(tmp_path):
    cwd = str(tmp_path)
    os.symlink(sys.prefix, os.path.join(cwd, ".venv"))  # `source .venv/bin/activate` as in a checkout
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    commands = readme_commands()
    assert commands[0] == "source .venv/bin/activate" and len(commands) > 15
    for cmd in commands[1:]:
        assert cmd.startswith("cosmic "), cmd
        _prepare(cmd, cwd)
        r = subprocess.run(["bash", "-c", f"source .venv/bin/activate && {cmd}"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"`{cmd}` failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"

    def path(*p):
        return os.path.join(cwd, *p)

    nuclei = CropSource(path("data/nuclei"))
    assert len(nuclei) > 200 and nuclei.image_shape == (64, 64, 1)
    mine, masked = CropSource(path("data/mine")), CropSource(path("data/mine_masked"))
    assert sorted(mine.cell_ids()) == sorted(masked.cell_ids()) and len(mine) > 50  # the saved labels round-trip
    assert sorted(CropSource(path("data/big")).cell_ids()) == sorted(mine.cell_ids())  # 2 jobs = 1 dataset
    with open(path("runs/mae/pose.json")) as f:
        assert json.load(f)["oriented"]  # pretrained on the oriented copy; the embeddings below orient
    emb = np.load(path("emb.npy"))
    assert emb.shape[0] == len(nuclei) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.load(path("emb_export.npy")), emb, atol=2e-4)
    cells = anndata.read_h5ad(path("cells.h5ad"))
    assert cells.obsm["X_cosmic"].shape == emb.shape and "spatial" in cells.obsm and "source" in cells.obs
    for run in ("runs/analysis", "runs/lab"):
        with open(path(run, "analysis", "summary.json")) as f:
            summary = json.load(f)
        for key in ("expr_var_explained_by_morph", "morph_var_explained_by_expr"):
            assert 0.0 < summary[key]["estimate"] < 1.0, (run, summary[key])
    assert "truth" in json.load(open(path("runs/analysis/analysis/summary.json")))
    assert os.path.exists(path("runs/analysis/report.md"))
    assert os.path.exists(path("runs/joint/model/joint_model.json"))

    api = _blocks(_section("Python API"), "python")[0]
    # the example embeds the crops as cut; put into the MAE's pose they give the analysis's embedding
    check = ("\nref = anndata.read_h5ad('runs/analysis/analysis/cells.h5ad').obsm['X_cosmic']"
             "\nprint('API', z.shape, adata.obsm['X_cosmic'].shape, abs(adata.obsm['X_cosmic'] - ref).max())")
    r = subprocess.run([sys.executable, "-c", api + check], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"API \(64, \d+\) \(600, \d+\) (\S+)", r.stdout)
    assert m and float(m.group(1)) < 1e-3, r.stdout
