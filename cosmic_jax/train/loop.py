"""The generic training loop shared by MAE pretraining and the joint model.

A task plugs in: an initial (sharded) state with a ``.step`` field, a jitted
``step_fn(state, batch, rng) -> (state, metrics)``, an iterator of host batches plus the function
that turns one into device arrays, and optionally a :class:`~cosmic_jax.train.checkpoint.Checkpointer`
(with the data iterator whose position is saved alongside the state), a
:class:`~cosmic_jax.train.metrics.MetricWriter` and periodic :class:`Hook` s.

Guarantees:
- per-step rng is ``fold_in(rng, step)``: a resumed run draws the same randomness as an
  uninterrupted one;
- a NaN/Inf loss (or non-finite parameters at a save) stops the run with
  :class:`NonFiniteLossError` naming the step; such a state is never saved, so the newest
  checkpoint on disk is the last good one;
- the state is saved at the end (normal finish, data exhausted, Ctrl-C).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or parameters; ``.step`` is the first bad step (1-based)."""

    def __init__(self, step: int, what: str, last_checkpoint: int | None):
        self.step = step
        self.last_checkpoint = last_checkpoint
        kept = (
            f"the last good checkpoint (step {last_checkpoint}) is kept"
            if last_checkpoint is not None
            else "no checkpoint was written"
        )
        super().__init__(
            f"non-finite {what} at step {step}; stopped without saving this state, {kept}. "
            "Lower the learning rate, enable/tighten gradient clipping, or check the input data."
        )


@dataclasses.dataclass
class Hook:
    """``fn(step, state) -> scalars or None`` called every ``every`` steps (and at the end).

    Returned scalars are written with the step's metrics (e.g. a probe accuracy).
    """

    every: int
    fn: Callable[[int, Any], Mapping[str, Any] | None]
    name: str = "hook"
    at_end: bool = True


_all_finite_jit = None


def _params_finite(state: Any) -> bool:
    global _all_finite_jit
    from cosmic_jax.train.sharding import all_finite

    if _all_finite_jit is None:
        _all_finite_jit = jax.jit(all_finite)
    tree = getattr(state, "params", state)
    return bool(_all_finite_jit(tree))


def _host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in jax.device_get(dict(metrics)).items():
        a = np.asarray(v)
        if a.size == 1:
            out[k] = float(a.reshape(()))
    return out


