"""Grain input pipelines over crop datasets: a checkpointable training stream and an eval pass.

Training stream (:func:`make_train_iterator`), built from grain ``MapDataset`` index
transformations so every element is a pure function of its global position ``p``:

    p -> epoch = p // N, record = shuffle_{seed, epoch}(p mod N)     (global, reshuffled per epoch)
      -> process slice p = process_index (mod process_count)         (strided, see below)
      -> read + augment with rng(seed, record, epoch)                (deterministic per example)
      -> batch of global_batch // process_count                      (batches may span epochs)
      -> threads / worker processes (order preserved)

Strided slicing means that process i's k-th batch holds global positions
``[k * B, (k + 1) * B)`` with ``p = i (mod P)``: the union over processes of step k is exactly
the single-process global batch k, and each process sees a disjoint 1/P of every epoch.
Nothing depends on the number of local devices, worker processes or threads, so a checkpoint
written on 8 devices resumes bit-identically on 1 (same seed and global batch).

The iterator's state is ``{"next_batch": k, ...}`` plus the settings that define the stream
(checked on restore), via ``get_state``/``set_state`` or ``grain.checkpoint.CheckpointSave``/
``CheckpointRestore`` inside an orbax ``Composite``. Because batch k is global step k on every
process, a state also restores under a different worker count or process count.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from cosmic_jax.data.augment import AugmentConfig, augment_image, element_rng


@dataclasses.dataclass
class LoaderConfig:
    """Training input pipeline settings (all optional).

    Attributes:
      global_batch: examples per step summed over all processes.
      seed: drives the shuffle order and the augmentations.
      shuffle: global shuffle, different every epoch.
      num_epochs: passes over the data; None repeats forever.
      worker_count: grain worker processes (0 = in-process, with ``read_threads`` threads).
      worker_buffer_size: batches each worker process keeps ready.
      prefetch: batches buffered by the in-process reader threads.
      read_threads: threads assembling batches in each reading process.
      drop_remainder: drop the final partial batch of a finite stream (keep True for training:
        every step must see the same batch shape).
      augment: random augmentations of training crops.
    """

    global_batch: int = 128
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 2
    prefetch: int = 4
    read_threads: int = 2
    drop_remainder: bool = True
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


def open_source(data_dir_or_source: Any):
    """A crop dataset directory path -> ``CropSource``; any other object is used as the source.

    Args:
      data_dir_or_source: path of a crop dataset, or a random-access source whose items are
        ``{"image": (H, W, C), "index": int, "cell_id": str}``.

    Returns:
      ``(source, name)`` where ``name`` identifies the dataset in error messages.
    """
    if isinstance(data_dir_or_source, (str, os.PathLike)):
        from cosmic_jax.data.records import CropSource

        path = os.fspath(data_dir_or_source)
        return CropSource(path), path
    source = data_dir_or_source
    return source, getattr(source, "data_dir", type(source).__name__)


def _ensure_absl_flags_parsed() -> None:
    # grain reads absl flags (also in spawned workers); our CLI uses argparse, so nobody
    # parses them and grain would raise UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _shuffle_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed + e; hashing the user seed first keeps run seed s,
    # epoch 1 from replaying run seed s + 1, epoch 0.
    return int(np.random.SeedSequence(int(seed)).generate_state(1, dtype=np.uint32)[0])


class _TagPosition:
    """(global position p, record) -> (record, epoch). Picklable for worker processes."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def __call__(self, position: int, record: int) -> tuple[int, int]:
        return int(record), int(position) // self.num_records


class _ReadAugment:
    """(record, epoch) -> {"image": float32 (H, W, C), "index": int64}, augmented.

    Lives at module level so grain can send it to spawned worker processes; the source
    pickles without its open file handles (see ``CropSource.__getstate__``).
    """

    def __init__(self, source, augment: AugmentConfig, seed: int):
        self.source, self.augment, self.seed = source, augment, int(seed)

    def __call__(self, tagged: tuple[int, int]) -> dict[str, np.ndarray]:
        record, epoch = tagged
        element = self.source[record]
        image = np.asarray(element["image"], dtype=np.float32)
        if self.augment.enabled:
            image = augment_image(image, self.augment, element_rng(self.seed, record, epoch))
        return {"image": image, "index": np.int64(element.get("index", record))}


