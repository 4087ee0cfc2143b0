"""Crop datasets on disk: ArrayRecord shards of compact pixel records plus a JSON manifest.

A crop dataset is a directory holding one or more manifests (``manifest*.json``) and the
``*.array_record`` shards they list. Several manifests exist when independent jobs built
disjoint parts (``cosmic data nuclei --shard i/n``); readers take the union in a stable order.

Format version 2 (written by :func:`write_shards`). A shard of ``n`` crops holds ``n`` pixel
records followed by ``ceil(n / META_BLOCK)`` metadata records:

- pixel record ``i`` (one crop, fixed length for the whole dataset): for quantised float crops
  ``scale`` and ``offset`` (float32, one per channel) then the pixels, C order, little-endian.
  One crop per record because training reads single crops at random (a global per-crop
  shuffle): a packed block would have to be read whole for each crop it serves.
- metadata record ``j``: msgpack ``{"cell_ids": [...], "meta": [...]}`` of crops
  ``[j * META_BLOCK, (j + 1) * META_BLOCK)``, so ids and metadata are read in blocks and never
  when only pixels are needed.

Pixels are stored compactly:

- integer (and bool) crops keep their dtype: lossless, reads return that dtype;
- float crops are quantised per crop and channel to ``uint16`` (default) or ``uint8``:
  ``x ~= q * scale + offset`` with ``offset = min``, ``scale = (max - min) / qmax``, so the
  absolute error is at most ``(max - min) / (2 * qmax)`` plus float32 rounding
  (``uint16``: 7.6e-6 of the crop's range; ``uint8``: 2.0e-3), and a crop's minimum (e.g. a zero
  background) is exact. ``float_storage="float32"`` keeps floats exactly (4 bytes per value).

ArrayRecord chunks are zstd-compressed (the writer default), which shrinks masked crops further.

Format version 1 (earlier releases: one msgpack :func:`encode_record` record per crop, float32)
stays readable through the same API, at about the old speed; :func:`repack` converts it.

Per-crop records from producers (builders, tests) are :func:`encode_record` bytes: the
interchange format that :func:`write_shards` consumes.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import os
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import msgpack
import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # manifest "version" written by write_shards
READABLE_VERSIONS = (1, 2)
CROP_RECORD_VERSION = 1  # encode_record's msgpack layout (also the version-1 on-disk record)
MANIFEST_FORMAT = "cosmic-crops"
MANIFEST_GLOB = "manifest*.json"
FLOAT_STORAGE = ("uint16", "uint8", "float32")
META_BLOCK = 256  # crops per metadata record
# One record per chunk: single crops are read at random without decoding their neighbours.
_WRITER_OPTIONS = "group_size:1"
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access


class RecordError(ValueError):
    """A crop record, shard or manifest is malformed; the message names the file and record."""


def encode_record(image: np.ndarray, cell_id: str, meta: dict[str, Any] | None = None) -> bytes:
    """Serialise one crop (H, W, C) with its id and metadata (exact; input of :func:`write_shards`)."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise RecordError(f"record {cell_id!r}: image must be (H, W, C), got shape {image.shape}")
    if image.dtype.kind == "f" and not np.all(np.isfinite(image)):
        raise RecordError(f"record {cell_id!r}: image has NaN or Inf values")
    payload = {
        "v": CROP_RECORD_VERSION,
        "image": np.ascontiguousarray(image).tobytes(),
        "shape": list(image.shape),
        "dtype": image.dtype.str,
        "cell_id": str(cell_id),
        "meta": _jsonable(meta or {}),
    }
    return msgpack.packb(payload, use_bin_type=True)


