"""Device mesh, sharding rules and sharded state/batch helpers (big_vision / MaxText style).

One 2-D mesh with axes ``("data", "fsdp")`` covers every device of every process:

- data parallel (default, ``fsdp=1``): parameters and optimizer state replicated, the batch split
  over all devices;
- FSDP (``fsdp>1``): every parameter and optimizer-state leaf large enough is split along the
  ``"fsdp"`` axis on its largest dimension divisible by the axis size, the batch is still split
  over *all* devices (``("data", "fsdp")`` together), so XLA all-gathers weights per layer and
  reduce-scatters gradients.

The mesh uses ``AxisType.Auto`` so the model code needs no sharding annotations: jit's
``in_shardings`` / ``out_shardings`` pin the state and batch layouts and XLA's partitioner
propagates the rest. Everything goes through ``jax.jit`` (never ``pmap``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)

# Logical axis name -> mesh axes. "batch" spans every device; "fsdp" is the parameter shard axis.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", MESH_AXES),
    ("fsdp", FSDP_AXIS),
    ("replicated", None),
)


@dataclasses.dataclass
class MeshConfig:
    """Mesh shape: ``data * fsdp`` must equal the device count; -1 means "all the rest"."""

    data: int = -1
    fsdp: int = 1
    # Leaves with fewer elements than this stay replicated under FSDP (biases, norms, scalars):
    # sharding them saves nothing and costs one collective each.
    fsdp_min_size: int = 1024
    # Use only the first N devices (0 = all): e.g. single-device runs on a forced-8-device host.
    num_devices: int = 0
    # CPU hosts only, applied by `cosmic pretrain` before JAX starts: split the host into this many
    # XLA devices (data parallel over its cores; see cosmic_jax/runtime.py). -1 = auto (one per
    # core while each gets >= 64 images of the global batch), 0 = leave the host as one device.
    # An explicit --xla_force_host_platform_device_count in XLA_FLAGS wins.
    cpu_devices: int = -1


@dataclasses.dataclass
class DistributedConfig:
    """Multi-process settings for ``jax.distributed.initialize``.

    ``enabled="auto"`` initialises when a coordinator is given (flag or ``COSMIC_COORDINATOR``)
    or a known cluster environment is detected (SLURM, Open MPI, TPU pod); ``"yes"`` always
    initialises (letting JAX auto-detect), ``"no"`` never does.
    """

    enabled: str = "auto"
    coordinator_address: str = ""
    num_processes: int = 0  # 0 = from env / auto-detect
    process_id: int = -1  # -1 = from env / auto-detect
    cpu_collectives: str = "gloo"  # only used on CPU backends; "gloo" or "mpi"


_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(cfg: DistributedConfig | None) -> bool:
    """Call ``jax.distributed.initialize`` when configured; must run before any jax computation.

    Flags win over the env vars ``COSMIC_COORDINATOR`` / ``COSMIC_NUM_PROCESSES`` /
    ``COSMIC_PROCESS_ID``; with none of them, JAX's cluster auto-detection (SLURM, MPI, TPU) is used.

    Returns:
      True if this call (or an earlier one) initialised the distributed runtime.
    """
    cfg = cfg or DistributedConfig()
    if cfg.enabled not in ("auto", "yes", "no"):
        raise ValueError(f"distributed.enabled must be auto|yes|no, got {cfg.enabled!r}")
    if cfg.enabled == "no":
        return False
    if jax.distributed.is_initialized():
        return True
    addr = cfg.coordinator_address or os.environ.get("COSMIC_COORDINATOR", "")
    nproc = cfg.num_processes or int(os.environ.get("COSMIC_NUM_PROCESSES", "0") or 0)
    pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("COSMIC_PROCESS_ID", "-1") or -1)
    on_cluster = any(k in os.environ for k in _CLUSTER_ENV)
    if cfg.enabled == "auto" and not addr and not on_cluster:
        return False
    if addr and (nproc <= 0 or pid < 0):
        raise ValueError(
            f"distributed: coordinator {addr!r} given but num_processes={nproc} / process_id={pid}; "
            "set both (flags distributed.num_processes / distributed.process_id or env "
            "COSMIC_NUM_PROCESSES / COSMIC_PROCESS_ID)"
        )
    # CPU collectives across processes need an explicit implementation (gloo ships with jaxlib);
    # the option only affects the CPU backend, so it is harmless on GPU/TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    kwargs = {}
    if addr:
        kwargs = dict(coordinator_address=addr, num_processes=nproc, process_id=pid)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d / %d", jax.process_index(), jax.process_count())
    return True


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over all (or the given) devices.

    Args:
      data: size of the data-parallel axis; -1 = ``num_devices // fsdp``.
      fsdp: size of the parameter-sharding axis.
      devices: defaults to ``jax.devices()`` (every process's devices).

    Returns:
      A ``jax.sharding.Mesh`` of shape (data, fsdp) with ``AxisType.Auto`` axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh: fsdp={fsdp} must be >= 1 and divide the device count {n}")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} != {n} devices")
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def mesh_from_config(cfg: MeshConfig) -> Mesh:
    devices = jax.devices()[: cfg.num_devices] if cfg.num_devices > 0 else None
    if devices is not None and jax.process_count() > 1:
        raise ValueError("mesh.num_devices is for single-process runs; multi-process meshes use all devices")
    return make_mesh(cfg.data, cfg.fsdp, devices)


def logical_sharding(mesh: Mesh, *logical_axes: str | None, rules=LOGICAL_RULES) -> NamedSharding:
    """NamedSharding for an array whose dims carry the given logical names (None = unsplit)."""
    import flax.linen as nn

    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def strided_chunks(x: jax.Array, n: int) -> jax.Array:
    """(B, ...) -> (n, B // n, ...) where chunk c holds rows c, c + n, c + 2n, ...

    Strided, not contiguous: with the batch split over devices (each device's rows a multiple of
    n), every device's shard falls into every chunk in equal parts, so the chunks keep the batch
    sharding and nothing moves between devices. ``merge_strided_chunks`` undoes it.
    """
    return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)


def merge_strided_chunks(y: jax.Array) -> jax.Array:
    """(n, B // n, ...) chunks from ``strided_chunks`` -> (B, ...) in the original row order."""
    return y.swapaxes(0, 1).reshape((y.shape[0] * y.shape[1],) + y.shape[2:])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over every device of the mesh."""
    return logical_sharding(mesh, "batch")


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """Partition spec splitting the largest dim divisible by ``fsdp_size`` over ``"fsdp"``.

    Args:
      shape: the leaf's shape.
      fsdp_size: mesh size of the ``"fsdp"`` axis.
      min_size: leaves with fewer elements are replicated.

    Returns:
      ``P(None, ..., "fsdp", ..., None)`` or ``P()`` (replicated).
    """
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    # Ties go to the last dim: for (in, out) kernels that keeps the contraction dim whole.
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = FSDP_AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = 1024) -> Any:
    """NamedSharding for every leaf of a (possibly abstract) train state.

    Data parallel when the mesh's ``"fsdp"`` axis has size 1 (everything replicated); otherwise
    params and optimizer moments are split by :func:`fsdp_spec`. Optimizer moments have their
    parameter's shape, so they get the same layout without any tree matching.
    """
    fsdp_size = mesh.shape[FSDP_AXIS]

    def one(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size))

    return jax.tree.map(one, abstract_state)


def create_sharded_state(
    init_fn: Callable[..., Any], mesh: Mesh, *args, min_size: int = 1024
) -> tuple[Any, Any]:
    """Initialise a state directly in its final sharded layout (never materialised whole).

    Args:
      init_fn: pure function ``init_fn(*args) -> state`` (e.g. a partial of ``create_train_state``).
      mesh: the device mesh.
      *args: arguments for ``init_fn`` (an rng key, ...); they are replicated.

    Returns:
      (state, shardings): the sharded state and the matching pytree of NamedSharding.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(abstract, mesh, min_size)
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, shardings


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: the restore target for orbax resharding."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble the global batch from this process's slice (leading dim split over all devices).

    Args:
      batch: per-process numpy arrays, each (global_batch // process_count, ...). Non-array
        entries (strings such as cell ids) are not device data and are left out.
      mesh: the device mesh.

    Returns:
      dict of global jax.Arrays of leading size ``global_batch``.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype.kind not in "biuf":
            continue
        n_local = mesh.devices.size // jax.process_count()
        if v.shape[0] % n_local:
            raise ValueError(
                f"batch[{k!r}]: per-process batch {v.shape[0]} is not divisible by the "
                f"{n_local} local devices; choose global_batch_size divisible by {mesh.devices.size}"
            )
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def jit_step(
    step_fn: Callable[[Any, Any, jax.Array], tuple[Any, Any]],
    mesh: Mesh,
    state_sharding: Any,
    donate: bool = True,
) -> Callable[[Any, Any, jax.Array], tuple[Any, Any]]:
    """``jax.jit`` a ``step(state, batch, rng) -> (state, metrics)`` with explicit layouts.

    The state keeps its layout across steps (out = in), the batch is split over all devices, rng
    and metrics are replicated, and the input state is donated so its buffers are reused.
    """
    rep = replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding(mesh), rep),
        out_shardings=(state_sharding, rep),
        donate_argnums=(0,) if donate else (),
    )


def describe(tree: Any) -> dict[str, str]:
    """Flat {path: "shape spec"} of a sharded pytree, for logs and tests."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = getattr(getattr(leaf, "sharding", None), "spec", None)
        out[jax.tree_util.keystr(path)] = f"{tuple(getattr(leaf, 'shape', ()))} {spec}"
    return out


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every floating leaf of ``tree`` is finite (checked before any checkpoint save)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
