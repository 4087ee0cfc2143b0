"""The one training loop: MAE pretraining and the joint model both run it.

A task brings its state (with an integer ``.step``), a jitted step function and an iterator of host
batches; the loop owns everything else:

- resume: it starts at ``state.step`` (the caller restores the state and the data iterator with
  :class:`~cosmic_jax.train.checkpoint.Checkpointer`, which also saves both here);
- per-step randomness from ``fold_in(rng, step)`` (or the task folds ``state.step`` itself), so a
  resumed run draws what an uninterrupted one draws;
- a NaN/Inf loss (or non-finite parameters at a save) stops the run with
  :class:`NonFiniteLossError` naming the step and the batch's records when known; such a state is
  never saved, so the newest checkpoint on disk is the last good one;
- TensorBoard events + ``metrics.jsonl`` (window means every ``log_every`` steps), a progress bar,
  periodic hooks (reconstructions, probes), and a final save (normal end, data exhausted, Ctrl-C).

``steps_per_call > 1``: the step function runs several optimizer steps per call (a jitted
``lax.scan``) as ``step_fn(state, batch, rng, num_steps) -> (state, metrics of shape (num,))``;
calls are cut at checkpoint steps so the resume points are the same as with single steps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from cosmic_jax.train.sharding import all_finite

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or parameters; ``.step`` is the first bad step (1-based)."""

    def __init__(self, step: int, what: str, last_checkpoint: int | None, records: str = ""):
        self.step = step
        self.last_checkpoint = last_checkpoint
        kept = (f"the last good checkpoint (step {last_checkpoint}) is kept" if last_checkpoint is not None
                else "no checkpoint was written")
        where = f" on a batch holding {records}" if records else ""
        super().__init__(
            f"non-finite {what} at step {step}{where}; stopped without saving this state, {kept}. "
            "Check the input data, then lower the learning rate or tighten gradient clipping.")


@dataclasses.dataclass
class Hook:
    """``fn(step, state) -> scalars or None`` every ``every`` steps (and at the end).

    Returned scalars are written with the step's metrics (e.g. a probe accuracy).
    """

    every: int
    fn: Callable[[int, Any], Mapping[str, Any] | None]
    name: str = "hook"
    at_end: bool = True


_all_finite_jit = jax.jit(all_finite)


def _host_rows(metrics: Mapping[str, Any], num: int) -> list[dict[str, float]]:
    """Per-step scalar dicts from one call's metrics (scalars, or arrays of leading size ``num``)."""
    host = {k: np.asarray(v) for k, v in jax.device_get(dict(metrics)).items()}
    rows = [{} for _ in range(num)]
    for k, a in host.items():
        if a.size == 1:
            for r in rows:
                r[k] = float(a.reshape(()))
        elif a.shape[:1] == (num,) and a.size == num:
            for r, x in zip(rows, a.reshape(num)):
                r[k] = float(x)
    return rows


