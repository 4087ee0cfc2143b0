"""The nuclei crop build as an Apache Beam pipeline: the ``--shard i/n`` jobs, run by a Beam runner.

    python -m data_builders.beam_pipeline --images 'plates/**/*.tif' --out crops --parts 200 \
        [--config.crop.size=96 ...configs/nuclei.py overrides, as for cosmic data nuclei] \
        [--runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner ...any Beam pipeline option]

The sorted source list is cut into ``parts`` contiguous blocks, exactly as ``cosmic data nuclei
--shard i/n`` cuts it. Each part is one Beam element; a worker builds it with
:func:`data_builders.nuclei.build_dataset` ``(shard=(i, parts))``, which runs the builder's
per-file function (:func:`data_builders.nuclei.process_image`: read, segment, crop, normalise) on
every file of the block in order and writes ``crops-<i>-of-<n>-*.array_record``,
``metadata-<i>-of-<n>-*.csv`` and, last and atomically, ``manifest-<i>-of-<n>.json``. So:

- the output is the union of the ``--shard`` jobs, which reads back as the single-job dataset,
  crop for crop (``CropSource`` takes manifests in name order);
- no crop bytes go through Beam's shuffle (only part numbers do), and a part that a runner retries
  is simply rebuilt: the builder replaces a job's files atomically and never touches other parts';
- balance comes from the number of parts: use several parts per worker (each part's time is its
  files' segmentation time), and parts big enough that shards stay few (every part writes at least
  one shard file; readers keep one open file per shard).

Workers must see ``--out`` and the sources as one POSIX file system (local disk for
DirectRunner; NFS/Lustre/GPFS, or a bucket through a FUSE mount, on a cluster), since ArrayRecord
writes local files. Runners (Beam pipeline options, passed through unchanged):

- ``--runner DirectRunner`` (default; ``--direct_num_workers N --direct_running_mode
  multi_processing`` for N local processes);
- ``--runner DataflowRunner --project P --region R --temp_location gs://... --sdk_container_image
  IMAGE`` (an image with cosmic_jax installed and the file system mounted);
- ``--runner FlinkRunner --flink_master HOST:PORT --environment_type DOCKER|PROCESS``;
- ``--runner SparkRunner --spark_master_url spark://HOST:PORT`` (or ``PortableRunner`` against a
  Spark job server).

``apache-beam`` is not a dependency of cosmic_jax (its pins conflict with the project's lock, see
notes/loader.md); this module imports it only when a pipeline is built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from cosmic_jax.configs import nuclei as nuclei_configs
from cosmic_jax.configs.overrides import load_config
from cosmic_jax.data import records
from data_builders import images as images_lib
from data_builders import nuclei
from data_builders import segment as seg_lib


class _BuildPart:
    """Part number i -> the manifest of ``nuclei.build_dataset(..., shard=(i, parts))`` (picklable)."""

    def __init__(self, sources, out_dir, parts, seg_params, crop_params, records_per_shard, masks):
        self.sources, self.out_dir, self.parts = list(sources), out_dir, int(parts)
        self.seg_params, self.crop_params = seg_params, crop_params
        self.records_per_shard, self.masks = records_per_shard, masks

    def __call__(self, part: int) -> dict[str, Any]:
        manifest = nuclei.build_dataset(
            self.sources, self.out_dir, self.seg_params, self.crop_params, shard=(int(part), self.parts),
            records_per_shard=self.records_per_shard, masks=self.masks,
        )  # fmt: skip
        return {"part": int(part), "crops": manifest["num_records"], "stats": manifest["build"]["stats"]}


def build_with_beam(
    sources: Sequence[str],
    out_dir: str,
    parts: int,
    seg_params: Any = None,
    crop_params: Any = None,
    records_per_shard: int = 4096,
    masks: dict[str, str] | None = None,
    pipeline_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the ``parts`` build jobs of ``sources`` as a Beam pipeline and wait for it.

    Args:
      sources: image files (sorted here, as every ``--shard`` job sorts them).
      out_dir: crop dataset folder.
      parts: number of ``--shard`` jobs (Beam elements), 1 <= parts <= len(sources).
      seg_params, crop_params, records_per_shard, masks: as ``nuclei.build_dataset`` (the
        ``segment`` / ``crop`` groups of ``configs/nuclei.py``; None = its defaults).
      pipeline_args: Beam pipeline options (``--runner``, runner settings).

    Returns:
      ``{"parts": n, "crops": total, "stats": {stat: summed over parts}}`` read back from the
      manifests the pipeline wrote.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    sources = sorted(os.path.abspath(s) for s in sources)
    if not sources:
        raise images_lib.ImageError("no source images given")
    if not 1 <= parts <= len(sources):
        raise ValueError(f"parts must be in [1, {len(sources)}] (one source file at least per part), got {parts}")
    out_dir = os.path.abspath(out_dir)
    build = _BuildPart(sources, out_dir, parts, seg_params, crop_params, records_per_shard, masks)
    with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as p:
        _ = (
            p
            | "Parts" >> beam.Create(range(parts))
            | "Spread" >> beam.Reshuffle()  # one part per worker slot, whatever the runner's fusion
            | "Build" >> beam.Map(build)
        )
    return summary(out_dir, parts)


def summary(out_dir: str, parts: int) -> dict[str, Any]:
    """Crops and build stats summed over the ``parts`` manifests of ``out_dir`` (errors name what is missing)."""
    tag = f"-of-{parts:05d}.json"
    manifests = [m for m in records.read_manifests(out_dir) if m["_path"].endswith(tag)]
    if len(manifests) != parts:
        raise RuntimeError(f"{out_dir}: {len(manifests)} of {parts} part manifests written; the pipeline failed")
    stats = dict.fromkeys(nuclei.STAT_KEYS, 0)
    for m in manifests:
        for k in stats:
            stats[k] += m["build"]["stats"][k]
    return {"parts": parts, "crops": sum(m["num_records"] for m in manifests), "stats": stats}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", nargs="+", required=True, metavar="GLOB", help="folders, globs or files")
    p.add_argument("--out", required=True, help="output crop dataset folder")
    p.add_argument("--parts", type=int, required=True, help="number of --shard jobs (Beam elements)")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    args, beam_args = p.parse_known_args([a for a in argv if a not in overrides])
    cfg = load_config(nuclei_configs, "default", overrides)
    out = build_with_beam(images_lib.find_images(args.images), args.out, args.parts,
                          seg_lib.segment_params(**cfg.segment.to_dict()), nuclei.crop_settings(**cfg.crop.to_dict()),
                          records_per_shard=cfg.records_per_shard, pipeline_args=beam_args)
    print(json.dumps({"out": args.out, **out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
