"""Checkpoints: orbax manager for (train state + grain iterator), run config JSON, inference load.

Layout of a workdir::

    W/config.json              the run config (what `cosmic pretrain` was called with, resolved)
    W/checkpoints/<step>/state the train state (orbax StandardSave, sharded arrays, OCDBT)
    W/checkpoints/<step>/data  the grain iterator state (JSON), so a resumed run continues the
                               data stream exactly where the saved one stopped

Saves are asynchronous (device->host copy blocks, the file writes run in a background thread)
and keep the newest ``keep`` steps. Restores take a target of ShapeDtypeStructs carrying the
*current* mesh's shardings, so a run saved on 8 devices resumes on 4 (or under FSDP) and orbax
reshards while reading.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CKPT_DIR = "checkpoints"


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint or run config cannot be read; the message names the path.

    Also a ValueError: it is bad input to the command that read it (the CLI reports it in one line).
    """


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / jax scalars
        return obj.item()
    return obj


def save_config(workdir: str, config: Any) -> str:
    """Write ``config`` (dataclass or dict) as ``W/config.json`` (process 0 only). Returns the path."""
    path = os.path.join(workdir, CONFIG_FILE)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_to_jsonable(config), f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written config
    return path


def load_config(workdir: str) -> dict[str, Any]:
    """Read ``W/config.json``; raises CheckpointError naming the file if missing or corrupt."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no run config; is {workdir!r} a cosmic training workdir?") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt run config ({e})") from e


class Checkpointer:
    """Periodic async saves of the train state together with the data iterator state.

    Args:
      workdir: run directory; checkpoints go to ``workdir/checkpoints``.
      save_every: save when ``step % save_every == 0`` (``force=True`` overrides).
      keep: number of newest checkpoints kept on disk.
      async_save: write files in a background thread.
    """

    def __init__(self, workdir: str, save_every: int = 1000, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.path.join(workdir, CKPT_DIR))
        self.save_every = max(1, int(save_every))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=self.save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        # Our own rule (orbax's default policy also saves the first step it sees).
        return step > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = True) -> bool:
        """Save ``state`` (and the iterator position) as ``step`` now; returns whether it saved.

        Callers decide when (``should_save``); ``force`` is kept for API symmetry with orbax.

        The iterator state is read now, synchronously, so it matches the batches consumed so
        far even though the files are written later.
        """
        import grain

        ocp = self._ocp
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        # force: the save decision is ours (should_save / end of run), not orbax's policy.
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, target: Any, data_iterator: Any = None, step: int | None = None) -> tuple[Any, int]:
        """Restore the state (resharded onto ``target``'s shardings) and the iterator in place.

        Args:
          target: pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` (see
            ``sharding.abstract_with_shardings``) matching the saved state's structure.
          data_iterator: a grain DatasetIterator / DataLoaderIterator whose state is set to the
            saved position (skipped if None or if the checkpoint holds no data state).
          step: a saved step; default the latest.

        Returns:
          (state, step).
        """
        import grain

        ocp = self._ocp
        if step is None:
            step = self.manager.latest_step()
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        items = {"state": ocp.args.StandardRestore(target)}
        has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
        if data_iterator is not None and has_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        elif data_iterator is not None:
            log.warning("checkpoint %d in %s has no data iterator state; data restarts", step, self.directory)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(
                f"{self.directory}/{step}: cannot restore the train state ({type(e).__name__}: {e}); "
                "was it written by a different model/optimizer config?"
            ) from e
        return restored["state"], step

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _ckpt_step_dir(workdir: str, step: int | None) -> tuple[str, int]:
    directory = os.path.join(workdir, CKPT_DIR)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no checkpoints directory; was {workdir!r} trained?")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    if not steps:
        raise CheckpointError(f"{directory}: holds no finished checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{directory}: no checkpoint for step {step}; available: {steps}")
    return os.path.join(directory, str(step), "state"), step


def load_params(workdir: str, step: int | None = None, device: jax.Device | None = None) -> tuple[Any, int]:
    """Read only ``params`` of a saved train state onto one device (no optimizer, no data).

    Returns:
      (params pytree of jax.Array on ``device``, step).
    """
    import orbax.checkpoint as ocp

    path, step = _ckpt_step_dir(workdir, step)
    device = device or jax.local_devices()[0]
    ckptr = ocp.PyTreeCheckpointer()
    try:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        params_meta = tree["params"]
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata or no 'params' ({e})") from e
    sharding = jax.sharding.SingleDeviceSharding(device)
    target = {
        "params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), params_meta)
    }
    restored = ckptr.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,  # leaves the optimizer state on disk
        ),
    )
    return restored["params"], step


def load_for_inference(workdir: str, step: int | None = None) -> tuple[Any, Any, int, dict[str, Any]]:
    """Model config and params of a pretraining run, on one device, for embedding / export.

    Args:
      workdir: a ``cosmic pretrain`` workdir (``config.json`` + ``checkpoints/``).
      step: checkpoint step; default the latest.

    Returns:
      (model_cfg, params, step, info): ``model_cfg`` from ``configs.mae.get_model_config`` with
      the run's variant and overrides, ``params`` the MAE parameter pytree, ``info`` a dict with
      ``config`` (the whole run config), ``workdir`` and ``steps`` (all saved steps).
    """
    from cosmic_jax.configs.mae import get_model_config

    cfg = load_config(workdir)
    if "model" not in cfg:
        raise CheckpointError(f"{os.path.join(workdir, CONFIG_FILE)}: no 'model' entry")
    model_cfg = get_model_config(cfg["model"], **cfg.get("model_overrides", {}))
    params, step = load_params(workdir, step)
    directory = os.path.join(workdir, CKPT_DIR)
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    info = {"config": cfg, "workdir": os.path.abspath(workdir), "steps": steps}
    return model_cfg, params, step, info
