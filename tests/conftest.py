"""Test setup before jax is imported: 8 forced host CPU devices, one persistent compilation cache in
a temporary folder for the test process and every `cosmic` command it starts (programs compiled
by several tests or commands compile once; nothing goes to the user's ~/.cache); absl flags marked
parsed."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "cosmic_jax_test_xla_cache")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

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