def train_loop(
    state: Any,
    step_fn: Callable[[Any, Any, jax.Array], tuple[Any, Mapping[str, Any]]],
    batches: Iterator[Any],
    *,
    num_steps: int,
    rng: jax.Array,
    fold_rng: bool = True,
    prepare_batch: Callable[[Any], Any] = lambda b: b,
    checkpointer: Any = None,
    data_iterator: Any = None,
    writer: Any = None,
    hooks: Sequence[Hook] = (),
    log_every: int = 10,
    examples_per_step: int | None = None,
    loss_key: str = "loss",
    progress: bool = True,
    desc: str = "train",
) -> Any:
    """Run ``step_fn`` from ``state.step`` up to ``num_steps``.

    Args:
      state: train state (sharded, with an integer ``.step``) - typically just restored.
      step_fn: jitted ``(state, batch, rng) -> (state, metrics)``; the state may be donated.
      batches: iterator of host batches (e.g. a grain iterator).
      num_steps: total number of steps of the run (not "steps still to do").
      rng: base PRNG key; step ``s`` gets ``fold_in(rng, s)``.
      fold_rng: False passes ``rng`` unchanged (for steps that fold ``state.step`` in themselves).
      prepare_batch: host batch -> step_fn batch (e.g. ``sharding.shard_batch``).
      checkpointer: saves when ``checkpointer.should_save(step)`` and at the end.
      data_iterator: iterator whose state is checkpointed with the train state.
      writer: MetricWriter; metrics are averaged over each ``log_every`` window.
      hooks: periodic callbacks (recon grids, probes).
      log_every: logging period in steps.
      examples_per_step: global batch size, for img/s.
      loss_key: metric checked for NaN/Inf and shown in the progress bar.
      progress: show a tqdm bar (process 0 only).

    Returns:
      the final state.
    """
    start = int(jax.device_get(state.step))
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc=desc, dynamic_ncols=True, mininterval=0.5)

    last_saved = checkpointer.latest_step() if checkpointer is not None else None
    window: list[dict[str, float]] = []
    pending: tuple[int, Mapping[str, Any]] | None = None
    t_window, n_window = time.perf_counter(), 0
    done = start

    def check(item) -> dict[str, float]:
        step, metrics = item
        scalars = _host_scalars(metrics)
        loss = scalars.get(loss_key)
        if loss is None:
            raise KeyError(f"step_fn metrics have no {loss_key!r} (got {sorted(scalars)})")
        if not math.isfinite(loss):
            raise NonFiniteLossError(step, f"loss ({loss_key}={loss})", last_saved)
        window.append(scalars)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        return scalars

    def save(step: int, force: bool) -> None:
        nonlocal last_saved
        if checkpointer is None or step == last_saved:
            return
        if not _params_finite(state):
            raise NonFiniteLossError(step, "parameters", last_saved)
        if checkpointer.save(step, state, data_iterator, force=force):
            last_saved = step

    finished = interrupted = False
    try:
        for step in range(start, num_steps):
            try:
                host_batch = next(batches)
            except StopIteration:
                log.warning("data exhausted after step %d (of %d); stopping", step, num_steps)
                break
            batch = prepare_batch(host_batch)
            state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step) if fold_rng else rng)
            done = step + 1
            n_window += 1
            # Check the previous step while this one runs: keeps the device queue non-empty.
            if pending is not None:
                check(pending)
            pending = (done, metrics)
            if bar is not None:
                bar.update(1)

            want_save = checkpointer is not None and checkpointer.should_save(done)
            due_hooks = [h for h in hooks if h.every > 0 and done % h.every == 0]
            if done % log_every == 0 or want_save or due_hooks or done == num_steps:
                check(pending)
                pending = None
            t_aside = time.perf_counter()
            if want_save:
                save(done, force=False)
            extra = {}
            for h in due_hooks:
                extra.update(h.fn(done, state) or {})
            t_window += time.perf_counter() - t_aside  # img/s counts training time only
            if done % log_every == 0 or done == num_steps:
                _log_window(writer, bar, done, window, extra, examples_per_step, n_window, t_window)
                window, extra = [], {}
                t_window, n_window = time.perf_counter(), 0
            elif extra and writer is not None:
                writer.write_scalars(done, extra)
        if pending is not None:
            check(pending)
            pending = None
        finished = True
    except KeyboardInterrupt:
        log.warning("interrupted at step %d; saving", done)
        finished = interrupted = True
    finally:
        if bar is not None:
            bar.close()
        if not finished and checkpointer is not None:
            checkpointer.wait()  # a NaN or crash: keep what was saved, write nothing new
    if window and writer is not None:
        _log_window(writer, None, done, window, {}, examples_per_step, n_window, t_window)
    end_hooks = [h for h in hooks if h.at_end and not (h.every > 0 and done % h.every == 0)]
    if end_hooks and done > start:
        extra = {}
        for h in end_hooks:
            extra.update(h.fn(done, state) or {})
        if writer is not None and extra:
            writer.write_scalars(done, extra)
    if done > start:
        try:
            save(done, force=True)
        except Exception:
            if not interrupted:
                raise
            # Ctrl-C inside a step can leave the donated state deleted; the periodic save stands.
            log.exception("could not save the state after the interrupt")
    if checkpointer is not None:
        checkpointer.wait()
    if writer is not None:
        writer.flush()
    if interrupted:
        raise KeyboardInterrupt
    return state


def _log_window(writer, bar, step, window, extra, examples_per_step, n_steps, t0) -> None:
    if not window and not extra:
        return
    scalars: dict[str, float] = {}
    if window:
        for k in window[-1]:
            vals = [w[k] for w in window if k in w]
            scalars[k] = float(np.mean(vals))
    dt = time.perf_counter() - t0
    if examples_per_step and n_steps and dt > 0:
        scalars["img_per_sec"] = examples_per_step * n_steps / dt
        if bar is not None:
            bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4g}", img_s=f"{scalars['img_per_sec']:.1f}")
    scalars.update({k: float(np.asarray(v)) for k, v in extra.items()})
    if writer is not None:
        writer.write_scalars(step, scalars)
