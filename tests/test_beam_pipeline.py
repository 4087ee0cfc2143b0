"""The Beam build (DirectRunner) writes the --shard layout whose union is the single-job dataset.

Needs apache-beam, which is not installable beside the project's pinned stack (notes/loader.md):
skipped where it is missing.
"""

import numpy as np
import pytest

from cosmic_jax.data import records
from data_builders import nuclei

beam = pytest.importorskip("apache_beam")

from data_builders import beam_pipeline  # noqa: E402


def test_beam_build_equals_single_job(tiles, tmp_path):
    nuclei.build_dataset(tiles, str(tmp_path / "single"), records_per_shard=40)
    single = records.CropSource(str(tmp_path / "single"))
    out = beam_pipeline.build_with_beam(tiles, str(tmp_path / "beam"), parts=3, records_per_shard=40,
                                        pipeline_args=["--runner=DirectRunner"])
    src = records.CropSource(str(tmp_path / "beam")).verify()
    assert out["parts"] == 3 and out["crops"] == len(src) == len(single) > 80
    assert out["stats"]["images"] == 4 and out["stats"]["crops"] == len(src)
    assert src.cell_ids() == single.cell_ids()
    n = len(src)
    np.testing.assert_array_equal(src.read_images(np.arange(n)), single.read_images(np.arange(n)))
    assert src.read_meta(np.arange(n))[1] == single.read_meta(np.arange(n))[1]
    with pytest.raises(ValueError, match=r"parts must be in \[1, 4\]"):
        beam_pipeline.build_with_beam(tiles, str(tmp_path / "x"), parts=5)


def test_cli_takes_nuclei_config_overrides_and_beam_options(tiles, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert beam_pipeline.main(["--images", *tiles[:2], "--out", out, "--parts", "2", "--config.crop.size=48",
                               "--runner=DirectRunner"]) == 0
    assert '"parts": 2' in capsys.readouterr().out
    src = records.CropSource(out)
    assert src.image_shape == (48, 48, 1) and len(src) > 20
