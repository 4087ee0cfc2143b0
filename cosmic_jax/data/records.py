"""Crop datasets on disk: ArrayRecord shards of msgpack records plus a JSON manifest.

A crop dataset is a directory holding one or more manifests (``manifest*.json``) and the
``*.array_record`` shards they list. Several manifests exist when independent jobs built
disjoint parts (``cosmic data nuclei --shard i/n``); readers take the union in a stable order.

Record schema (msgpack map, no pickle), version 1::

    {"v": 1, "image": <raw bytes, C order>, "shape": [H, W, C], "dtype": "float32",
     "cell_id": str, "meta": {json-able per-nucleus metadata}}
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterable, Iterator

import msgpack
import numpy as np

RECORD_VERSION = 1
MANIFEST_FORMAT = "cosmic-crops"
MANIFEST_GLOB = "manifest*.json"


class RecordError(ValueError):
    """A crop record, shard or manifest is malformed; the message names the file and record."""


def encode_record(image: np.ndarray, cell_id: str, meta: dict[str, Any] | None = None) -> bytes:
    """Serialise one crop (H, W, C) with its id and metadata."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise RecordError(f"record {cell_id!r}: image must be (H, W, C), got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise RecordError(f"record {cell_id!r}: image has NaN or Inf values")
    payload = {
        "v": RECORD_VERSION,
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
        if rec.get("v") != RECORD_VERSION:
            raise RecordError(f"{where}: unsupported record version {rec.get('v')!r}")
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


@dataclasses.dataclass
class ShardInfo:
    file: str  # relative to the dataset directory
    num_records: int


def write_shards(
    records: Iterable[bytes],
    out_dir: str,
    prefix: str = "crops",
    records_per_shard: int = 4096,
    manifest_name: str = "manifest.json",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream encoded records into ArrayRecord shards and write the manifest.

    Memory stays bounded by one record: shards are opened and closed as they fill, so a
    million-crop dataset never sits in memory. Returns the manifest dict.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(out_dir, exist_ok=True)
    shards: list[ShardInfo] = []
    writer, count, total = None, 0, 0
    image_shape, dtype = None, None
    for rec in records:
        if writer is None:
            name = f"{prefix}-{len(shards):05d}.array_record"
            # group_size:1 gives true random access per record, which global shuffling needs.
            writer = ArrayRecordWriter(os.path.join(out_dir, name), "group_size:1")
            shards.append(ShardInfo(name, 0))
        if image_shape is None:
            head = decode_record(rec, f"{prefix} record 0")
            image_shape, dtype = list(head["image"].shape), str(head["image"].dtype)
        writer.write(rec)
        count += 1
        total += 1
        if count == records_per_shard:
            writer.close()
            shards[-1].num_records, writer, count = count, None, 0
    if writer is not None:
        writer.close()
        shards[-1].num_records = count
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": RECORD_VERSION,
        "num_records": total,
        "image_shape": image_shape,
        "dtype": dtype,
        "shards": [dataclasses.asdict(s) for s in shards],
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
        m["_path"] = p
        out.append(m)
    shapes = {tuple(m["image_shape"]) for m in out if m["num_records"]}
    if len(shapes) > 1:
        raise RecordError(f"{data_dir}: manifests disagree on image shape: {sorted(shapes)}")
    return out


class CropSource:
    """Random access over every record of a crop dataset (a grain ``RandomAccessDataSource``).

    ``source[i]`` returns ``{"image": float32 (H, W, C), "index": i, "cell_id": str}``.
    Readers are opened lazily per process, so the source pickles cheaply into grain workers.
    """

    def __init__(self, data_dir: str, with_meta: bool = False):
        self.data_dir = data_dir
        self.with_meta = with_meta
        self.manifests = read_manifests(data_dir)
        self._files: list[str] = []
        counts = []
        for m in self.manifests:
            for s in m["shards"]:
                path = os.path.join(data_dir, s["file"])
                if not os.path.exists(path):
                    raise RecordError(f"{m['_path']}: lists shard {s['file']} which does not exist")
                self._files.append(path)
                counts.append(int(s["num_records"]))
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._readers: dict[int, Any] = {}
        self.image_shape = tuple(next((m["image_shape"] for m in self.manifests if m["num_records"]), ()))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state

    def _reader(self, shard: int):
        r = self._readers.get(shard)
        if r is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            try:
                r = ArrayRecordDataSource([self._files[shard]])
            except Exception as e:
                raise RecordError(f"{self._files[shard]}: cannot open ArrayRecord shard ({e})") from e
            expected = self._offsets[shard + 1] - self._offsets[shard]
            if len(r) != expected:
                raise RecordError(
                    f"{self._files[shard]}: holds {len(r)} records but its manifest says {expected} "
                    "(truncated or replaced shard?)"
                )
            self._readers[shard] = r
        return r

    def verify(self) -> "CropSource":
        """Open every shard now and check its record count (errors name the shard).

        Readers otherwise open lazily on first access, so a truncated shard would only surface
        mid-training; builders and tests call this right after writing.
        """
        for shard in range(len(self._files)):
            self._reader(shard)
        return self

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.data_dir}: record {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return shard, int(index - self._offsets[shard])

    def read(self, index: int) -> dict[str, Any]:
        shard, local = self.locate(int(index))
        where = f"{self._files[shard]} record {local}"
        try:
            data = self._reader(shard)[local]
        except RecordError:
            raise
        except Exception as e:
            raise RecordError(f"{where}: cannot read ({type(e).__name__}: {e})") from e
        return decode_record(data, where)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.read(index)
        out = {"image": rec["image"].astype(np.float32), "index": np.int64(index), "cell_id": rec["cell_id"]}
        if self.with_meta:
            out["meta"] = rec["meta"]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def cell_ids(self) -> list[str]:
        """Every record's cell_id in dataset order (reads all records; cache it for big sets)."""
        return [self.read(i)["cell_id"] for i in range(len(self))]