class _EvalElement:
    """Source element -> {"image", "index", "cell_id"} (drops optional extras like meta)."""

    def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
        return {
            "image": np.asarray(element["image"], dtype=np.float32),
            "index": np.int64(element["index"]),
            "cell_id": str(element["cell_id"]),
        }


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"invalid process layout: process_index={process_index}, process_count={process_count}")
    return int(process_index), int(process_count)


def _read_options(read_threads: int, prefetch: int):
    import grain

    return grain.ReadOptions(num_threads=max(int(read_threads), 0), prefetch_buffer_size=max(int(prefetch), 0))


def _batch_iterator_class():
    """Defined lazily so importing this module does not import grain (and with it jax)."""
    global _BatchIterator
    if _BatchIterator is not None:
        return _BatchIterator
    import grain

    class BatchIterator(grain.DatasetIterator):
        """Iterator over a batched ``MapDataset`` whose state is just the next batch number.

        Batching happens before ``to_iter_dataset`` on purpose: grain hands each worker
        whole batches (worker w gets batches w, w + W, ...), so the output does not depend on
        worker_count, and the batch number alone pins the stream position. ``set_state``
        rebuilds the pipeline from ``ds[next_batch:]``, so a state saved with 0 workers
        restores with 4 (grain's own nested worker states would not), and because batch k is
        global step k on every process, also under a different process count.
        """

        def __init__(self, ds, read_options, worker_count: int, worker_buffer_size: int, identity: dict):
            super().__init__()
            self._ds, self._read_options = ds, read_options
            self._workers, self._worker_buffer = int(worker_count), max(int(worker_buffer_size), 1)
            self._identity = identity
            self._next_batch = 0
            self._inner = None

        def _build(self):
            it_ds = self._ds[self._next_batch :].to_iter_dataset(self._read_options)
            if self._workers > 0:
                it_ds = it_ds.mp_prefetch(
                    grain.MultiprocessingOptions(num_workers=self._workers, per_worker_buffer_size=self._worker_buffer)
                )
            self._inner = iter(it_ds)

        def __next__(self):
            self._assert_not_closed()
            if self._inner is None:
                self._build()
            batch = next(self._inner)
            self._next_batch += 1
            return batch

        def get_state(self) -> dict[str, Any]:
            return {"next_batch": self._next_batch, **self._identity}

        def set_state(self, state: dict[str, Any]) -> None:
            changed = {
                k: (state.get(k), v) for k, v in self._identity.items() if k in state and state[k] != v
            }
            if changed:
                # Same batch number, different stream: resuming would silently train on
                # a different sequence of examples.
                diff = ", ".join(f"{k}: saved {a!r} != now {b!r}" for k, (a, b) in changed.items())
                raise ValueError(f"data iterator state does not match this pipeline ({diff})")
            if "next_batch" not in state:
                raise ValueError(f"not a cosmic_jax loader state (no 'next_batch'): keys {sorted(state)}")
            self._close_inner()
            self._next_batch = int(state["next_batch"])

        def start_prefetch(self) -> None:
            if self._inner is None:
                self._build()
            self._inner.start_prefetch()

        def _close_inner(self):
            if self._inner is not None:
                self._inner.close()
                self._inner = None

        def close(self) -> None:
            self._close_inner()
            super().close()

        def __str__(self) -> str:
            return f"cosmic_jax.BatchIterator(next_batch={self._next_batch}, workers={self._workers})"

    _BatchIterator = BatchIterator
    return BatchIterator


_BatchIterator = None


