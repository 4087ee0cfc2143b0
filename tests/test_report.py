"""`cosmic report` on a hand-written workdir, and `make demo` run twice (its stage logic, with stand-in commands)."""

import csv
import importlib.util
import json
import os
import re
import sys

import matplotlib.image
import numpy as np
import pytest

from cosmic_jax.cli import main as cosmic_main
from cosmic_jax.testing.crops import write_blob_dataset
from cosmic_jax.workflows.report import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ci(est, half=0.05):
    return {"estimate": est, "ci_low": est - half, "ci_high": est + half}


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _summary(data):
    return {
        "config": {"label_key": "cell_type", "seed": 0},
        "data": data,
        "expression_embedding": {"n_cells": 40, "n_genes": 6},
        "expr_var_explained_by_morph": _ci(0.3),
        "morph_var_explained_by_expr": _ci(0.2),
        "decomposition_baselines": {"ridge": {"expr_var_explained_by_morph": _ci(0.28),
                                              "morph_var_explained_by_expr": _ci(0.18)},
                                    "knn": {"expr_var_explained_by_morph": _ci(0.21),
                                            "morph_var_explained_by_expr": _ci(0.15)}},
        "decomposition_by_representation": {
            "mae": {"flow": _ci(0.11), "ridge": _ci(0.12), "knn": _ci(0.13)},
            "features": {"flow": _ci(0.22), "ridge": _ci(0.23)},
        },
        "celltype": {"expression": {"linear": {"accuracy": 0.91, "macro_f1": 0.9}, "knn": {"accuracy": 0.88, "macro_f1": 0.87},
                                    "chance": {"accuracy": 0.5}},
                     "morphology": {"linear": {"accuracy": 0.71, "macro_f1": 0.7}, "knn": {"accuracy": 0.66, "macro_f1": 0.65},
                                    "chance": {"accuracy": 0.5}},
                     "generated_expression": {"accuracy": 0.61, "macro_f1": 0.6, "real_accuracy": 0.91,
                                              "real_macro_f1": 0.9}},
        "retrieval": {"num_candidates": 40, "top1": 0.125, "chance_top1": 0.025, "top10": 0.55, "chance_top10": 0.25},
        "generation": {"flow": {"n": 40, "r2_means": 0.81, "energy": 0.12},
                       "ridge": {"n": 40, "r2_means": 0.77, "energy": 0.31}},
        "response": {"n_treated": 30, "n_responders": 12, "genes_significant": ["g1", "g2"],
                     "features_significant": ["area"], "auc_morphology": {"auc": 0.74}},
        "timings_s": {"expression_embedding": 1.5, "variance_decomposition": 12.25},
        "joint_fit_seconds": 9.0,
        "truth": {"expr_var_explained_by_morph": 0.32, "morph_var_explained_by_expr": 0.5,
                  "expr_var_explained_by_morph_ci_covers": True, "morph_var_explained_by_expr_ci_covers": False,
                  "per_gene_spearman": 0.83,
                  "genes_recovery": {"recall": 1.0, "precision": 0.5, "n_significant": 2, "n_planted": 1, "missed": []}},
    }


@pytest.fixture
def workdir(tmp_path):
    """A finished-analysis workdir written by hand: summary, CSV tables, MAE loss log, crops with cell types."""
    data = tmp_path / "data"
    write_blob_dataset(str(data / "crops"), 24, size=32)
    w = tmp_path / "run"
    a = w / "analysis"
    a.mkdir(parents=True)
    (a / "summary.json").write_text(json.dumps(_summary(str(data / "cells.h5ad"))))
    rng = np.random.default_rng(0)
    genes = [f"g{i}" for i in range(6)]
    _write_csv(a / "per_gene.csv", [{"gene": g, "explained_fraction": 0.1 * i, "total_var": 1.0, "truth": 0.1 * i + 0.02}
                                    for i, g in enumerate(genes)])
    _write_csv(a / "per_feature.csv", [{"feature": f, "explained_fraction": e, "ci_low": e - 0.05, "ci_high": e + 0.05,
                                        "truth": e + 0.01} for f, e in (("area", 0.4), ("eccentricity", 0.1))])
    resp = lambda names, q: [{"name": n, "cohen_d": float(rng.normal()), "log2fc": float(rng.normal()), "q_t": qq,
                              "p_t": qq / 2} for n, qq in zip(names, q)]  # noqa: E731
    _write_csv(a / "response_genes.csv", resp(genes, [1e-6, 1e-3, 0.2, 0.5, 0.9, 1.0]))
    _write_csv(a / "response_features.csv",
               [{k: v for k, v in r.items() if k != "log2fc"} for r in resp(["area", "eccentricity"], [0.01, 0.6])])
    (w / "mae").mkdir()
    with open(w / "mae" / "metrics.jsonl", "w") as f:
        for step in range(10, 110, 10):
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    return w


