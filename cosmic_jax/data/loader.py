"""Grain input pipelines over crop datasets: a checkpointable training stream and an eval pass.

Training stream (:func:`make_train_iterator`): grain ``MapDataset`` over *batch numbers*, so
every batch is a pure function of its number ``k`` and whole batches are read at once:

    k -> global positions p = k * B + process_index + process_count * j,  j < B / process_count
      -> epoch = p // N, record = perm_{seed, epoch}[p mod N]   (global per-crop permutation,
                                                                 a fresh one every epoch)
      -> CropSource.read_images(records): grouped by shard, decoded together
      -> {"image": float32 (b, H, W, C), "index": int64 (b,)}
      -> threads / worker processes (order preserved); worker processes send the stored
         integer pixels plus per-crop scale/offset and the receiving process converts them
         to float32 (bit-identical to an in-process read)

With ``device_decode`` (what ``cosmic pretrain`` uses) no process converts: batches hold the
crops as stored, ``{"pixels": uint8/uint16 (b, H, W, C), "scale", "offset": float32 (b, C),
"index"}``, and the train step makes the float32 images on the device
(``cosmic_jax.data.device_decode``).

Strided positions mean that process i's k-th batch holds global positions
``[k * B, (k + 1) * B)`` with ``p = i (mod P)``: the union over processes of step k is exactly
the single-process global batch k, and each process sees a disjoint 1/P of every epoch.
Nothing depends on the number of local devices, worker processes or threads, so a checkpoint
written on 8 devices resumes bit-identically on 1 (same seed and global batch).

The host only reads, decodes and batches: augmentation (``LoaderConfig.augment``) and MAE
masking run on the device inside the jitted train step (``cosmic_jax.train.step``).

The iterator's state is ``{"next_batch": k, ...}`` plus the settings that define the stream
(checked on restore), via ``get_state``/``set_state`` or ``grain.checkpoint.CheckpointSave``/
``CheckpointRestore`` inside an orbax ``Composite``. Because batch k is global step k on every
process, a state also restores under a different worker count or process count.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import os
import sys
import threading
from typing import Any

import numpy as np

from cosmic_jax.data.augment import AugmentConfig
from cosmic_jax.data.records import CropSource, to_values

# Identifies how positions map to records; a state saved by a loader with another mapping
# (version 1: grain's index shuffle) would resume on a different sequence of examples.
STREAM_VERSION = 2


@dataclasses.dataclass
class LoaderConfig:
    """Training input pipeline settings (all optional).

    Attributes:
      global_batch: examples per step summed over all processes.
      seed: drives the shuffle order.
      shuffle: global per-crop shuffle, different every epoch.
      num_epochs: passes over the data; None repeats forever.
      worker_count: grain worker processes (0 = in-process, with ``read_threads`` threads).
      worker_buffer_size: transfers (see ``worker_transfer_mb``) each worker process keeps ready.
      worker_transfer_mb: worker processes send whole batches in units of about this many MB
        of stored pixels (rounded to whole batches, at least one): fewer, larger transfers
        cost less CPU per crop (grain's cost per transfer is fixed).
      prefetch: batches buffered by the in-process reader threads.
      read_threads: threads assembling batches in each reading process.
      drop_remainder: drop the final partial batch of a finite stream (keep True for training:
        every step must see the same batch shape).
      augment: random augmentations of training crops, applied on the device by the train
        step (the loader itself returns crops as stored).
      device_decode: batches hold the crops as stored (``"pixels"``, ``"scale"``, ``"offset"``)
        for the train step to convert on the device, instead of float32 ``"image"`` (crops
        without one common 8- or 16-bit codec still come as ``"image"``).
    """

    global_batch: int = 128
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 2
    worker_transfer_mb: float = 4.0
    prefetch: int = 4
    read_threads: int = 2
    drop_remainder: bool = True
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    device_decode: bool = False


def open_source(data_dir_or_source: Any):
    """A crop dataset directory path -> ``CropSource``; a ``CropSource`` is used as is.

    Returns:
      ``(source, name)`` where ``name`` identifies the dataset in error messages.
    """
    if isinstance(data_dir_or_source, (str, os.PathLike)):
        path = os.fspath(data_dir_or_source)
        return CropSource(path), path
    if not isinstance(data_dir_or_source, CropSource):
        raise TypeError(f"expected a crop dataset directory or CropSource, got {type(data_dir_or_source).__name__}")
    return data_dir_or_source, data_dir_or_source.data_dir


def _ensure_absl_flags_parsed() -> None:
    # grain reads absl flags (also in spawned workers); our CLI uses argparse, so nobody
    # parses them and grain would raise UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _Batches:
    """Batch number k -> batch k: ``records(k)`` picks the crops, ``extras(rec)`` adds fields;
    ``stored``: the crops as stored (``LoaderConfig.device_decode``) instead of float32."""

    stored = False

    def records(self, k: int) -> np.ndarray:
        raise NotImplementedError

    def extras(self, rec: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        rec = self.records(int(k))
        return {**_read_crops(self.source, rec, self.stored), "index": rec, **self.extras(rec)}


def _read_crops(source: CropSource, rec: np.ndarray, stored: bool) -> dict[str, np.ndarray]:
    """Crops ``rec`` as stored (``CropSource.read_stored``) when ``stored``, else (or where they
    share no pixel codec) float32 ``"image"``."""
    crops = source.read_stored(rec) if stored else None
    return crops if crops is not None else {"image": source.read_images(rec)}


class _Transfers:
    """What grain worker processes read: element j = batches ``start + j * per`` up to
    ``start + (j + 1) * per`` (at most ``stop``), read together and sent as one unit.

    The crops travel as stored (``CropSource.read_stored``: uint16/uint8 pixels plus per-crop
    scale/offset, 2-4x smaller than float32) and :func:`_unpack_transfer` turns them into the
    batches in the receiving process. Fewer, larger transfers because every element costs grain
    a fixed ~1.4 ms of CPU over all processes (shared-memory segments, queues, bookkeeping),
    as much as reading ~50 crops. Each batch's content is still a pure function of its number.
    """

    def __init__(self, batches: _Batches, start: int, per: int, stop: int):
        self.batches, self.start, self.per, self.stop = batches, int(start), int(per), int(stop)

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.per)

    def __call__(self, j: int) -> dict[str, np.ndarray]:
        first = self.start + int(j) * self.per
        recs = [self.batches.records(k) for k in range(first, min(first + self.per, self.stop))]
        rec = np.concatenate(recs)
        crops = _read_crops(self.batches.source, rec, stored=True)  # float32 without one common codec
        sizes = np.array([len(r) for r in recs], np.int64)
        return {**crops, "index": rec, **self.batches.extras(rec), "sizes": sizes}


def _unpack_transfer(unit: dict[str, np.ndarray], convert: bool = True) -> list[dict[str, np.ndarray]]:
    """A :class:`_Transfers` element -> its batches, with float32 ``"image"`` exactly as an
    in-process read gives (one ``to_values`` conversion for all of them); ``convert=False``
    keeps the stored pixels (``device_decode``)."""
    unit = dict(unit)
    cuts = np.cumsum(unit.pop("sizes"))[:-1]
    if convert and "pixels" in unit:
        unit = {"image": to_values(unit.pop("pixels"), unit.pop("scale", None), unit.pop("offset", None)), **unit}
    parts = {key: np.split(value, cuts) for key, value in unit.items()}
    return [{key: parts[key][i] for key in unit} for i in range(len(cuts) + 1)]


class _TrainBatches(_Batches):
    """Batch number k -> this process's training batch k (see the module docstring).

    Lives at module level so grain can send it to spawned worker processes; the source
    pickles without its open readers. Each reading process computes an epoch's permutation
    once (``N`` int32/int64: 84 MB for 21M crops) and keeps the last two (a batch may straddle
    an epoch boundary).
    """

    def __init__(self, source, global_batch: int, process_index: int, process_count: int, seed: int,
                 shuffle: bool, total: int | None):
        self.source, self.n = source, len(source)
        self.global_batch, self.pi, self.pc = global_batch, process_index, process_count
        self.seed, self.shuffle, self.total = int(seed), bool(shuffle), total
        self._init_cache()

    def _init_cache(self):
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_perms"], state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def permutation(self, epoch: int) -> np.ndarray:
        """The record order of ``epoch``: a pure function of (seed, epoch)."""
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, epoch, 0x5F1E])
                perm = rng.permutation(self.n).astype(np.int32 if self.n < 2**31 else np.int64)
                self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
                self._perms[epoch] = perm
        return perm

    def records(self, k: int) -> np.ndarray:
        b = self.global_batch // self.pc
        pos = k * self.global_batch + self.pi + self.pc * np.arange(b, dtype=np.int64)
        if self.total is not None:
            pos = pos[pos < self.total]
        epoch, rec = np.divmod(pos, self.n)
        if self.shuffle:
            for e in np.unique(epoch):
                at = epoch == e
                rec[at] = self.permutation(int(e))[rec[at]]
        return rec


class _EvalBatches(_Batches):
    """Batch number k -> crops [k * b, (k + 1) * b) in dataset order, with cell_ids."""

    def __init__(self, source, batch_size: int):
        self.source, self.batch_size = source, int(batch_size)

    def records(self, k: int) -> np.ndarray:
        return np.arange(k * self.batch_size, min((k + 1) * self.batch_size, len(self.source)), dtype=np.int64)

    def extras(self, rec: np.ndarray) -> dict[str, np.ndarray]:
        cell_ids, _ = self.source.read_meta(rec)
        return {"cell_id": np.asarray(cell_ids, dtype=str)}


# Arrays below this size leave grain worker processes pickled in the queue, larger ones through
# shared memory (see BatchIterator._build).
_MIN_SHM_BYTES = 1 << 10

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _worker_init(worker_index: int, worker_count: int) -> None:
    """Runs first in each grain worker process: keep freed heap memory in the process.

    A worker frees each batch's temporaries (the joined record bytes, the decoded pixels:
    ~1-5 MB) once the batch is copied out, and glibc's default thresholds hand that memory back
    to the kernel, so the next batch faults it in again page by page: measured ~1,270 page
    faults per 128-crop batch and 33 us per crop for a decode that costs 7 us in the main
    process (which showed no such faults). Fixed thresholds keep the pages mapped (tens of MB
    at most per worker). A no-op where the C library has no ``mallopt``.
    """
    del worker_index, worker_count
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # the largest glibc accepts on 64-bit
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"invalid process layout: process_index={process_index}, process_count={process_count}")
    return int(process_index), int(process_count)


def _transfer_batches(source: CropSource, batch: int, transfer_mb: float) -> int:
    """Batches per worker transfer: about ``transfer_mb`` MB of stored pixels, at least one."""
    crop_bytes = source.stored_bytes_per_crop()
    return max(1, round(transfer_mb * 2**20 / max(batch * crop_bytes, 1)))


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
        """Iterator over a ``MapDataset`` of whole batches whose state is just the next batch number.

        Elements are batches on purpose: the batch number alone pins the stream position.
        Worker processes read units of ``transfer_batches`` consecutive batches (worker w gets
        units w, w + W, ...; see :class:`_Transfers`), which the iterator splits again, so the
        output does not depend on worker_count. ``set_state`` rebuilds the pipeline from
        ``next_batch``, so a state saved with 0 workers restores with 4 (grain's own nested
        worker states would not), and because batch k is global step k on every process, also
        under a different process count.
        """

        def __init__(self, read: "_Batches", num_batches: int, read_options, worker_count: int,
                     worker_buffer_size: int, transfer_batches: int, identity: dict):
            super().__init__()
            self._read, self._num_batches, self._read_options = read, num_batches, read_options
            self._workers, self._worker_buffer = int(worker_count), max(int(worker_buffer_size), 1)
            self._transfer_batches = max(int(transfer_batches), 1)
            self._identity = identity
            self._next_batch = 0
            self._inner = None
            self._pending: collections.deque = collections.deque()  # split from the last transfer

        def _build(self):
            if self._workers == 0:
                ds = grain.MapDataset.range(self._num_batches).map(self._read)[self._next_batch :]
                self._inner = iter(ds.to_iter_dataset(self._read_options))
                return
            units = _Transfers(self._read, self._next_batch, self._transfer_batches, self._num_batches)
            it_ds = grain.MapDataset.range(len(units)).map(units).to_iter_dataset(self._read_options)
            # Only arrays of a few hundred bytes (the batch sizes) travel pickled in the worker's
            # queue; the rest go through grain's shared memory. Pickled, a unit of several MB
            # fills the queue's 64 KiB pipe, and a worker whose queue is not drained then blocks
            # on exit until grain kills it (25 s per worker in close() and set_state()).
            small = grain.experimental.DatasetOptions(min_shm_size=_MIN_SHM_BYTES)
            it_ds = grain.experimental.WithOptionsIterDataset(it_ds, small)
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self._workers, per_worker_buffer_size=self._worker_buffer),
                worker_init_fn=_worker_init,
            )
            self._inner = iter(it_ds)

        def __next__(self):
            self._assert_not_closed()
            if not self._pending:
                if self._inner is None:
                    self._build()
                element = next(self._inner)
                self._pending.extend([element] if self._workers == 0
                                     else _unpack_transfer(element, convert=not self._read.stored))
            batch = self._pending.popleft()
            self._next_batch += 1
            return batch

        def get_state(self) -> dict[str, Any]:
            return {"next_batch": self._next_batch, **self._identity}

        def set_state(self, state: dict[str, Any]) -> None:
            saved = {"stream_version": 1, **state}  # states from before STREAM_VERSION had none
            changed = {
                k: (saved.get(k), v) for k, v in self._identity.items() if k in saved and saved[k] != v
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
            self._pending.clear()
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
    """Shuffled per-process batches of training crops (see module docstring).

    Args:
      data_dir_or_source: crop dataset directory, or a ``CropSource``.
      cfg: pipeline settings; defaults to ``LoaderConfig()``.
      process_index, process_count: this process's slot; default ``jax.process_index()`` and
        ``jax.process_count()``. Simulate hosts in tests by passing both.

    Returns:
      A grain ``DatasetIterator`` (``get_state()``/``set_state()`` with a small JSON state;
      ``close()`` to stop worker processes) yielding
      ``{"image": float32 (b, H, W, C), "index": int64 (b,)}`` (with ``cfg.device_decode`` the
      stored ``"pixels"``, ``"scale"``, ``"offset"`` instead of ``"image"``) with
      ``b = cfg.global_batch // process_count``. It ends after ``cfg.num_epochs`` epochs
      (never when None).
    """
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
    if cfg.num_epochs is None:
        num_batches, total = sys.maxsize, None
    elif cfg.drop_remainder:
        # Cut at a global-batch boundary so all processes run the same number of steps.
        num_batches = cfg.num_epochs * n // B
        total = num_batches * B
    else:
        total = cfg.num_epochs * n
        num_batches = -(-len(range(pi, total, pc)) // (B // pc))
    read = _TrainBatches(source, B, pi, pc, cfg.seed, cfg.shuffle, total)
    read.stored = _hands_over_stored(source, cfg)
    identity = {"num_records": n, "global_batch": B, "seed": int(cfg.seed), "shuffle": bool(cfg.shuffle),
                "stream_version": STREAM_VERSION}
    cls = _batch_iterator_class()
    # getattr: configs saved before this setting existed (ConfigDicts) lack it
    per = _transfer_batches(source, B // pc, getattr(cfg, "worker_transfer_mb", LoaderConfig.worker_transfer_mb))
    return cls(read, num_batches, _read_options(cfg.read_threads, cfg.prefetch), cfg.worker_count,
               cfg.worker_buffer_size, per, identity)


def _hands_over_stored(source: CropSource, cfg) -> bool:
    # getattr: configs saved before device_decode existed lack it. Every batch must have one
    # structure (one compiled step), so only where all crops share one codec; and only 8/16-bit
    # pixels, which are what saves bytes (and what jax holds without 64-bit mode).
    codec = source.codec
    return (bool(getattr(cfg, "device_decode", False)) and codec is not None
            and np.dtype(codec.stored).itemsize <= 2)


def train_batch_spec(data_dir_or_source: Any, cfg: LoaderConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """What each training batch of ``make_train_iterator(data_dir_or_source, cfg)`` holds, per crop:
    ``{name: (shape after the batch axis, dtype)}`` (to compile the train step ahead of time)."""
    source, _ = open_source(data_dir_or_source)
    spec = {"index": ((), np.dtype(np.int64))}
    codec = source.codec
    if not _hands_over_stored(source, cfg):
        return {"image": (tuple(source.image_shape), np.dtype(np.float32)), **spec}
    channels = (codec.shape[-1],)
    quantised = {"scale": (channels, np.dtype(np.float32)), "offset": (channels, np.dtype(np.float32))}
    return {"pixels": (codec.shape, np.dtype(codec.stored).newbyteorder("=")),
            **(quantised if codec.quantized else {}), **spec}


def make_eval_iterator(
    data_dir_or_source: Any,
    batch_size: int,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch: int = 4,
):
    """One ordered pass over every crop, keeping the last partial batch.

    Args:
      data_dir_or_source: crop dataset directory or ``CropSource``.
      batch_size: crops per batch (the last batch holds the ``N mod batch_size`` rest).
      worker_count, read_threads, prefetch: as in :class:`LoaderConfig`.

    Returns:
      Iterator of ``{"image": float32 (b, H, W, C), "index": int64 (b,), "cell_id": str
      array (b,)}`` in dataset order; ``ceil(N / batch_size)`` batches.
    """
    _ensure_absl_flags_parsed()
    source, name = open_source(data_dir_or_source)
    if len(source) == 0:
        raise ValueError(f"{name}: crop dataset is empty (0 records); nothing to embed")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    num_batches = -(-len(source) // batch_size)
    identity = {"num_records": len(source), "batch_size": int(batch_size)}
    per = _transfer_batches(source, batch_size, LoaderConfig.worker_transfer_mb)
    return _batch_iterator_class()(_EvalBatches(source, batch_size), num_batches, _read_options(read_threads, prefetch),
                                   worker_count, 1, per, identity)


def steps_per_epoch(num_records: int, global_batch: int) -> float:
    """Global steps that consume one epoch (fractional: batches may span epochs)."""
    return num_records / global_batch