def decode_record(data: bytes, where: str = "<bytes>") -> dict[str, Any]:
    """Inverse of :func:`encode_record`; ``where`` names the shard/record in errors."""
    try:
        rec = msgpack.unpackb(data, raw=False)
        if not isinstance(rec, dict) or rec.get("v") != CROP_RECORD_VERSION:
            version = rec.get("v") if isinstance(rec, dict) else None
            raise RecordError(f"{where}: unsupported crop record version {version!r}")
        shape = tuple(rec["shape"])
        image = np.frombuffer(rec["image"], dtype=np.dtype(rec["dtype"])).reshape(shape)
    except RecordError:
        raise
    except Exception as e:  # msgpack/numpy errors carry no location; add it
        raise RecordError(f"{where}: cannot decode crop record ({type(e).__name__}: {e})") from e
    return {"image": image, "cell_id": rec["cell_id"], "meta": rec.get("meta", {})}


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in meta.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[str(k)] = v
    return out


@dataclasses.dataclass(frozen=True)
class PixelCodec:
    """Fixed-length pixel records of one dataset (see the module docstring).

    Attributes:
      shape: (H, W, C) of every crop.
      dtype: what reads return (numpy dtype string): the source's integer dtype, or float32.
      stored: the dtype on disk (little-endian dtype string).
    """

    shape: tuple[int, int, int]
    dtype: str
    stored: str

    @classmethod
    def for_image(cls, image: np.ndarray, float_storage: str = "uint16") -> "PixelCodec":
        """The codec for a dataset whose first crop is ``image``."""
        if float_storage not in FLOAT_STORAGE:
            raise ValueError(f"float_storage must be one of {FLOAT_STORAGE}, got {float_storage!r}")
        kind = image.dtype.kind
        if kind in "biu":
            dt = image.dtype.newbyteorder("<") if image.dtype.byteorder == ">" else image.dtype
            return cls(tuple(image.shape), np.dtype(dt).name, np.dtype(dt).str)
        if kind != "f":
            raise RecordError(f"crop dtype {image.dtype} is neither integer nor float")
        return cls(tuple(image.shape), "float32", np.dtype(float_storage).newbyteorder("<").str)

    @functools.cached_property
    def quantized(self) -> bool:
        return np.dtype(self.dtype).kind == "f" and np.dtype(self.stored).kind == "u"

    @functools.cached_property
    def header_bytes(self) -> int:
        return 8 * self.shape[2] if self.quantized else 0  # float32 scale + offset per channel

    @functools.cached_property
    def record_bytes(self) -> int:
        return self.header_bytes + int(np.prod(self.shape)) * np.dtype(self.stored).itemsize

    def check(self, image: np.ndarray, where: str) -> None:
        """A later crop must match the dataset's shape and dtype family."""
        if tuple(image.shape) != self.shape:
            raise RecordError(f"{where}: crop shape {tuple(image.shape)} differs from the dataset's {self.shape}")
        same = image.dtype.kind == "f" if np.dtype(self.dtype).kind == "f" else image.dtype.name == self.dtype
        if not same:
            raise RecordError(f"{where}: crop dtype {image.dtype} differs from the dataset's {self.dtype}")

    def encode(self, image: np.ndarray) -> bytes:
        stored = np.dtype(self.stored)
        if not self.quantized:
            return np.ascontiguousarray(image, dtype=stored).tobytes()
        x = np.asarray(image, np.float64)
        lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
        qmax = np.iinfo(stored).max
        offset = lo.astype(np.float32)
        scale = ((hi - lo) / qmax).astype(np.float32)
        step = np.where(scale > 0, scale, 1.0).astype(np.float64)
        q = np.clip(np.rint((x - offset) / step), 0, qmax).astype(stored)
        return scale.astype("<f4").tobytes() + offset.astype("<f4").tobytes() + q.tobytes()

    def split(self, buf: bytes, n: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``n`` concatenated pixel records -> views ``(pixels (n, H, W, C) as stored, scale (n, C),
        offset (n, C))``; scale and offset are None where pixels are not quantised."""
        rows = np.frombuffer(buf, np.uint8).reshape(n, self.record_bytes)
        h = self.header_bytes
        pixels = rows[:, h:].view(np.dtype(self.stored)).reshape(n, *self.shape)
        if not self.quantized:
            return pixels, None, None
        c = self.shape[2]
        return pixels, rows[:, : 4 * c].view("<f4"), rows[:, 4 * c : h].view("<f4")

    def decode(self, buf: bytes, n: int, dtype: Any = None) -> np.ndarray:
        """``n`` concatenated pixel records -> (n, H, W, C) array of ``dtype`` (default: ``self.dtype``)."""
        return to_values(*self.split(buf, n), dtype=self.dtype if dtype is None else dtype)


def to_values(pixels: np.ndarray, scale: np.ndarray | None = None, offset: np.ndarray | None = None,
              dtype: Any = np.float32) -> np.ndarray:
    """Stored pixels (n, H, W, C) -> a fresh array of ``dtype``: ``pixels * scale + offset`` per crop
    and channel (scale, offset: (n, C)) for quantised crops, a plain conversion otherwise.

    The one definition of dequantisation, so that crops decoded in the reading process and crops
    decoded after a transfer between processes (``CropSource.read_stored``) are bit-identical.
    """
    dtype = np.dtype(dtype)
    if scale is None:
        return pixels.astype(dtype)  # a fresh, writable array
    out = np.multiply(pixels, scale[:, None, None, :], dtype=dtype)  # convert and scale in one pass
    out += offset[:, None, None, :]
    return out


def _encode_meta_block(items: Sequence[tuple[str, dict[str, Any]]]) -> bytes:
    return msgpack.packb({"cell_ids": [c for c, _ in items], "meta": [m for _, m in items]}, use_bin_type=True)


def write_shards(
    records: Iterable[bytes],
    out_dir: str,
    prefix: str = "crops",
    records_per_shard: int = 4096,
    manifest_name: str = "manifest.json",
    extra: dict[str, Any] | None = None,
    float_storage: str = "uint16",
) -> dict[str, Any]:
    """Stream :func:`encode_record` records into format-2 ArrayRecord shards and write the manifest.

    Memory stays bounded by one shard's metadata: shards are opened and closed as they fill.
    Every crop must have the first crop's shape and dtype (integer dtypes exactly).

    Args:
      records: :func:`encode_record` outputs, in dataset order.
      out_dir: dataset directory (created).
      prefix: shard file names are ``<prefix>-NNNNN.array_record``.
      records_per_shard: crops per shard file.
      manifest_name: manifest file name inside ``out_dir``.
      extra: more top-level manifest entries (may be filled while ``records`` is consumed).
      float_storage: how float crops are stored: ``"uint16"`` / ``"uint8"`` (quantised per crop,
        see the module docstring) or ``"float32"`` (exact). Integer crops are always lossless.

    Returns:
      The manifest dict (also written to ``out_dir/manifest_name``).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if float_storage not in FLOAT_STORAGE:
        raise ValueError(f"float_storage must be one of {FLOAT_STORAGE}, got {float_storage!r}")
    os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, Any]] = []
    codec: PixelCodec | None = None
    writer, metas, total = None, [], 0

    def close_shard():
        for s in range(0, len(metas), META_BLOCK):
            writer.write(_encode_meta_block(metas[s : s + META_BLOCK]))
        writer.close()
        shards[-1]["num_records"] = len(metas)
        shards[-1]["bytes"] = os.path.getsize(os.path.join(out_dir, shards[-1]["file"]))

    for rec in records:
        crop = decode_record(rec, f"{out_dir}: input record {total}")
        image = crop["image"]
        if codec is None:
            codec = PixelCodec.for_image(image, float_storage)
        else:
            codec.check(image, f"{out_dir}: input record {total} ({crop['cell_id']!r})")
        if writer is None:
            name = f"{prefix}-{len(shards):05d}.array_record"
            writer = ArrayRecordWriter(os.path.join(out_dir, name), _WRITER_OPTIONS)
            shards.append({"file": name, "num_records": 0})
        writer.write(codec.encode(image))
        metas.append((crop["cell_id"], crop["meta"]))
        total += 1
        if len(metas) == records_per_shard:
            close_shard()
            writer, metas = None, []
    if writer is not None:
        close_shard()
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": FORMAT_VERSION,
        "num_records": total,
        "image_shape": list(codec.shape) if codec else None,
        "dtype": codec.dtype if codec else None,
        "storage": {
            "pixels": codec.stored if codec else None,
            "quantized": bool(codec and codec.quantized),
            "meta_block": META_BLOCK,
        },
        "bytes_per_crop": sum(s["bytes"] for s in shards) / total if total else None,
        "shards": shards,
        **(extra or {}),
    }
    with open(os.path.join(out_dir, manifest_name), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_manifests(data_dir: str) -> list[dict[str, Any]]:
    """All manifests of a dataset directory, sorted by file name; errors name the file."""
    paths = sorted(glob.glob(os.path.join(data_dir, MANIFEST_GLOB)))
    if not paths:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"crop dataset directory not found: {data_dir}")
        inner = os.path.join(data_dir, "crops")
        if glob.glob(os.path.join(inner, MANIFEST_GLOB)):  # the folder of `cosmic data synthetic|paired`
            raise RecordError(f"{data_dir}: no {MANIFEST_GLOB} here; its crop dataset is {inner}: pass that")
        raise RecordError(f"{data_dir}: no {MANIFEST_GLOB} found; is this a cosmic crop dataset?")
    out = []
    for p in paths:
        try:
            with open(p) as f:
                m = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RecordError(f"{p}: unreadable manifest ({e})") from e
        if m.get("format") != MANIFEST_FORMAT:
            raise RecordError(f"{p}: not a {MANIFEST_FORMAT} manifest (format={m.get('format')!r})")
        if m.get("version") not in READABLE_VERSIONS:
            raise RecordError(
                f"{p}: crop dataset format version {m.get('version')!r}; this cosmic_jax reads versions "
                f"{list(READABLE_VERSIONS)}: upgrade cosmic_jax, or rebuild the dataset with it"
            )
        m["_path"] = p
        out.append(m)
    filled = [m for m in out if m["num_records"]]
    for key in ("image_shape", "dtype"):
        values = {json.dumps(m[key]) for m in filled}
        if len(values) > 1:
            raise RecordError(f"{data_dir}: manifests disagree on {key}: {sorted(values)}")
    return out


