"""Device mesh, logical-axis sharding rules and sharded state/batch helpers (MaxText / big_vision style).

One 2-D mesh with axes ``("data", "fsdp")`` covers every device of every process. Parameters carry
logical axis names (``cosmic_jax/models/vit.py``: "embed", "mlp", "heads", "patch", "dec_embed");
``LOGICAL_RULES`` map those names to mesh axes, and the rules alone decide the layout:

- data parallel (default, ``fsdp=1``): the "fsdp" axis has size 1, so every parameter and
  optimizer-state leaf is whole on every device and the batch is split over all devices;
- FSDP (``mesh.fsdp > 1``): every dim named "embed" / "dec_embed" is split over "fsdp" (a dim the
  axis does not divide stays whole), the batch is still split over *all* devices, and XLA
  all-gathers weights per layer and reduce-scatters gradients.

Optimizer moments get the layout of their parameter (matched by tree path), scalars and leaves
without names (e.g. the joint model's MLPs) are replicated. The mesh uses ``AxisType.Auto``, so jit's
``in_shardings`` / ``out_shardings`` pin state and batch and XLA propagates the rest. Everything goes
through ``jax.jit`` (never ``pmap``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)

# Logical axis name -> mesh axes. "batch" (activations) spans every device; model dims named
# "embed" / "dec_embed" are the FSDP shard dims; everything else stays whole.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", MESH_AXES),
    ("embed", FSDP_AXIS),
    ("dec_embed", FSDP_AXIS),
    ("mlp", None),
    ("heads", None),
    ("patch", None),
)

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(cfg: Any) -> bool:
    """Call ``jax.distributed.initialize`` when configured; must run before any jax computation.

    Flags win over the env vars ``COSMIC_COORDINATOR`` / ``COSMIC_NUM_PROCESSES`` /
    ``COSMIC_PROCESS_ID``; with none of them, JAX's cluster auto-detection (SLURM, MPI, TPU) is used.

    Returns:
      True if this call (or an earlier one) initialised the distributed runtime.
    """
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


def mesh_from_config(cfg: Any) -> Mesh:
    """The mesh of a ``mesh`` config group (``configs/pretrain.py``)."""
    devices = jax.devices()[: cfg.num_devices] if cfg.num_devices > 0 else None
    if devices is not None and jax.process_count() > 1:
        raise ValueError("mesh.num_devices is for single-process runs; multi-process meshes use all devices")
    return make_mesh(cfg.data, cfg.fsdp, devices)


def logical_sharding(mesh: Mesh, *logical_axes: str | None, rules=LOGICAL_RULES) -> NamedSharding:
    """NamedSharding for an array whose dims carry the given logical names (None = unsplit)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """``spec`` with every dim that its mesh axes do not divide left whole."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if size > 1 and dim % size == 0 else None)
    return P(*out)


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state: Any, mesh: Mesh, param_specs: Any = None, rules=LOGICAL_RULES) -> Any:
    """NamedSharding for every leaf of a (possibly abstract) train state, from logical names.

    Args:
      abstract_state: the state (or its ``jax.eval_shape``).
      mesh: the device mesh.
      param_specs: tree of logical ``PartitionSpec`` with the params' structure (e.g.
        ``models.mae.param_logical_specs``); None = no names (everything replicated).
      rules: logical name -> mesh axes.

    Returns:
      a tree of NamedSharding with the state's structure. A leaf whose tree path ends with a
      parameter's path (the parameter itself, its Adam moments) gets that parameter's layout.
    """
    by_path = {}
    if param_specs is not None:
        flat = traverse_util.flatten_dict(param_specs, is_leaf=lambda _, v: isinstance(v, P))
        by_path = {tuple(map(str, k)): nn.logical_to_mesh_axes(tuple(v), rules) for k, v in flat.items()}
    longest = max((len(k) for k in by_path), default=0)

    def one(path, leaf):
        keys = _path_keys(path)
        shape = getattr(leaf, "shape", ())
        for n in range(min(longest, len(keys)), 0, -1):
            spec = by_path.get(keys[-n:])
            if spec is not None and len(spec) <= len(shape):
                return NamedSharding(mesh, _fit_spec(spec, shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def create_sharded_state(init_fn: Callable[..., Any], mesh: Mesh, *args, param_specs: Any = None,
                         rules=LOGICAL_RULES) -> tuple[Any, Any]:
    """Initialise a state directly in its final sharded layout (never materialised whole).

    Every trainer (MAE, joint model) goes through here; the Embedder places loaded params with
    :func:`state_shardings` + ``jax.device_put``.

    Args:
      init_fn: pure ``init_fn(*args) -> state`` (e.g. a partial of a task's ``create_train_state``).
      mesh: the device mesh.
      *args: arguments of ``init_fn`` (an rng key, ...); they are replicated.
      param_specs, rules: see :func:`state_shardings`.

    Returns:
      (state, shardings): the sharded state and the matching pytree of NamedSharding.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(abstract, mesh, param_specs, rules)
    return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


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


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every floating leaf of ``tree`` is finite (checked before any checkpoint save)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
