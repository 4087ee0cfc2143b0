"""Turn nucleus crops into MAE embeddings: one jitted, fixed-batch encoder forward.

Input convention (same as training, see ``cosmic_jax/configs/mae.py``): crops are fed exactly as
stored in the crop dataset, cast to float32 and NOT rescaled here (a uint8 crop with values
0..255 stays 0..255). If the model config has ``pixel_mean`` / ``pixel_std`` the model itself
normalises; that rule travels with the config and the export.

Pose: an MAE pretrained on oriented crops (``cosmic_jax/data/orient.py``; ``cosmic analyze`` does
that) records the pose in its run and export; by default crops are put into that pose here before
the forward, unless a crop dataset is already an oriented copy.

Every call runs the same compiled function on batches of exactly ``batch_size`` images (the last
batch is zero-padded and the padding rows are dropped), so any N costs one compile, and the
result does not depend on how the images were chunked.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

import cosmic_jax
from cosmic_jax.data.cells import cell_ids as cell_ids_of
from cosmic_jax.data.cells import match_ids
from cosmic_jax.data.loader import make_eval_iterator
from cosmic_jax.data.orient import AS_CUT, orient_batch, scale_into
from cosmic_jax.data.records import CropSource
from cosmic_jax.embed.artifact import flatten_params, load_export
from cosmic_jax.models.mae import MAE
from cosmic_jax.train.sharding import (
    batch_sharding,
    make_mesh,
    merge_strided_chunks,
    state_shardings,
    strided_chunks,
)

POOLS = ("mean", "cls", "mean_std")
# Read-out defaults (notes/science.md, "Embedding levers"): mean and std of the patch tokens of a
# middle and the last block, averaged over the 8 rotations / reflections of the crop. On both
# generator families this carried the morphology far better than the last block's mean token
# (cell type, hand-measured features, expression variance explained).
DEFAULT_POOL = "mean_std"
DEFAULT_DIHEDRAL = True
DEFAULT_BATCH = 256
# Images per encoder pass inside one compiled call. Why: at 256 images the (16640, 1536) MLP
# activations (102 MB) spill the 32 MB L3; 32-image chunks stay in cache. vit_s8_64 on 2 cores,
# same compiled batch of 256: 44.7 img/s unchunked, 53.6 / 59.7 / 63.7 at 128 / 64 / 32
# (notes/embed.md). Identical outputs (each image's forward is independent).
DEFAULT_MICRO_BATCH = 32
_PROGRESS_MIN_BATCHES = 8  # a bar for less than this is noise


class EmbedInputError(ValueError):
    """Images handed to :class:`Embedder` do not fit the model; the message says what is wrong."""


def _tqdm(n_batches: int, enabled: bool | None, desc: str):
    disable = (not enabled) if enabled is not None else n_batches < _PROGRESS_MIN_BATCHES
    return tqdm(total=n_batches, desc=desc, unit="batch", disable=disable, leave=False)


class Embedder:
    """Embeds crops with a (pretrained) MAE encoder.

    Args:
      model_cfg: a :class:`cosmic_jax.configs.mae.MAEConfig`.
      params: the MAE ``params`` pytree (encoder weights are enough; decoder weights are ignored).
      layer: encoder block whose output is pooled; -1 = the last block (after the final
        LayerNorm), ``0..depth-1`` or negative indices like Python lists; or a sequence of blocks
        (their pooled outputs are concatenated); None (default) = :func:`default_layers`, a
        middle block and the last. Intermediate blocks often embed microscopy better than the
        last one.
      pool: ``"mean_std"`` (mean and std of the patch tokens, default), ``"mean"`` or ``"cls"``
        (the CLS token).
      dihedral: average each embedding over the 8 rotations / reflections of the crop
        (orientation invariant; 8x the encoder compute).
      batch_size: images per compiled call; the last batch is zero-padded.
      micro_batch: images per encoder pass on each device inside a call (a ``lax.map`` over
        chunks, for cache locality); used when it divides the per-device batch, else that whole
        batch is one pass.
      devices: how many local devices to split each batch over (data parallel, params
        replicated); None = all of the default backend's local devices. The largest count up to
        that which divides ``batch_size`` is used (``num_devices``).
      program: a loaded export's ``jax.export.Exported`` forward ``(flat weights, images (n, H, W, C)
        f32) -> (n, D)`` to run instead of the model built from ``model_cfg``; ``params`` are then its
        flat weights and layer/pool/dihedral describe what the program computes
        (:meth:`from_export` sets this up).
      pose: the pose of the crops the model was pretrained on (``{"oriented", "scale", "fill"}``, from
        the run's ``pose.json`` or the export; None = unknown, treated as crops as cut).
      orient: put crops into the model's pose before the forward (rotate onto the nucleus's major
        axis, centre, magnify); None (default) = when the model was pretrained on oriented crops.
        A crop dataset is magnified as the analysis does (its 95th-percentile nucleus to the pose's
        ``fill``), an array by the pose's ``scale``; a crop dataset that is already an oriented copy
        is used as it is. Arrays are always oriented: pass ``orient=False`` for arrays read from an
        oriented copy. Crops to be oriented may have any (square) size: they are oriented into the
        model's input size.
      step: training step the params come from (metadata only).
      source: where the params come from, e.g. a workdir or export dir (metadata only).
      progress: tqdm bar: None = only for long inputs, True/False = always/never.
    """

    def __init__(
        self,
        model_cfg: Any,
        params: Any,
        *,
        layer: int | Sequence[int] | None = None,
        pool: str = DEFAULT_POOL,
        dihedral: bool = DEFAULT_DIHEDRAL,
        batch_size: int = DEFAULT_BATCH,
        micro_batch: int = DEFAULT_MICRO_BATCH,
        devices: int | None = None,
        program: jax.export.Exported | None = None,
        pose: dict[str, Any] | None = None,
        orient: bool | None = None,
        step: int | None = None,
        source: str | None = None,
        progress: bool | None = None,
    ):
        self.model_cfg = model_cfg
        self.model = MAE(model_cfg)
        # init_variables() boxes params with logical-axis metadata; inference wants plain arrays.
        params = nn.meta.unbox(params)
        self.depth = int(model_cfg.depth)
        if layer == "all":
            layer = tuple(range(self.depth))
        self.layer = self._check_layer(default_layers(self.depth) if layer is None else layer)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if pool == "cls" and not getattr(model_cfg, "cls_token", True):
            raise ValueError(f"pool='cls' but model {model_cfg.name!r} has no CLS token (cls_token=False)")
        self.pool = pool
        self.dihedral = bool(dihedral)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        local = jax.local_devices()
        if devices is not None and int(devices) < 1:
            raise ValueError(f"devices must be >= 1 or None (all local devices), got {devices}")
        most = min(len(local), len(local) if devices is None else int(devices))
        d = max(k for k in range(1, most + 1) if self.batch_size % k == 0)
        self.num_devices = d
        # The trainers' mesh and rules: data axis over these devices, fsdp=1, so the params (no
        # logical names given) are replicated and each batch is split over every device.
        mesh = make_mesh(devices=local[:d])
        self._batch_sharding = batch_sharding(mesh)
        param_shardings = state_shardings(params, mesh)
        self.params = jax.device_put(params, param_shardings)
        self.program = program
        self.pose = dict(pose) if pose else None
        trained_oriented = bool(self.pose and self.pose["oriented"])
        self.orient = trained_oriented if orient is None else bool(orient)
        self.orient_scale = float(self.pose["scale"]) if trained_oriented else 1.0
        # the pose crops are put into (orient forced on a model trained as cut: rotated, not magnified)
        self._into = (self.pose if trained_oriented else dict(AS_CUT, oriented=True)) if self.orient else None
        self.step = step
        self.source = source
        self.progress = progress
        self.input_shape = (int(model_cfg.image_size), int(model_cfg.image_size), int(model_cfg.channels))

        model, layer_, pool_, dihedral_ = self.model, self.layer, self.pool, self.dihedral

        def encode(params, images):
            return model.apply({"params": params}, images, method=MAE.encode, layer=layer_, pool=pool_,
                               dihedral=dihedral_)

        if program is not None:
            encode = program.call  # the exported StableHLO, its symbolic batch set per pass

        per_device = self.batch_size // d
        micro = int(micro_batch) if int(micro_batch) > 0 and per_device % int(micro_batch) == 0 else per_device
        self.micro_batch = micro
        passes = per_device // micro

        def encode_chunked(params, images):
            if passes == 1:
                return encode(params, images)
            # Strided passes span every device's shard: the chunking moves no data between devices.
            out = jax.lax.map(lambda c: encode(params, c), strided_chunks(images, passes))
            return merge_strided_chunks(out)

        # (params, images (n, H, W, C)) -> (n, D), un-jitted and unchunked: export.py serialises it
        # with a symbolic batch dimension
        self.forward: Callable[[Any, Any], Any] = encode
        self._encode = jax.jit(encode_chunked, in_shardings=(param_shardings, self._batch_sharding),
                               out_shardings=self._batch_sharding)
        # Shape inference without compiling: output width for N = 0 and for callers.
        spec = jax.ShapeDtypeStruct((self.batch_size, *self.input_shape), np.float32)
        out = jax.eval_shape(encode, params, spec)
        self.dim = int(out.shape[-1])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoint(
        cls, path: str, step: int | None = None, layer: int | Sequence[int] | None = None,
        pool: str = DEFAULT_POOL, dihedral: bool = DEFAULT_DIHEDRAL, **kw
    ) -> "Embedder":
        """Load a ``cosmic pretrain`` workdir (latest step unless ``step``); see class Args."""
        # Local: train.pretrain pulls orbax, grain and sklearn, which export users never need:
        # `import cosmic_jax.embed` takes 2.1 s with it at the top, 0.9 s without (CPU s, 3 runs).
        from cosmic_jax.train.pretrain import load_for_inference

        model_cfg, params, got_step, info = load_for_inference(path, step=step)
        return cls(model_cfg, params, layer=layer, pool=pool, dihedral=dihedral, step=int(got_step),
                   pose=info["pose"], source=f"checkpoint:{os.path.abspath(path)}", **kw)

    @classmethod
    def from_export(
        cls, path: str, layer: int | Sequence[int] | None = None, pool: str | None = None,
        dihedral: bool | None = None, **kw
    ) -> "Embedder":
        """Load an export directory (hashes verified, config.json checked against the program) and
        run its StableHLO program, so the embedding is what the portable artifact computes.

        ``layer`` / ``pool`` / ``dihedral`` different from the exported read-out cannot run that
        program: the model is then rebuilt from config.json + the exported encoder weights (which
        hold every block). Other keywords as in the class Args.
        """
        bundle = load_export(path)
        exported = {k: bundle.config["embedding"][k] for k in ("layer", "pool", "dihedral")}
        asked = {k: v for k, v in (("layer", layer), ("pool", pool), ("dihedral", dihedral)) if v is not None}
        common = dict(step=bundle.config.get("training_step"), pose=bundle.config["input"].get("pose"),
                      source=f"export:{os.path.abspath(path)}", **kw)
        if not asked:
            return cls(bundle.model_cfg, flatten_params(bundle.params), **exported, program=bundle.program, **common)
        # another read-out: the model from config + weights (the program computes only its own)
        return cls(bundle.model_cfg, bundle.params, **{**exported, **asked}, **common)

    # ------------------------------------------------------------------ metadata
    @property
    def model_name(self) -> str:
        return str(getattr(self.model_cfg, "name", "custom"))

    def metadata(self) -> dict[str, Any]:
        """h5ad-safe description of what produced the embeddings (no None values)."""
        return {
            "model": self.model_name,
            "step": -1 if self.step is None else int(self.step),
            **self.readout(),
            "orient": self.orient,
            "orient_scale": self.orient_scale,
            "dim": int(self.dim),
            "input_shape": list(self.input_shape),
            "source": self.source or "in-memory",
            "cosmic_jax_version": cosmic_jax.__version__,
        }

    def readout(self) -> dict[str, Any]:
        """How the embedding is read from the encoder: layer(s) as given and as block indices, pool,
        dihedral averaging (h5ad- and JSON-safe)."""
        multi = isinstance(self.layer, tuple)
        return {
            "layer": list(self.layer) if multi else int(self.layer),
            "layer_index": [li % self.depth for li in self.layer] if multi else int(self.layer % self.depth),
            "pool": self.pool,
            "dihedral": self.dihedral,
        }

    def __repr__(self) -> str:
        return (f"Embedder(model={self.model_name!r}, step={self.step}, layer={self.layer}, "
                f"pool={self.pool!r}, dihedral={self.dihedral}, orient={self.orient}, dim={self.dim}, "
                f"batch_size={self.batch_size}, devices={self.num_devices})")

    # ------------------------------------------------------------------ validation
    def _check_layer(self, layer: int | Sequence[int]) -> int | tuple[int, ...]:
        layers = [layer] if isinstance(layer, (int, np.integer)) else layer
        if isinstance(layer, (bool, str)) or not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(f"layer must be an int or a non-empty sequence of ints, got {layer!r}")
        for li in layers:
            if isinstance(li, bool) or not isinstance(li, (int, np.integer)):
                raise ValueError(f"layer must be an int or a non-empty sequence of ints, got {layer!r}")
            if not -self.depth <= int(li) < self.depth:
                raise ValueError(
                    f"layer={li} out of range for a {self.depth}-block encoder "
                    f"(use 0..{self.depth - 1} or -{self.depth}..-1; -1 = last block)"
                )
        return int(layer) if isinstance(layer, (int, np.integer)) else tuple(int(li) for li in layers)

    def check_images(self, images: Any, offset: int = 0, where: str = "images", check_size: bool = True) -> np.ndarray:
        """Validate a batch and return it as float32 (N, H, W, C); never resizes.

        Args:
          images: (N, H, W) for single-channel models or (N, H, W, C); any real numeric dtype.
          offset: index of ``images[0]`` in the caller's full input (for error messages).
          where: what to call the input in error messages.
          check_size: check H x W against the model (off for crops still to be oriented into its size,
            which need only be square).

        Returns:
          float32 (N, H, W, C) array.
        """
        x = np.asarray(images)
        h, w, c = self.input_shape
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise EmbedInputError(f"{where}: dtype {x.dtype} is not a real numeric type")
        if np.issubdtype(x.dtype, np.complexfloating):
            raise EmbedInputError(f"{where}: complex dtype {x.dtype} is not supported")
        if x.ndim == 3:
            if c != 1:
                raise EmbedInputError(
                    f"{where}: got (N, H, W) = {x.shape} but model {self.model_name!r} expects "
                    f"{c} channels: pass (N, {h}, {w}, {c})"
                )
            x = x[..., None]
        elif x.ndim != 4:
            raise EmbedInputError(
                f"{where}: expected a 4-d (N, H, W, C) or 3-d (N, H, W) array, got ndim={x.ndim} "
                f"shape {x.shape}" + (" (a single image? add a batch axis: images[None])" if x.ndim == 2 else "")
            )
        if check_size and x.shape[1:3] != (h, w):
            raise EmbedInputError(
                f"{where}: image size {x.shape[1]}x{x.shape[2]} != model input {h}x{w} "
                f"(model {self.model_name!r}); crops are never resized, re-crop them to {h}x{w}"
            )
        if not check_size and x.shape[1] != x.shape[2]:
            raise EmbedInputError(f"{where}: crops are {x.shape[1]}x{x.shape[2]}; orienting needs square crops")
        if x.shape[3] != c:
            raise EmbedInputError(
                f"{where}: {x.shape[3]} channels != model input channels {c} (model {self.model_name!r})"
            )
        x = x.astype(np.float32, copy=False)
        finite = np.isfinite(x).all(axis=(1, 2, 3))
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise EmbedInputError(
                f"{where}: {bad.size} image(s) contain NaN or Inf, e.g. index "
                f"{[int(i) + offset for i in bad[:5]]}"
            )
        return x

    # ------------------------------------------------------------------ pose
    def _pose(self, x: np.ndarray, label_of: Callable[[int], str], scale: float | None) -> np.ndarray:
        """Validated float32 crops -> rotated, centred and magnified by ``scale`` into crops of the
        model's input size (None: as they are)."""
        if scale is None:
            return x
        try:
            return orient_batch(x, label_of=label_of, scale=scale, size=self.input_shape[0])
        except ValueError as e:  # a crop with no nucleus has no axis to turn onto
            raise EmbedInputError(f"{e}; embed it with orient=False (--config.orient=no) or drop it") from None

    # ------------------------------------------------------------------ embedding
    def _run(self, chunks: Iterable[np.ndarray], n_total: int, desc: str, progress: bool | None) -> np.ndarray:
        """Embed validated float32 chunks of <= batch_size images; returns (n_total, D)."""
        b = self.batch_size
        out = np.empty((n_total, self.dim), np.float32)
        pending: list[tuple[int, int, Any]] = []  # (start, n, device array) not yet copied back
        start = 0
        bar = _tqdm(-(-n_total // b), self.progress if progress is None else progress, desc)

        def drain(keep: int):
            # Copy finished batches to host, leaving ``keep`` in flight so the host prepares the
            # next batch while the device computes (jax dispatch is asynchronous).
            while len(pending) > keep:
                s, n, y = pending.pop(0)
                out[s:s + n] = np.asarray(y)[:n]
                bar.update(1)

        with bar:
            for chunk in chunks:
                n = len(chunk)
                if n < b:
                    pad = np.zeros((b - n, *self.input_shape), np.float32)
                    chunk = np.concatenate([chunk, pad], axis=0)
                pending.append((start, n, self._encode(self.params, jax.device_put(chunk, self._batch_sharding))))
                start += n
                drain(keep=1)
            drain(keep=0)
        if start != n_total:  # an iterator yielded fewer/more images than announced
            raise RuntimeError(f"{desc}: embedded {start} images, expected {n_total}")
        return out

    def embed(self, images: Any, *, progress: bool | None = None) -> np.ndarray:
        """Embed crops.

        Args:
          images: numpy (N, H, W) / (N, H, W, C) of any real numeric dtype (cast to float32, not
            rescaled), or the path of a crop dataset directory (rows come back in dataset order).
            Crops to be put into the model's pose may be any square size (their nuclei are oriented
            into the model's input size, magnified by the pose's scale: the pixel size of the
            pretraining crops is assumed); otherwise they must have the model's input size.
          progress: override the instance's progress-bar setting.

        Returns:
          float32 (N, D) embeddings, D = encoder width.
        """
        if isinstance(images, (str, os.PathLike)):
            return self.embed_dataset(images, progress=progress)[0]
        x = np.asarray(images)
        sized = not self.orient  # crops to be oriented are placed into the model's input size, whatever theirs
        if x.ndim in (3, 4) and len(x) == 0:
            self.check_images(x[:0], check_size=sized)  # still reject a wrong shape for an empty input
            return np.zeros((0, self.dim), np.float32)
        self.check_images(x[:1], check_size=sized)  # shape/dtype errors before any work
        if np.issubdtype(x.dtype, np.floating):  # report every bad image, not just a batch's
            finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise EmbedInputError(f"images: {bad.size} image(s) contain NaN or Inf, e.g. index "
                                      f"{bad[:5].tolist()}")
        b = self.batch_size

        def chunks() -> Iterator[np.ndarray]:
            for s in range(0, len(x), b):
                yield self._pose(self.check_images(x[s:s + b], offset=s, check_size=sized),
                                 lambda i, s=s: f"images: index {s + i}", self.orient_scale if self.orient else None)

        return self._run(chunks(), len(x), "embed", progress)

    def embed_dataset(self, data_dir: str, *, progress: bool | None = None) -> tuple[np.ndarray, list[str]]:
        """Embed every crop of a crop dataset directory, in dataset order.

        Args:
          data_dir: directory with ``manifest*.json`` + ArrayRecord shards.
          progress: override the instance's progress-bar setting.

        Returns:
          (float32 (N, D) embeddings, list of N cell_ids in the same order).
        """
        data_dir = os.fspath(data_dir)
        src = CropSource(data_dir)
        n = len(src)
        if n == 0:
            return np.zeros((0, self.dim), np.float32), []
        # magnified per dataset, as the analysis's oriented copy: the same cells give the same embedding;
        # crops still to be oriented may have another size (oriented into the model's)
        scale = scale_into(self._into, data_dir, self.input_shape[0])
        where = f"crop dataset {data_dir}"
        # Shape errors before any work, naming the dataset (the loader would fail inside grain).
        h, w, c = src.image_shape
        self.check_images(np.zeros((1, h, w, c), np.float32), where=where, check_size=scale is None)
        ids: list[str] = []

        def chunks() -> Iterator[np.ndarray]:
            for batch in make_eval_iterator(src, self.batch_size):
                batch_ids = [str(c) for c in batch["cell_id"]]
                try:
                    x = self.check_images(batch["image"], offset=int(batch["index"][0]), where=where,
                                          check_size=scale is None)
                except EmbedInputError as e:
                    bad = [c for c, img in zip(batch_ids, batch["image"]) if not np.isfinite(img).all()]
                    raise EmbedInputError(f"{e}; cell_id(s) {bad[:5]}" if bad else str(e)) from e
                ids.extend(batch_ids)
                yield self._pose(x, lambda i: f"{where}: cell {batch_ids[i]}", scale)

        emb = self._run(chunks(), n, f"embed {os.path.basename(data_dir.rstrip('/'))}", progress)
        return emb, ids

    # ------------------------------------------------------------------ AnnData
    def embed_anndata(
        self,
        adata: Any,
        crops: Any,
        key: str = "X_cosmic",
        *,
        cell_ids: Sequence[str] | None = None,
        id_key: str | None = None,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Write ``adata.obsm[key]`` (N_obs, D) in AnnData row order, matched by cell_id.

        Args:
          adata: an AnnData; its cell ids are ``adata.obs[id_key]`` if given, else
            ``adata.obs["cell_id"]`` if that column exists, else ``adata.obs_names``.
          crops: a crop dataset directory, an ``(images, cell_ids)`` pair, or an image array
            together with ``cell_ids=``. Crops may be in any order, but must hold exactly the
            AnnData's cells: missing, extra or duplicate ids raise an error listing examples.
          key: obsm key; metadata goes to ``adata.uns[key + "_meta"]``.
          cell_ids: ids of the rows of an image array ``crops``.
          id_key: obs column holding the cell ids.
          progress: override the progress-bar setting.

        Returns:
          The (N_obs, D) float32 embeddings, as written to ``adata.obsm[key]``.
        """
        if isinstance(crops, (str, os.PathLike)):
            if cell_ids is not None:
                raise ValueError("cell_ids= is only for image arrays; a crop dataset carries its own ids")
            what = f"crop dataset {os.fspath(crops)}"
            # ids first (a cheap read): a mismatch fails before the expensive forward passes
            crop_ids = CropSource(os.fspath(crops)).cell_ids()
            order = match_ids(cell_ids_of(adata, id_key), crop_ids, what)
            emb, got = self.embed_dataset(crops, progress=progress)
            if got != crop_ids:
                raise RuntimeError(f"{what}: cell_ids changed while embedding (dataset rewritten?)")
        else:
            if isinstance(crops, tuple) and len(crops) == 2 and cell_ids is None:
                crops, cell_ids = crops
            if cell_ids is None:
                raise ValueError("an image array needs its cell ids: pass crops=(images, ids) or cell_ids=")
            crop_ids = [str(c) for c in cell_ids]
            if len(crop_ids) != len(crops):
                raise ValueError(f"{len(crops)} images but {len(crop_ids)} cell_ids")
            order = match_ids(cell_ids_of(adata, id_key), crop_ids, "crops")
            emb = self.embed(crops, progress=progress)
        out = np.ascontiguousarray(emb[order])
        adata.obsm[key] = out
        adata.uns[key + "_meta"] = self.metadata()
        return out


def default_layers(depth: int) -> tuple[int, ...]:
    """The blocks read by default: a middle one and the last (both blocks of a 2-block encoder)."""
    return tuple(sorted({(depth - 1) // 2, depth - 1}))


def parse_layers(spec: str | int | None) -> int | tuple[int, ...] | str | None:
    """A config's ``layer`` field -> Embedder ``layer``: "default" / "" -> None (default_layers),
    "all" -> "all", "-1" -> -1, "0,3" -> (0, 3).

    Raises:
      ValueError naming the bad value.
    """
    if spec is None or isinstance(spec, int):
        return spec
    spec = str(spec).strip()
    if spec in ("", "default"):
        return None
    if spec == "all":
        return "all"
    try:
        parts = [int(p) for p in spec.split(",")]
    except ValueError:
        raise ValueError(f"layer={spec!r}: use 'default', 'all', an int or comma-separated ints") from None
    return parts[0] if len(parts) == 1 else tuple(parts)