def dataset_fingerprint(data_dir: str) -> str:
    """A digest that changes whenever the dataset is rewritten: its manifests and every file's name,
    size and modification time (caches of derived data key on it)."""
    h = hashlib.sha256()
    for m in read_manifests(data_dir):
        h.update(json.dumps({k: v for k, v in m.items() if k != "_path"}, sort_keys=True).encode())
    for name in sorted(os.listdir(data_dir)):
        st = os.stat(os.path.join(data_dir, name))
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class _Shard:
    path: str
    num_records: int  # crops
    version: int
    codec: PixelCodec | None  # None for version 1 (self-describing msgpack records)

    @property
    def num_meta_blocks(self) -> int:
        return math.ceil(self.num_records / META_BLOCK) if self.version >= 2 else 0


class CropSource:
    """Random and batched access to every crop of a crop dataset (also a grain data source).

    ``source[i]`` returns ``{"image": float32 (H, W, C), "index": i, "cell_id": str}`` (plus
    ``"meta"`` with ``with_meta=True``); :meth:`read_images` and :meth:`read_meta` read many
    crops per call. Readers open lazily per process and thread, so the source pickles cheaply
    into grain workers and may be read from several threads.
    """

    def __init__(self, data_dir: str, with_meta: bool = False):
        self.data_dir = data_dir
        self.with_meta = with_meta
        self.manifests = read_manifests(data_dir)
        self._shards: list[_Shard] = []
        for m in self.manifests:
            codec = None
            if m["version"] >= 2 and m["num_records"]:
                codec = PixelCodec(tuple(m["image_shape"]), m["dtype"], m["storage"]["pixels"])
            for s in m["shards"]:
                path = os.path.join(data_dir, s["file"])
                if not os.path.exists(path):
                    raise RecordError(f"{m['_path']}: lists shard {s['file']} which does not exist")
                self._shards.append(_Shard(path, int(s["num_records"]), int(m["version"]), codec))
        counts = [s.num_records for s in self._shards]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        filled = [m for m in self.manifests if m["num_records"]]
        self.image_shape = tuple(filled[0]["image_shape"]) if filled else ()
        self.dtype = np.dtype(filled[0]["dtype"]) if filled else np.dtype(np.float32)
        old = [m["_path"] for m in filled if m["version"] < FORMAT_VERSION]
        if old:
            log.warning(
                "%s: crop format version 1 (float32 msgpack per crop): readable, but large and slow to "
                "load; cosmic_jax.data.records.repack(%r, NEW_DIR) converts it", old[0], data_dir,
            )
        self._init_local()

    def _init_local(self):
        self._local = threading.local()  # per-thread readers: seek + read is stateful
        self._meta_cache: dict[tuple[int, int], dict[str, list]] = {}
        self._meta_lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_local", "_meta_cache", "_meta_lock"):
            del state[k]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_local()

    def _readers(self) -> dict[int, Any]:
        """This thread's open readers by shard number."""
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = {}
        return readers

    def _reader(self, shard: int):
        readers = self._readers()
        r = readers.get(shard)
        if r is None:
            from array_record.python.array_record_module import ArrayRecordReader

            s = self._shards[shard]
            try:
                r = ArrayRecordReader(s.path, _READER_OPTIONS)
            except Exception as e:
                raise RecordError(f"{s.path}: cannot open ArrayRecord shard ({e})") from e
            expected = s.num_records + s.num_meta_blocks
            if r.num_records() != expected:
                raise RecordError(
                    f"{s.path}: holds {r.num_records()} records but its manifest implies {expected} "
                    "(truncated or replaced shard?)"
                )
            readers[shard] = r
        return r

    @property
    def codec(self) -> PixelCodec | None:
        """The pixel codec of every non-empty shard; None where jobs stored crops differently (or
        in format 1), so ``read_stored`` may return None."""
        codecs = {s.codec for s in self._shards if s.num_records}
        return codecs.pop() if len(codecs) == 1 else None

    def stored_bytes_per_crop(self) -> int:
        """Uncompressed bytes of one crop as ``read_stored`` returns it (float32 where it falls
        back to ``read_images``); the largest over the dataset's jobs."""
        float32 = 4 * int(np.prod(self.image_shape or (0,)))
        return max((s.codec.record_bytes if s.codec else float32 for s in self._shards), default=float32)

    def verify(self) -> "CropSource":
        """Open every shard now and check its record count (errors name the shard).

        Readers otherwise open lazily on first access, so a truncated shard would only surface
        mid-training; builders and tests call this right after writing.
        """
        for shard in range(len(self._shards)):
            self._reader(shard)
        return self

    def locate(self, index: int) -> tuple[int, int]:
        """Crop ``index`` -> (shard number, crop number within that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.data_dir}: record {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return shard, int(index - self._offsets[shard])

    def _sorted(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Crop indices -> (order that sorts them, shard of each sorted index, crop number in it)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = idx[(idx < 0) | (idx >= len(self))][0]
            raise IndexError(f"{self.data_dir}: record {bad} out of range [0, {len(self)})")
        order = np.argsort(idx, kind="stable")
        shard_of = np.searchsorted(self._offsets, idx[order], side="right") - 1
        return order, shard_of, idx[order] - self._offsets[shard_of]

    def _read_raw(self, shards: Sequence[int], records: Sequence[int]) -> list[bytes]:
        """Record ``records[k]`` of shard ``shards[k]``, for every k, in this thread."""
        out, readers = [], self._readers()
        for shard, i in zip(shards, records):
            reader = readers.get(shard) or self._reader(shard)
            try:
                # seek + read runs here; read([...]) hands each record to a spinning thread
                # pool, which costs ~3x the CPU per record.
                reader.seek(i)
                out.append(reader.read())
            except Exception as e:
                raise RecordError(f"{self._shards[shard].path} record {i}: cannot read ({type(e).__name__}: {e})") from e
        return out

    def _joined(self, codec: PixelCodec, raw: list[bytes], shards, records) -> bytes:
        buf = b"".join(raw)
        if len(buf) != len(raw) * codec.record_bytes:
            k = next(k for k, r in enumerate(raw) if len(r) != codec.record_bytes)
            raise RecordError(
                f"{self._shards[shards[k]].path} record {records[k]}: cannot decode crop pixels ({len(raw[k])} "
                f"bytes, expected {codec.record_bytes} for {codec.shape} {codec.stored}); corrupt shard?"
            )
        return buf

    def _decode(self, codec: PixelCodec, raw: list[bytes], shards, records, dtype) -> np.ndarray:
        return codec.decode(self._joined(codec, raw, shards, records), len(raw), dtype)

    def read_stored(self, indices) -> dict[str, np.ndarray] | None:
        """Crops ``indices`` (any order, repeats allowed) as stored, not yet converted to values.

        Returns ``{"pixels": (n, H, W, C) in the stored dtype}``, plus ``"scale"`` and ``"offset"``
        (float32, (n, C)) for quantised crops, in the order of ``indices``; ``to_values(**result)``
        then equals ``read_images(indices)`` exactly. ``None`` where the crops do not share one
        pixel codec (format-1 shards, or jobs that stored floats differently): use
        ``read_images``. For moving batches between processes: stored pixels are 2-4x smaller
        than float32.
        """
        order, shard_of, local = self._sorted(indices)
        codecs = {self._shards[s].codec for s in np.unique(shard_of).tolist()}
        if len(codecs) != 1 or None in codecs:
            return None
        codec = codecs.pop()
        shards, records = shard_of.tolist(), local.tolist()
        raw = self._read_raw(shards, records)
        parts = codec.split(self._joined(codec, raw, shards, records), len(raw))
        out = {}
        for name, part in zip(("pixels", "scale", "offset"), parts):
            if part is not None:
                out[name] = np.empty(part.shape, part.dtype)
                out[name][order] = part
        return out

    def read_images(self, indices, dtype: Any = np.float32) -> np.ndarray:
        """Crops ``indices`` (any order, repeats allowed) -> (n, H, W, C) array of ``dtype``.

        Records are fetched in sorted order and decoded together (one numpy pass for the whole
        batch, whatever the number of shards it spans).
        """
        order, shard_of, local = self._sorted(indices)
        shards, records = shard_of.tolist(), local.tolist()
        raw = self._read_raw(shards, records)
        out = np.empty((len(raw), *self.image_shape), dtype)
        touched = np.unique(shard_of).tolist()
        codecs = {self._shards[s].codec for s in touched}
        if len(codecs) == 1 and None not in codecs:
            out[order] = self._decode(codecs.pop(), raw, shards, records, dtype)
            return out
        for s in touched:  # format-1 shards, or jobs that stored floats differently
            at = np.flatnonzero(shard_of == s)
            part = [raw[k] for k in at]
            codec, path = self._shards[s].codec, self._shards[s].path
            if codec is None:
                images = [decode_record(r, f"{path} record {records[k]}")["image"] for r, k in zip(part, at)]
                out[order[at]] = np.stack(images)
            else:
                out[order[at]] = self._decode(codec, part, [s] * len(at), [records[k] for k in at], dtype)
        return out

    def _meta_block(self, shard: int, block: int) -> dict[str, list]:
        key = (shard, block)
        hit = self._meta_cache.get(key)
        if hit is not None:
            return hit
        s = self._shards[shard]
        (raw,) = self._read_raw([shard], [s.num_records + block])
        try:
            value = msgpack.unpackb(raw, raw=False)
            n = min(META_BLOCK, s.num_records - block * META_BLOCK)
            if len(value["cell_ids"]) != n or len(value["meta"]) != n:
                raise ValueError(f"holds {len(value['cell_ids'])} ids, expected {n}")
        except Exception as e:
            raise RecordError(
                f"{s.path} record {s.num_records + block}: cannot decode metadata block ({type(e).__name__}: {e})"
            ) from e
        with self._meta_lock:  # small cache: sequential reads decode each block once
            if len(self._meta_cache) >= 16:
                self._meta_cache.pop(next(iter(self._meta_cache)))
            self._meta_cache[key] = value
        return value

    def read_meta(self, indices) -> tuple[list[str], list[dict[str, Any]]]:
        """(cell_ids, metadata dicts) of crops ``indices``, in that order."""
        order, shard_of, local = self._sorted(indices)
        ids: list[Any] = [None] * len(order)
        metas: list[Any] = [None] * len(order)
        for p, shard, i in zip(order.tolist(), shard_of.tolist(), local.tolist()):
            s = self._shards[shard]
            if s.codec is None:
                (raw,) = self._read_raw([shard], [i])
                rec = decode_record(raw, f"{s.path} record {i}")
                ids[p], metas[p] = rec["cell_id"], rec["meta"]
            else:
                block = self._meta_block(shard, i // META_BLOCK)
                ids[p], metas[p] = block["cell_ids"][i % META_BLOCK], block["meta"][i % META_BLOCK]
        return ids, metas

    def read(self, index: int) -> dict[str, Any]:
        """One crop as stored: ``{"image": (H, W, C) in the dataset dtype, "cell_id", "meta"}``."""
        image = self.read_images([index], self.dtype)[0]
        (cell_id,), (meta,) = self.read_meta([index])
        return {"image": image, "cell_id": cell_id, "meta": meta}

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        self.locate(index)
        (cell_id,), (meta,) = self.read_meta([index])
        out = {"image": self.read_images([index])[0], "index": np.int64(index), "cell_id": cell_id}
        if self.with_meta:
            out["meta"] = meta
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def cell_ids(self) -> list[str]:
        """Every crop's cell_id in dataset order (format 2: reads only the metadata blocks)."""
        out: list[str] = []
        for shard, s in enumerate(self._shards):
            if s.codec is None:
                out += self.read_meta(np.arange(s.num_records) + self._offsets[shard])[0]
            else:
                for block in range(s.num_meta_blocks):
                    out += self._meta_block(shard, block)["cell_ids"]
        return out


