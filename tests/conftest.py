"""Test setup: 8 forced host CPU devices before jax is imported, absl flags marked parsed, and the
`cosmic` commands' compilation cache kept out of the user's ~/.cache."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["COSMIC_XLA_CACHE"] = os.path.join(tempfile.gettempdir(), "cosmic_jax_test_xla_cache")

import pytest  # noqa: E402
import tifffile  # noqa: E402
from absl import flags  # noqa: E402

from data_builders import images  # noqa: E402

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """Four real 256x256 source images: the quadrants of stardist's img2d."""
    img = tifffile.imread(images.stardist_sample()[0])
    d = tmp_path_factory.mktemp("tiles")
    for k, (y, x) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        tifffile.imwrite(d / f"tile{k}.tif", img[y : y + 256, x : x + 256])
    return images.find_images(str(d))