def make_train_iterator(
    data_dir_or_source: Any,
    cfg: LoaderConfig | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """Shuffled, augmented, per-process batches of training crops (see module docstring).

    Args:
      data_dir_or_source: crop dataset directory, or a random-access source (``open_source``).
      cfg: pipeline settings; defaults to ``LoaderConfig()``.
      process_index, process_count: this process's slot; default ``jax.process_index()`` and
        ``jax.process_count()``. Simulate hosts in tests by passing both.

    Returns:
      A grain ``DatasetIterator`` (``get_state()``/``set_state()`` with a small JSON state;
      ``close()`` to stop worker processes) yielding
      ``{"image": float32 (b, H, W, C), "index": int64 (b,)}`` with
      ``b = cfg.global_batch // process_count``. It ends after ``cfg.num_epochs`` epochs
      (never when None).
    """
    import grain

    cfg = cfg or LoaderConfig()
    _ensure_absl_flags_parsed()
    source, name = open_source(data_dir_or_source)
    n = len(source)
    pi, pc = _process_layout(process_index, process_count)
    B = int(cfg.global_batch)
    if n == 0:
        raise ValueError(f"{name}: crop dataset is empty (0 records); nothing to train on")
    if B <= 0:
        raise ValueError(f"LoaderConfig.global_batch must be positive, got {B}")
    if B % pc:
        raise ValueError(f"global_batch={B} is not divisible by process_count={pc}")
    if cfg.drop_remainder and B > n:
        raise ValueError(
            f"{name}: global_batch={B} is larger than the dataset ({n} records) with drop_remainder=True; "
            "every batch would repeat examples. Use a smaller batch or more data."
        )
    if cfg.worker_count < 0:
        raise ValueError(f"LoaderConfig.worker_count must be >= 0, got {cfg.worker_count}")
    if cfg.num_epochs is not None and cfg.num_epochs <= 0:
        raise ValueError(f"LoaderConfig.num_epochs must be positive or None, got {cfg.num_epochs}")
    shape = tuple(getattr(source, "image_shape", ()) or ())
    if cfg.augment.enabled and cfg.augment.rot90 and len(shape) == 3 and shape[0] != shape[1]:
        raise ValueError(f"{name}: rot90 augmentation needs square crops, dataset crops are {shape}")

    ds = grain.MapDataset.range(n)
    if cfg.shuffle:
        ds = ds.shuffle(seed=_shuffle_seed(cfg.seed))
    ds = ds.repeat(cfg.num_epochs)  # positions past n fall into later, reshuffled epochs
    ds = ds.map_with_index(_TagPosition(n))
    if cfg.num_epochs is not None and cfg.drop_remainder:
        # Cut at a global-batch boundary before slicing so all processes run the same steps.
        ds = ds[: len(ds) // B * B]
    if pc > 1:
        ds = ds[pi::pc]
    ds = ds.map(_ReadAugment(source, cfg.augment, cfg.seed))
    ds = ds.batch(B // pc, drop_remainder=cfg.drop_remainder)
    identity = {"num_records": n, "global_batch": B, "seed": int(cfg.seed), "shuffle": bool(cfg.shuffle)}
    cls = _batch_iterator_class()
    return cls(ds, _read_options(cfg.read_threads, cfg.prefetch), cfg.worker_count, cfg.worker_buffer_size, identity)


def make_eval_iterator(
    data_dir_or_source: Any,
    batch_size: int,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch: int = 4,
):
    """One ordered pass over every crop, unaugmented, keeping the last partial batch.

    Args:
      data_dir_or_source: crop dataset directory or random-access source.
      batch_size: crops per batch (the last batch holds the ``N mod batch_size`` rest).
      worker_count, read_threads, prefetch: as in :class:`LoaderConfig`.

    Returns:
      Iterator of ``{"image": float32 (b, H, W, C), "index": int64 (b,), "cell_id": str
      array (b,)}`` in dataset order; ``ceil(N / batch_size)`` batches.
    """
    import grain

    _ensure_absl_flags_parsed()
    source, name = open_source(data_dir_or_source)
    if len(source) == 0:
        raise ValueError(f"{name}: crop dataset is empty (0 records); nothing to embed")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ds = grain.MapDataset.source(source).map(_EvalElement()).batch(int(batch_size), drop_remainder=False)
    identity = {"num_records": len(source), "batch_size": int(batch_size)}
    return _batch_iterator_class()(ds, _read_options(read_threads, prefetch), worker_count, 1, identity)


def steps_per_epoch(num_records: int, global_batch: int) -> float:
    """Global steps that consume one epoch (fractional: batches may span epochs)."""
    return num_records / global_batch
