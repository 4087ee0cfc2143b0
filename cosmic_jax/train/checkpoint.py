"""Checkpoints: an orbax manager for (train state + data iterator), and inference loading.

Layout of a workdir::

    W/config.json              the resolved run config (``configs.overrides.save``)
    W/checkpoints/<step>/state the train state (orbax StandardSave, sharded arrays, OCDBT)
    W/checkpoints/<step>/data  the grain iterator state (JSON), so a resumed run continues the
                               data stream exactly where the saved one stopped

Saves are asynchronous (device->host copy blocks, the file writes run in a background thread)
and keep the newest ``keep`` steps. Restores take a target of ShapeDtypeStructs carrying the
*current* mesh's shardings, so a run saved on 8 devices resumes on 4 (or under FSDP) and orbax
reshards while reading. A newest checkpoint that does not restore (a crash mid-write, a damaged
file) is skipped with a warning naming it and why, and moved to ``W/unreadable_checkpoints/``;
the run continues from the newest one that restores.

Every path is made absolute first: orbax misreads relative checkpoint paths.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CKPT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint or run config cannot be read; the message names the path.

    Also a ValueError: it is bad input to the command that read it (the CLI reports it in one line).
    """


def _short(err: BaseException) -> str:
    """One line of an exception (orbax / TensorStore errors can run to dozens of lines)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line[:200]}"


def checkpoint_steps(workdir: str) -> list[int]:
    """Finished checkpoint steps in ``W/checkpoints``, ascending ([] if none)."""
    directory = os.path.join(os.path.abspath(workdir), CKPT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _restore_newest(workdir: str, steps: list[int], restore: Callable[[int], Any], what: str) -> tuple[Any, int]:
    """``restore(step)`` of the newest step that works; unreadable newer ones are warned about."""
    errors = []
    for step in sorted(steps, reverse=True):
        try:
            out = restore(step)
        except Exception as e:  # orbax / tensorstore raise many types; each is reported by name
            errors.append((step, _short(e)))
            log.warning("%s/%s/%d: cannot restore the %s (%s); trying an older checkpoint",
                        workdir, CKPT_DIR, step, what, _short(e))
            continue
        for bad, why in errors:
            log.warning("skipped unreadable checkpoint %s/%s/%d (%s); using step %d",
                        workdir, CKPT_DIR, bad, why, step)
        return out, step
    newest, why = errors[0]
    raise CheckpointError(f"{workdir}/{CKPT_DIR}/{newest}: cannot restore the {what} ({why}); "
                          f"no older checkpoint restores either (tried {[s for s, _ in errors]}). "
                          "Was it written by a different model/optimizer config?")


class Checkpointer:
    """Periodic async saves of the train state together with the data iterator state.

    Args:
      workdir: run directory; checkpoints go to ``workdir/checkpoints``.
      save_every: save when ``step % save_every == 0``.
      keep: number of newest checkpoints kept on disk.
      async_save: write files in a background thread.
    """

    def __init__(self, workdir: str, save_every: int = 1000, keep: int = 3, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CKPT_DIR)
        if save_every < 1 or keep < 1:
            raise ValueError(f"checkpoint every {save_every} steps keeping {keep}: both must be >= 1")
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(save_interval_steps=self.save_every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        # Our own rule (orbax's default policy also saves the first step it sees).
        return step > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, data_iterator: Any = None) -> bool:
        """Save ``state`` (and the iterator position) as ``step`` now; returns whether it saved.

        The iterator state is read now, synchronously, so it matches the batches consumed so far
        even though the files are written later.
        """
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

    def restore(self, target: Any, data_iterator: Any = None) -> tuple[Any, int]:
        """Restore the newest readable state (resharded onto ``target``'s shardings) and the iterator.

        Args:
          target: pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` (see
            ``sharding.abstract_with_shardings``) matching the saved state's structure.
          data_iterator: a grain iterator whose state is set to the saved position (skipped if None
            or if the checkpoint holds no data state).

        Returns:
          (state, step).
        """
        def restore(step: int):
            items = {"state": ocp.args.StandardRestore(target)}
            has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
            if data_iterator is not None and has_data:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            elif data_iterator is not None:
                log.warning("checkpoint %d in %s has no data iterator state; data restarts", step, self.directory)
            return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        state, step = _restore_newest(self.workdir, steps, restore, "train state")
        newer = [s for s in steps if s > step]
        if newer and jax.process_index() == 0:
            # Out of the manager's way (it would refuse to save those steps again), never deleted.
            aside = os.path.join(self.workdir, UNREADABLE_DIR)
            os.makedirs(aside, exist_ok=True)
            for s in newer:
                dest = os.path.join(aside, f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(os.path.join(self.directory, str(s)), dest)
                log.warning("moved unreadable checkpoint step %d to %s", s, dest)
            self.manager.reload()
        return state, step

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_params(workdir: str, step: int | None = None, device: jax.Device | None = None) -> tuple[Any, int]:
    """Read only ``params`` of a saved train state onto one device (no optimizer, no data).

    Args:
      workdir: a training workdir.
      step: a saved step; default the newest that restores (older ones are tried if it does not).

    Returns:
      (params pytree of jax.Array on ``device``, step).
    """
    workdir = os.path.abspath(workdir)
    directory = os.path.join(workdir, CKPT_DIR)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise CheckpointError(f"{directory}: holds no finished checkpoint; was {workdir!r} trained?")
    if step is not None and step not in steps:
        raise CheckpointError(f"{directory}: no checkpoint for step {step}; available: {steps}")
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    ckptr = ocp.PyTreeCheckpointer()

    def restore(s: int):
        path = os.path.join(directory, str(s), "state")
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        if tree is None or "params" not in tree:
            raise CheckpointError(f"{path}: no 'params' in the checkpoint metadata")
        target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                                         tree["params"])}
        args = ocp.args.PyTreeRestore(item=target, partial_restore=True,  # leaves the optimizer on disk
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        return ckptr.restore(path, args=args)["params"]

    return _restore_newest(workdir, [step] if step is not None else steps, restore, "parameters")