def repack(src_dir: str, out_dir: str, float_storage: str = "uint16", records_per_shard: int = 4096,
           chunk: int = 1024) -> dict[str, Any]:
    """Rewrite a crop dataset (e.g. format 1) as format 2 in ``out_dir``; the source is left as is.

    Crops, order, cell_ids and metadata are kept; float pixels are stored per ``float_storage``.
    Builder side files (``metadata.csv``) are not copied.
    """
    if glob.glob(os.path.join(out_dir, MANIFEST_GLOB)):
        raise FileExistsError(f"{out_dir}: already holds a crop dataset; repack into an empty folder")
    src = CropSource(src_dir)
    return write_shards(source_records(src, chunk=chunk), out_dir, records_per_shard=records_per_shard,
                        float_storage=float_storage, extra={"repacked_from": os.path.abspath(src_dir)})


def source_records(src: CropSource, transform: Callable[[np.ndarray, list[str]], np.ndarray] | None = None,
                   dtype: Any = None, chunk: int = 1024, progress: Callable[[int, int], None] | None = None
                   ) -> Iterator[bytes]:
    """A dataset's crops as :func:`encode_record` records, in order, read ``chunk`` at a time (for
    rewriting it): cell ids and metadata kept, pixels as ``dtype`` (default the stored dtype) passed
    through ``transform(images, cell_ids)`` if given; ``progress(done, total)`` after every chunk."""
    for start in range(0, len(src), chunk):
        ids = np.arange(start, min(start + chunk, len(src)))
        images = src.read_images(ids, dtype or src.dtype)
        cell_ids, metas = src.read_meta(ids)
        if transform is not None:
            images = transform(images, cell_ids)
        for image, cell_id, meta in zip(images, cell_ids, metas):
            yield encode_record(image, cell_id, meta)
        if progress:
            progress(start + len(ids), len(src))