def _table_rows(md: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_report_of_a_handwritten_workdir_has_tables_and_figures(workdir, tmp_path, capsys):
    out = tmp_path / "rep" / "report.md"
    assert cosmic_main(["report", "--workdir", str(workdir), "--out", str(out)]) == 0
    md = out.read_text()
    assert "```" not in md and '{"' not in md  # tables, never JSON dumps
    # headline: estimate, CI, truth, coverage
    assert _table_rows(md, "expression variance explained by morphology") == [
        ["expression variance explained by morphology", "0.300", "0.250 – 0.350", "0.320", "yes"]]
    assert _table_rows(md, "morphology-feature variance explained by expression")[0][-1] == "no"
    assert "lower bound" in md
    # baselines, both directions
    assert _table_rows(md, "ridge")[0] == ["ridge", "0.280 [0.230, 0.330]", "0.180 [0.130, 0.230]"]
    assert _table_rows(md, "flow (joint model)")[0][1] == "0.300 [0.250, 0.350]"
    # by representation: every method present, "–" where a representation lacks one
    assert "| representation | flow | ridge | knn |" in md
    assert _table_rows(md, "features")[0] == ["features", "0.220 [0.170, 0.270]", "0.230 [0.180, 0.280]", "–"]
    # cell type, retrieval, generation, responders (with truth recovery), per-feature, timings
    assert _table_rows(md, "morphology")[0][1:] == ["0.710", "0.700", "0.660", "0.650", "0.500"]
    assert _table_rows(md, "top-10")[0] == ["top-10", "0.550", "0.250"]
    assert _table_rows(md, "flow")[0][1:] == ["0.810", "0.120"]
    assert ["significant genes (q < 0.05) of 6", "2"] in _table_rows(md, "significant genes (q < 0.05) of 6")
    assert "Significant genes (most significant first): g0, g1." in md
    assert _table_rows(md, "genes")[0][1:5] == ["1.000", "0.500", "2", "1"]
    assert _table_rows(md, "area")[0] == ["area", "0.400", "0.350 – 0.450", "0.410"]
    assert _table_rows(md, "analysis: variance decomposition") == [["analysis: variance decomposition", "12.2"]]
    # every figure exists, is linked relative to the report, and is a real image
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    names = {os.path.basename(p) for p in links}
    assert {"volcano_genes.png", "volcano_features.png", "per_gene_explained.png", "per_feature_explained.png",
            "mae_loss.png", "analysed_crops.png"} <= names
    for p in links:
        img = matplotlib.image.imread(out.parent / p)
        assert img.shape[0] >= 300 and img.shape[1] >= 400, p
    crops = matplotlib.image.imread(out.parent / "figures" / "analysed_crops.png")
    assert crops.shape[0] >= 4 * 96  # 4 rows of crops at >= 96 px each
    assert "joint_umap.png" not in names  # no joint latent in this workdir: no UMAP, and no error


def test_report_without_morphology_or_truth(tmp_path):
    w = tmp_path / "run"
    (w / "analysis").mkdir(parents=True)
    (w / "analysis" / "summary.json").write_text(json.dumps(
        {"config": {}, "expression_embedding": {"n_cells": 10, "n_genes": 3}, "celltype": {"skipped": "no cell-type column"},
         "timings_s": {"expression_embedding": 0.5}}))
    with open(write_report(str(w))) as f:
        md = f.read()
    assert "No morphology in this analysis" in md and "Skipped: no cell-type column." in md
    assert "truth" not in md and "```" not in md


def test_report_of_a_workdir_without_summary_is_a_one_line_error(tmp_path, capsys):
    assert cosmic_main(["report", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "analysis" / "summary.json") in err


# ----------------------------------------------------------------------------- make demo, twice


def _demo_module():
    """experiments/demo.py as a module (registered first: its dataclass looks its module up by name)."""
    spec = importlib.util.spec_from_file_location("cosmic_demo", os.path.join(REPO, "experiments", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class FakeCosmic:
    """Stands in for `cosmic_jax.cli.main`: writes each command's outputs (tiny), records the calls."""

    def __init__(self):
        self.calls = []
        self.fail = None

    def __call__(self, argv):
        cmd = " ".join(argv[:2]) if argv[0] == "data" else argv[0]
        self.calls.append(cmd)
        if cmd == self.fail:
            return 2
        arg = lambda name: argv[argv.index(name) + 1]  # noqa: E731
        if cmd == "data nuclei":
            assert not os.path.exists(arg("--out"))  # the real builder replaces its own dataset; the demo moved it aside
            write_blob_dataset(arg("--out"), 4, size=16)
        elif cmd == "data synthetic":
            out = arg("--out")
            assert not os.path.exists(out)  # the real builder refuses an existing dataset without --overwrite
            write_blob_dataset(os.path.join(out, "crops"), 4, size=16)
            with open(os.path.join(out, "cells.h5ad"), "w") as f:
                f.write("h5ad stand-in")
            with open(os.path.join(out, "truth.json"), "w") as f:
                json.dump({"cells": arg("--cells")}, f)
        elif cmd == "analyze":
            a = os.path.join(arg("--workdir"), "analysis")
            os.makedirs(a, exist_ok=True)
            with open(os.path.join(a, "summary.json"), "w") as f:
                json.dump({"expr_var_explained_by_morph": _ci(0.3), "overrides": argv[6:]}, f)
        elif cmd == "report":
            with open(arg("--out"), "w") as f:
                f.write("# report\n")
        return 0


def test_demo_twice_skips_finished_stages_and_rebuilds_what_changed(tmp_path):
    demo = _demo_module()
    out = str(tmp_path / "demo_out")
    fake = FakeCosmic()
    run = lambda cells=50, overrides=(): demo.Demo(out, cells, 0.4, 0, list(overrides), cosmic=fake).run()  # noqa: E731

    assert run() == {"nuclei": "built", "synthetic": "built", "analyze": "built"}
    assert fake.calls == ["data nuclei", "data synthetic", "analyze", "report"]
    fake.calls.clear()
    assert run() == {"nuclei": "skipped", "synthetic": "skipped", "analyze": "skipped"}
    assert fake.calls == ["report"]

    # new analysis settings: only the analysis (and report) rerun, from a fresh workdir
    fake.calls.clear()
    assert run(overrides=["--config.joint.steps=5"])["analyze"] == "built"
    assert fake.calls == ["analyze", "report"]
    with open(os.path.join(out, "analysis_run", "analysis", "summary.json")) as f:
        assert json.load(f)["overrides"] == ["--config.joint.steps=5"]

    # a new dataset size: the dataset and everything downstream rebuild, the real crops stay
    fake.calls.clear()
    assert run(cells=60, overrides=["--config.joint.steps=5"]) == {"nuclei": "skipped", "synthetic": "built",
                                                                   "analyze": "built"}
    with open(os.path.join(out, "synthetic", "truth.json")) as f:
        assert json.load(f)["cells"] == "60"
    assert not [n for n in os.listdir(out) if n.endswith(".old")]  # stale outputs removed once replaced


def test_demo_resumes_an_interrupted_analysis_and_rebuilds_a_damaged_dataset(tmp_path):
    demo = _demo_module()
    out = str(tmp_path / "demo_out")
    fake = FakeCosmic()
    run = lambda: demo.Demo(out, 50, 0.4, 0, [], cosmic=fake).run()  # noqa: E731
    fake.fail = "analyze"
    with pytest.raises(SystemExit, match="failed.*finished stages are kept"):
        run()
    os.makedirs(os.path.join(out, "analysis_run", "mae"))  # what the interrupted run had cached
    fake.fail, fake.calls = None, []
    assert run() == {"nuclei": "skipped", "synthetic": "skipped", "analyze": "resumed"}
    assert os.path.isdir(os.path.join(out, "analysis_run", "mae"))  # resumed in place, caches kept

    os.remove(os.path.join(out, "synthetic", "truth.json"))  # damaged output: rebuilt, and so is its consumer
    fake.calls = []
    assert run() == {"nuclei": "skipped", "synthetic": "built", "analyze": "built"}


def test_demo_over_an_unrecorded_earlier_output_folder_rebuilds_it(tmp_path):
    """An output folder from an older demo (no demo_state.json) is rebuilt, not a FileExistsError."""
    demo = _demo_module()
    out = tmp_path / "demo_out"
    for sub in ("nuclei", "synthetic", "analysis_run"):
        (out / sub).mkdir(parents=True)
        (out / sub / "old.txt").write_text("old")
    done = demo.Demo(str(out), 50, 0.4, 0, [], cosmic=FakeCosmic()).run()
    assert set(done.values()) == {"built"}
    assert not (out / "synthetic" / "old.txt").exists() and not (out / "synthetic.old").exists()


def test_volcano_labels_do_not_overlap(tmp_path):
    """The demo's eight top genes (fixed offsets put two names on top of each other) get separate label boxes."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import Bbox

    from cosmic_jax.workflows.report_figures import place_labels

    fig, ax = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
    x = np.array([1.31, -1.62, -1.6, 1.36, -1.5, -1.47, 1.37, -1.59])
    y = np.array([120.0, 108.6, 107.1, 107.1, 101.1, 91.2, 89.8, 82.2])
    ax.scatter(x, y)
    ax.set_xlim(-2.2, 2.2)
    ax.set_ylim(-12, 133)
    place_labels(ax, x, y, [f"gene{i:04d}" for i in range(len(x))])
    fig.draw_without_rendering()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == len(x)
    overlaps = [(i, j) for i in range(len(boxes)) for j in range(i) if Bbox.intersection(boxes[i], boxes[j])]
    assert not overlaps
    inside = ax.get_window_extent()
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 for b in boxes)  # no label clipped at the sides
    plt.close(fig)



def test_umap_coordinates_are_cached_by_latent(tmp_path, monkeypatch):
    """A rebuilt report reuses the UMAP of an unchanged latent and recomputes a changed one."""
    import types

    from cosmic_jax.workflows.report_figures import umap_coordinates

    calls = []

    class FakeUMAP:
        def __init__(self, **kw):
            calls.append(kw)

        def fit_transform(self, z):
            return z[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    z = np.random.default_rng(0).normal(size=(30, 4))
    cache = str(tmp_path / "xy.npz")
    first = umap_coordinates(z, 0, cache)
    np.testing.assert_allclose(umap_coordinates(z, 0, cache), first)
    assert len(calls) == 1 and calls[0]["precomputed_knn"][0].shape == (30, 15)
    np.testing.assert_allclose(umap_coordinates(z + 1, 0, cache), (z[:, :2] + 1) * 2)
    umap_coordinates(z + 1, 1, cache)  # another seed is another layout
    assert len(calls) == 3


def test_headline_shows_the_learning_curve_beside_the_extrapolated_estimate():
    from cosmic_jax.workflows.report import headline_section

    summary = {"expr_var_explained_by_morph": {**_ci(0.618), "learning_curve": {"1": 0.607, "0.5": 0.595}},
               "morph_var_explained_by_expr": _ci(0.776)}
    md = "\n".join(headline_section(summary))
    assert _table_rows(md, "expression variance explained by morphology") == [
        ["expression variance explained by morphology", "0.618", "0.568 – 0.668", "0.607 (1) / 0.595 (0.5)"]]
    assert _table_rows(md, "morphology-feature variance explained by expression")[0][-1] == "–"
    assert "before extrapolation" in md
