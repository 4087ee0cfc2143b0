"""Embedding levers: which pretraining, read-out and morphology input make the MAE embedding carry
the morphology (issue 11 item 1).

For every dataset (a paired dir from `cosmic data synthetic` or a generator family), every
pretraining variant (trained once, cached) and every read-out, it measures

  * cell type from the representation (`celltype.probe`: linear / kNN accuracy);
  * cross-validated R^2 of each of the 8 hand-measured features from the representation (ridge on
    the standardised representation, and RBF kernel ridge);
  * the expression side of the decomposition with the representation alone as morphology:
    cross-fitted kernel-ridge E[e|m] + the "cov" estimator (`--evals krr`, seconds) or the joint
    flow ("analysis" variant, as `cosmic analyze --quick`; `--evals flow`, minutes);
and the same for the 8 hand features alone and for both, so every row can be compared with them.

  python experiments/embed_levers.py --data DIR [--data DIR ...] --out OUT \
      --train base:steps=300 --train p4:steps=300,model.patch_size=4 \
      --read L-1.mean L0.meanstd.tta --inputs pca8w --evals probe,feat,krr [--orient both]

Train variant ``name:key=value,...`` = `cosmic_jax.configs.pretrain` overrides on the "small" config
(the one `cosmic analyze` pretrains). Read-out ``L<layers>.<pool>[.tta]``: blocks joined by
"+" or "all" (-1 = last, after the final LayerNorm), pool in mean | cls | std | meanstd | meancls | meanstdmax | mom | meanstdmom (mom = rotation-invariant
spatial second moments of each token channel, see spatial_moments), ``.tta``
averages the pooled vector over the 8 dihedral transforms. Morphology input: ``pca<k>[w]`` (k PCs,
whitened with w), ``full`` (the standardised representation), ``+f`` appends the hand features.
CPU seconds (process time, all threads) are recorded for pretraining and for embedding.
Rows go to OUT/results.jsonl; OUT/models/<dataset>/<variant> caches the MAEs.
``python experiments/embed_levers.py --table OUT/results.jsonl`` prints them as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

DIHEDRAL = [(k, f) for f in (False, True) for k in range(4)]


def dihedral(images: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """(N, H, W, C) -> the same crops rotated by k * 90 degrees, then mirrored if ``flip``."""
    out = np.rot90(images, k, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


# ----------------------------------------------------------------------------- data
class Dataset:
    """Crops, cell types, hand features, expression embedding and truth of one paired dataset."""

    def __init__(self, path: str, expr_comps: int = 20, seed: int = 0, oriented_dir: str | None = None,
                 fill: float | None = None):
        import anndata

        from cosmic_jax.analysis.expression import embed_expression
        from cosmic_jax.data.cells import cell_ids, match_ids
        from cosmic_jax.analysis.morphology import measure_crops, standardize_features
        from cosmic_jax.data.records import CropSource

        self.path, self.name = path, os.path.basename(path.rstrip("/"))
        self.crops_dir = os.path.join(path, "crops")
        measured_dir = self.crops_dir  # the hand features: always the crops as given (as the analysis)
        if oriented_dir:  # the MAE pretrains on and embeds the oriented copy (analyze.orient)
            from cosmic_jax.data.orient import write_oriented

            self.crops_dir = write_oriented(self.crops_dir, oriented_dir, fill=fill)
            self.name += "+orient" + (f"+fill{fill}" if fill else "")
        adata = anndata.read_h5ad(os.path.join(path, "cells.h5ad"))
        ids = cell_ids(adata)
        src = CropSource(self.crops_dir)
        crop_ids = np.array(src.cell_ids()).astype(str)
        order = match_ids(ids, crop_ids)
        self.images = np.stack([src[int(i)]["image"] for i in order]).astype(np.float32)
        self.labels = np.asarray(adata.obs["cell_type"]).astype(str)
        t = time.process_time()
        feats = measure_crops(measured_dir)  # measured from the pixels, as the analysis does
        self.feature_cpu_s = time.process_time() - t
        forder = match_ids(ids, feats.cell_ids, "features")
        self.feats = standardize_features(feats.raw[forder], feats.names, ids)
        self.expr = embed_expression(adata, n_comps=expr_comps, seed=seed)
        with open(os.path.join(path, "truth.json")) as f:
            self.truth = json.load(f)
        # Diagnostic only (generator internals, never seen by the analysis): the shared state.
        state = [np.asarray(adata.obsm["true_shared"], np.float64)] if "true_shared" in adata.obsm else []
        if "response" in adata.obs:
            state.append((np.asarray(adata.obs["response"]).astype(str) == "responder")[:, None].astype(float))
        self.state = np.concatenate(state, axis=1) if state else None


# ----------------------------------------------------------------------------- pretraining
def parse_train(spec: str) -> tuple[str, list[str]]:
    name, _, rest = spec.partition(":")
    return name, [kv for kv in rest.split(",") if kv]


def pretrain(ds: Dataset, name: str, overrides: list[str], out: str, seed: int) -> tuple[str, dict]:
    """Train (or reuse) one MAE on the dataset's crops; returns (workdir, timing)."""
    from cosmic_jax.configs import pretrain as pretrain_configs
    from cosmic_jax.configs.overrides import load_config
    from cosmic_jax.train.pretrain import train_and_evaluate

    work = os.path.join(out, "models", ds.name, name)
    tfile = os.path.join(work, "timing.json")
    if os.path.exists(tfile):
        with open(tfile) as f:
            return work, json.load(f)
    h, _, c = ds.images.shape[1:]
    ov = dict(kv.split("=", 1) for kv in overrides)
    steps = int(float(ov.get("steps", 300)))
    base = [f"steps={steps}", f"model.image_size={h}", f"model.channels={c}", f"seed={seed}",
            "progress=false", "recon_every=0", f"ckpt_every={steps}", "log_every=50"]
    cfg = load_config(pretrain_configs, "small", [f"--config.{kv}" for kv in base + overrides])
    t, w = time.process_time(), time.perf_counter()
    train_and_evaluate(cfg, ds.crops_dir, work)
    timing = {"pretrain_cpu_s": time.process_time() - t, "pretrain_wall_s": time.perf_counter() - w,
              "overrides": overrides, "steps": steps}
    with open(tfile, "w") as f:
        json.dump(timing, f)
    return work, timing