def train_loop(
    state: Any,
    step_fn: Callable[..., tuple[Any, Mapping[str, Any]]],
    batches: Iterator[Any],
    *,
    num_steps: int,
    rng: jax.Array,
    fold_rng: bool = True,
    steps_per_call: int = 1,
    prepare_batch: Callable[[Any], Any] = lambda b: b,
    describe_batch: Callable[[Any], str] | None = None,
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
      state: train state with an integer ``.step`` (sharded; typically just restored).
      step_fn: jitted ``(state, batch, rng) -> (state, metrics)``; with ``steps_per_call > 1``
        ``(state, batch, rng, num) -> (state, metrics)`` where each metric has leading size num.
      batches: iterator of host batches (e.g. a grain iterator); ``None`` items are fine.
      num_steps: total steps of the run (not "steps still to do").
      rng: base PRNG key; step ``s`` gets ``fold_in(rng, s)`` unless ``fold_rng`` is False (for
        steps that fold ``state.step`` in themselves; multi-step calls always get ``rng``).
      prepare_batch: host batch -> step_fn batch (e.g. ``sharding.shard_batch``).
      describe_batch: host batch -> text naming its records (put in a NaN error).
      checkpointer: saves when ``checkpointer.should_save(step)`` and at the end.
      data_iterator: iterator whose state is checkpointed with the train state.
      writer: ``MetricWriter``; metrics are averaged over each ``log_every`` window.
      hooks: periodic callbacks.
      examples_per_step: global batch size, for img/s.
      loss_key: metric checked for NaN/Inf and shown in the progress bar.
      progress: show a tqdm bar (process 0 only).

    Returns:
      the final state.
    """
    start = int(jax.device_get(state.step))
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    bar = None
    if progress and jax.process_index() == 0 and num_steps > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, desc=desc, dynamic_ncols=True, mininterval=0.5)

    last_saved = checkpointer.latest_step() if checkpointer is not None else None
    window: list[dict[str, float]] = []
    pending: tuple[int, int, Mapping[str, Any], Any] | None = None
    t_window, n_window = time.perf_counter(), 0
    done = start

    def check(item) -> None:
        end, num, metrics, host_batch = item
        rows = _host_rows(metrics, num)
        for i, row in enumerate(rows):
            loss = row.get(loss_key)
            if loss is None:
                raise KeyError(f"step_fn metrics have no {loss_key!r} (got {sorted(row)})")
            if not math.isfinite(loss):
                what = describe_batch(host_batch) if describe_batch and host_batch is not None else ""
                raise NonFiniteLossError(end - num + i + 1, f"loss ({loss_key}={loss})", last_saved, what)
        window.extend(rows)
        if bar is not None and rows:
            bar.set_postfix(loss=f"{rows[-1][loss_key]:.4g}", refresh=False)

    def save(step: int) -> None:
        nonlocal last_saved
        if checkpointer is None or step == last_saved:
            return
        if not bool(_all_finite_jit(getattr(state, "params", state))):
            raise NonFiniteLossError(step, "parameters", last_saved)
        if checkpointer.save(step, state, data_iterator):
            last_saved = step

    def crossed(every: int, before: int, after: int) -> bool:
        return every > 0 and after // every > before // every

    finished = interrupted = False
    try:
        while done < num_steps:
            num = min(steps_per_call, num_steps - done)
            if checkpointer is not None:  # cut calls at checkpoint steps: the same resume points
                num = min(num, checkpointer.save_every - done % checkpointer.save_every)
            try:
                host_batch = next(batches)
            except StopIteration:
                log.warning("data exhausted after step %d (of %d); stopping", done, num_steps)
                break
            batch = prepare_batch(host_batch)
            if steps_per_call > 1:
                state, metrics = step_fn(state, batch, rng, num)
            else:
                state, metrics = step_fn(state, batch, jax.random.fold_in(rng, done) if fold_rng else rng)
            before, done = done, done + num
            n_window += num
            # Check the previous call while this one runs: keeps the device queue non-empty.
            if pending is not None:
                check(pending)
            pending = (done, num, metrics, host_batch if describe_batch else None)
            if bar is not None:
                bar.update(num)

            want_save = checkpointer is not None and checkpointer.should_save(done)
            due_hooks = [h for h in hooks if crossed(h.every, before, done)]
            want_log = crossed(log_every, before, done) or done == num_steps
            if want_log or want_save or due_hooks:
                check(pending)
                pending = None
            t_aside = time.perf_counter()
            if want_save:
                save(done)
            extra = {}
            for h in due_hooks:
                extra.update(h.fn(done, state) or {})
            t_window += time.perf_counter() - t_aside  # img/s counts training time only
            if want_log:
                _log_window(writer, bar, done, window, extra, examples_per_step, n_window, t_window, loss_key)
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
        _log_window(writer, None, done, window, {}, examples_per_step, n_window, t_window, loss_key)
    end_hooks = [h for h in hooks if h.at_end and not (h.every > 0 and done % h.every == 0)]
    if end_hooks and done > start:
        extra = {}
        for h in end_hooks:
            extra.update(h.fn(done, state) or {})
        if writer is not None and extra:
            writer.write_scalars(done, extra)
    if done > start:
        try:
            save(done)
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


def _log_window(writer, bar, step, window, extra, examples_per_step, n_steps, t0, loss_key) -> None:
    if not window and not extra:
        return
    scalars: dict[str, float] = {}
    if window:
        for k in window[-1]:
            scalars[k] = float(np.mean([w[k] for w in window if k in w]))
    dt = time.perf_counter() - t0
    if examples_per_step and n_steps and dt > 0:
        scalars["img_per_sec"] = examples_per_step * n_steps / dt
        if bar is not None:
            bar.set_postfix(loss=f"{scalars.get(loss_key, float('nan')):.4g}", img_s=f"{scalars['img_per_sec']:.1f}")
    scalars.update({k: float(np.asarray(v)) for k, v in extra.items()})
    if writer is not None:
        writer.write_scalars(step, scalars)