# ----------------------------------------------------------------------------- read-outs
def parse_read(spec: str, depth: int) -> tuple[tuple[int, ...], str, bool]:
    """``L<layers>.<pool>[.tta]``; layers "all" = every block, else ints joined by "+"."""
    parts = spec.split(".")
    layers = tuple(range(depth)) if parts[0] == "Lall" else tuple(int(x) for x in parts[0][1:].split("+"))
    return layers, parts[1], "tta" in parts[2:]


def spatial_moments(tok: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotation-invariant second spatial moments of each token channel over the patch grid.

    tok: (..., T, D) patch tokens in patchify (row-major) order. With w_t = tok_t - mean_t tok and
    grid positions p_t centred on the crop centre, M = sum_t w_t p_t p_t^T / T per channel;
    returns (trace M, |anisotropy of M|) = (m_xx + m_yy, sqrt((m_xx - m_yy)^2 + 4 m_xy^2)), each
    (..., D): how a channel's response spreads over the nucleus (size, radial profile) and how
    elongated that spread is, whatever the orientation.
    """
    g = np.arange(grid) - (grid - 1) / 2
    y, x = np.repeat(g, grid), np.tile(g, grid)
    w = tok - tok.mean(axis=-2, keepdims=True)
    t = tok.shape[-2]
    mxx = np.einsum("...td,t->...d", w, x * x) / t
    myy = np.einsum("...td,t->...d", w, y * y) / t
    mxy = np.einsum("...td,t->...d", w, x * y) / t
    return mxx + myy, np.sqrt((mxx - myy) ** 2 + 4 * mxy**2)


class TokenReader:
    """Pooled statistics of every encoder block's tokens, per dihedral transform (cached)."""

    def __init__(self, work: str, images: np.ndarray, batch: int = 250):
        import jax

        from cosmic_jax.models.mae import MAE, grid as mae_grid
        from cosmic_jax.train.pretrain import load_for_inference

        self.cfg, params, _, _ = load_for_inference(work)
        self.params, self.images, self.batch = params, images, batch
        self.model = MAE(self.cfg)
        self.cls = 1 if self.cfg.cls_token else 0
        self.grid = mae_grid(self.cfg)
        layers = tuple(range(self.cfg.depth))
        # One forward per transform: the tokens of every block, pooled here in numpy.
        self._fn = jax.jit(lambda p, x: self.model.apply({"params": p}, x, method=MAE.encode, layer=layers,
                                                          pool="none"))
        self.cache: dict = {}
        self.cpu_s = 0.0

    def stats(self, layer: int, t: int) -> dict[str, np.ndarray]:
        """{"mean","std","max","cls"} (N, D) of block ``layer`` under dihedral transform ``t``."""
        if t not in self.cache:
            k, flip = DIHEDRAL[t]
            t0 = time.process_time()
            out: dict[str, list] = {"mean": [], "std": [], "max": [], "cls": [], "mom": []}
            for s in range(0, len(self.images), self.batch):
                h = np.asarray(self._fn(self.params, dihedral(self.images[s:s + self.batch], k, flip)))
                tok = h[:, :, self.cls:]  # (L, B, T, D)
                out["mean"].append(tok.mean(2))
                out["std"].append(tok.std(2))
                out["max"].append(tok.max(2))
                r1, r2 = spatial_moments(tok, self.grid)
                out["mom"].append(np.concatenate([r1, r2], axis=-1))
                out["cls"].append(h[:, :, 0] if self.cls else tok.mean(2))
            self.cache[t] = {k_: np.concatenate(v, axis=1).astype(np.float64) for k_, v in out.items()}
            self.cpu_s += time.process_time() - t0
        return {k_: v[layer % self.cfg.depth] for k_, v in self.cache[t].items()}

    def read(self, spec: str) -> np.ndarray:
        layers, pool, tta = parse_read(spec, self.cfg.depth)
        names = {"mean": ["mean"], "cls": ["cls"], "std": ["std"], "meanstd": ["mean", "std"],
                 "meancls": ["mean", "cls"], "meanstdmax": ["mean", "std", "max"],
                 "meanstdmom": ["mean", "std", "mom"], "mom": ["mom"]}[pool]
        ts = range(8) if tta else [0]
        blocks = []
        for layer in layers:
            for nm in names:
                blocks.append(np.mean([self.stats(layer, t)[nm] for t in ts], axis=0))
        return np.concatenate(blocks, axis=1)


# ----------------------------------------------------------------------------- evaluations
def morph_input(x: np.ndarray, spec: str, feats: np.ndarray, seed: int) -> np.ndarray:
    from cosmic_jax.analysis.morphology import pca_reduce

    base, _, extra = spec.partition("+")
    if base == "none":
        m = np.zeros((len(feats), 0))
    elif base == "full":
        m = (x - x.mean(0)) / (x.std(0) + 1e-12)
    elif base.startswith("pca"):
        k = int(base[3:].rstrip("w"))
        if base.endswith("w"):
            m = pca_reduce(x, k, seed)
        else:
            from sklearn.decomposition import PCA

            m = PCA(min(k, x.shape[1]), random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"unknown morphology input {spec!r}")
    return np.concatenate([m, feats], axis=1) if extra == "f" else m


def feature_r2(x: np.ndarray, feats: np.ndarray, seed: int, kind: str = "ridge") -> np.ndarray:
    """(F,) 5-fold cross-validated R^2 of each standardised feature from x."""
    from sklearn.kernel_approximation import Nystroem
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()]
    if kind == "krr":
        steps.append(Nystroem(gamma=0.5 / x.shape[1], n_components=min(600, len(x) // 2), random_state=seed))
    model = make_pipeline(*steps, RidgeCV(alphas=np.logspace(-3, 3, 13)))
    pred = cross_val_predict(model, x, feats, cv=KFold(5, shuffle=True, random_state=seed))
    return 1 - ((feats - pred) ** 2).sum(0) / ((feats - feats.mean(0)) ** 2).sum(0)


class KRRSampler:
    """Deterministic E[t|c] by RBF kernel ridge (Nystroem); the "cov" estimator needs only the mean."""

    def __init__(self, seed: int):
        self.seed = seed

    def fit(self, c, t):
        from sklearn.kernel_approximation import Nystroem
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(
            StandardScaler(), Nystroem(gamma=0.5 / c.shape[1], n_components=min(600, len(c) // 2),
                                       random_state=self.seed), RidgeCV(alphas=np.logspace(-3, 2, 6)))
        self.model.fit(c, t)
        return self

    def __call__(self, c, s, seed):
        return np.repeat(self.model.predict(c)[None], s, axis=0)


def expr_explained(ds: Dataset, m: np.ndarray, kind: str, seed: int, n_folds: int = 3) -> dict:
    """Expression variance explained by morphology input m (overall, gene space; cov estimator)."""
    from cosmic_jax.analysis import variance as V

    e = ds.expr
    if kind == "krr":
        fit_fn, s = (lambda tr: KRRSampler(seed).fit(m[tr], e.scores[tr])), 2
    else:
        from cosmic_jax.configs.joint import get_config
        from cosmic_jax.joint.model import fit_joint

        jcfg = get_config("analysis")

        def fit_fn(tr):
            mdl = fit_joint(m[tr], e.scores[tr], jcfg, seed=seed)
            return lambda c, s_, sd: mdl.sample_expr_given_morph(c, s_, sd)
        s = 8
    mom = V.cross_fit_moments(m, fit_fn, s, n_folds, seed, ds.labels)
    dec = V.decompose(e.scores, mom, metric=e.metric, resid_sq=e.resid_sq, n_boot=100, seed=seed)
    per_gene = V.per_readout_explained(dec.explained_cov, e.loadings, e.gene_var)
    out = {"estimate": float(dec.overall.estimate), "ci": [float(dec.overall.ci_low), float(dec.overall.ci_high)]}
    tg = ds.truth.get("expr_var_explained_by_morph_per_gene")
    if tg:
        from scipy.stats import spearmanr

        t = np.array([tg[g] for g in e.gene_names])
        out["spearman"] = float(spearmanr(per_gene, t).statistic)
        out["within_0.05"] = float(np.mean(np.abs(per_gene - t) <= 0.05))
    return out


def evaluate(ds: Dataset, x: np.ndarray | None, inputs: list[str], evals: set[str], seed: int) -> dict:
    """Every requested evaluation of representation x (None = the hand features alone)."""
    from cosmic_jax.analysis import celltype

    rep = ds.feats.values if x is None else x
    row: dict = {"dim": int(rep.shape[1])}
    if "probe" in evals:
        p = celltype.probe(rep, ds.labels, seed=seed)
        row["ct_linear"], row["ct_knn"] = p["linear"]["accuracy"], p["knn"]["accuracy"]
    if "feat" in evals and x is not None:
        for kind in ("ridge", "krr") if "featkrr" in evals else ("ridge",):
            r2 = feature_r2(rep, ds.feats.values, seed, kind)
            row[f"feat_r2_{kind}"] = dict(zip(ds.feats.names, np.round(r2, 3).tolist()))
            row[f"feat_r2_{kind}_mean"] = float(np.mean(r2))
    if "state" in evals and ds.state is not None:
        # What of the true shared state S the representation carries (RBF kernel ridge R^2).
        row["state_r2_krr"] = np.round(feature_r2(rep, ds.state, seed, "krr"), 3).tolist()
    if "probein" in evals and x is not None:
        for spec in inputs:
            p = celltype.probe(morph_input(x, spec, ds.feats.values, seed), ds.labels, seed=seed)
            row[f"ct_in[{spec}]"] = [p["linear"]["accuracy"], p["knn"]["accuracy"]]
    for kind in ("krr", "flow"):
        if kind not in evals:
            continue
        specs = ["features"] if x is None else inputs
        for spec in specs:
            m = ds.feats.values if x is None else morph_input(x, spec, ds.feats.values, seed)
            t = time.process_time()
            row[f"expr_{kind}[{spec}]"] = {**expr_explained(ds, m, kind, seed), "cpu_s": time.process_time() - t}
    return row


def table(path: str) -> str:
    """Markdown table of a results.jsonl (one row per dataset x model x read-out)."""
    rows = [json.loads(line) for line in open(path)]
    keys = sorted({k for r in rows for k in r if k.startswith("expr_")})
    probes = sorted({k for r in rows for k in r if k.startswith("ct_in[")})
    head = (["data", "model", "read", "pretrain CPU s", "ct linear", "ct kNN", "feat R2 ridge", "feat R2 krr",
             "state R2 (diag.)"] + [f"{k} lin/kNN" for k in probes] + keys)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["data"], r["model"], r["read"], f"{r.get('pretrain_cpu_s', 0):.0f}"]
        cells += [f"{r[k]:.3f}" if isinstance(r.get(k), float) else "" for k in
                  ("ct_linear", "ct_knn", "feat_r2_ridge_mean", "feat_r2_krr_mean")]
        cells.append(" ".join(f"{v:.2f}" for v in r["state_r2_krr"]) if "state_r2_krr" in r else "")
        cells += [f"{r[k][0]:.3f}/{r[k][1]:.3f}" if k in r else "" for k in probes]
        cells += [f"{r[k]['estimate']:.3f}" + (f" ({r[k]['spearman']:.2f})" if "spearman" in r[k] else "")
                  if k in r else "" for k in keys]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--train", action="append", default=[], help="name:key=value,... (pretrain overrides)")
    p.add_argument("--read", nargs="+", default=["L-1.mean"])
    p.add_argument("--inputs", nargs="+", default=["pca8w"])
    p.add_argument("--evals", default="probe,feat,krr",
                   help="probe, feat (ridge R^2 of the hand features; featkrr adds kernel ridge), state "
                        "(R^2 of the true shared state, diagnostic), probein (probe of each morphology "
                        "input), krr / flow (decomposition)")
    p.add_argument("--baseline", action="store_true", help="also evaluate the 8 hand features alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--orient", choices=("no", "yes", "both"), default="no",
                   help="pretrain on and embed the crops rotated onto their nucleus's major axis "
                        "(cosmic_jax.data.orient; OUT/oriented/<dataset>), as given, or both")
    p.add_argument("--fill", type=float, default=None,
                   help="with --orient: also magnify each dataset so its 95th-percentile nucleus spans this "
                        "share of the crop side")
    a = p.parse_args(argv)
    evals = set(a.evals.split(","))
    os.makedirs(a.out, exist_ok=True)
    res_path = os.path.join(a.out, "results.jsonl")

    def emit(row):
        with open(res_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        short = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                 if not isinstance(v, dict) or k.startswith("expr_")}
        print(json.dumps(short), flush=True)

    variants = {"no": [False], "yes": [True], "both": [False, True]}[a.orient]
    for path, orient in ((p_, o) for p_ in a.data for o in variants):
        name = os.path.basename(path.rstrip("/"))
        ds = Dataset(path, seed=a.seed, oriented_dir=os.path.join(a.out, "oriented", name) if orient else None,
                     fill=a.fill)
        base = {"data": ds.name, "truth_expr": ds.truth["expr_var_explained_by_morph"]}
        if a.baseline:
            emit({**base, "model": "features", "read": "-", "feature_cpu_s": ds.feature_cpu_s,
                  **evaluate(ds, None, a.inputs, evals, a.seed)})
        for spec in a.train:
            name, ov = parse_train(spec)
            work, timing = pretrain(ds, name, ov, a.out, a.seed)
            reader = TokenReader(work, ds.images)
            for read in a.read:
                t = reader.cpu_s
                x = reader.read(read)
                row = {**base, "model": name, "read": read, **{k: timing[k] for k in ("pretrain_cpu_s", "steps")},
                       "overrides": ov}
                row.update(evaluate(ds, x, a.inputs, evals, a.seed))
                row["embed_cpu_s_new"] = reader.cpu_s - t
                emit(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
