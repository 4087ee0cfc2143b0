"""End-to-end demo on embedded default data (what `make demo` runs).

Stages, each through the same `cosmic` commands a user would type:
  1. real nuclei crops from the fluorescence images shipped in installed packages;
  2. a synthetic IRIS-like paired dataset with known ground truth;
  3. `cosmic analyze --quick`: pretrain a small MAE, embed, fit the joint model, run the analyses;
  4. `cosmic report`: a Markdown report with figures, compared against the generator's truth.

  python experiments/demo.py --out demo_out [--cells 3000] [--steps 300] [--config.KEY=VALUE ...]

(``--config.KEY=VALUE`` overrides go to `cosmic analyze`, e.g. ``--config.joint.steps=200``.)

Running it again resumes: OUT/demo_state.json records the settings each stage was built with, a
stage whose outputs are complete and were built with the same settings (and from the same
upstream outputs) is skipped, an interrupted analysis resumes from its caches, and anything
else is rebuilt: its old output is moved aside and deleted only once the new one is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import shutil
import sys
import time
import uuid
from typing import Any, Callable

from cosmic_jax.cli import main as cosmic_main

STATE_FILE = "demo_state.json"
log = logging.getLogger("demo")


@dataclasses.dataclass
class Stage:
    """One demo stage: ``run`` builds ``path``; ``complete`` says whether ``path`` holds a finished output."""

    name: str
    title: str
    path: str
    params: Callable[[], dict[str, Any]]  # what the output depends on (called when the stage starts)
    run: Callable[[], None]
    complete: Callable[[], bool]
    resumable: bool = False  # an interrupted run may continue in place (with the same params)


def _json_ok(path: str, *keys: str) -> bool:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and all(d.get(k) for k in keys)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def crops_complete(crops_dir: str) -> bool:
    """A crop dataset whose manifests parse and list records."""
    paths = glob.glob(os.path.join(crops_dir, "manifest*.json"))
    return bool(paths) and all(_json_ok(p, "num_records", "shards") for p in paths)


def synthetic_complete(data_dir: str) -> bool:
    h5ad = os.path.join(data_dir, "cells.h5ad")
    return (os.path.isfile(h5ad) and os.path.getsize(h5ad) > 0 and _json_ok(os.path.join(data_dir, "truth.json"))
            and crops_complete(os.path.join(data_dir, "crops")))


def analysis_complete(workdir: str) -> bool:
    return _json_ok(os.path.join(workdir, "analysis", "summary.json"), "expr_var_explained_by_morph")


class Demo:
    """The demo's stages over one output folder, with the resume bookkeeping in OUT/demo_state.json."""

    def __init__(self, out: str, cells: int, shared_fraction: float, seed: int, analyze_overrides: list[str],
                 cosmic: Callable[[list[str]], int] = cosmic_main):
        self.out = os.path.abspath(out)
        self.cosmic_fn = cosmic
        self.nuclei = os.path.join(self.out, "nuclei")
        self.synthetic = os.path.join(self.out, "synthetic")
        self.workdir = os.path.join(self.out, "analysis_run")
        self.report = os.path.join(self.out, "report.md")
        self.state_path = os.path.join(self.out, STATE_FILE)
        self.state = self._load_state()
        synth_params = {"cells": cells, "seed": seed, "shared_fraction": shared_fraction}
        self.stages = [
            Stage("nuclei", "real nuclei crops from shipped fluorescence images", self.nuclei, dict,
                  lambda: self.cosmic(["data", "nuclei", "--demo", "--out", self.nuclei]),
                  lambda: crops_complete(self.nuclei)),
            Stage("synthetic", "synthetic IRIS-like paired dataset", self.synthetic, lambda: dict(synth_params),
                  lambda: self.cosmic(["data", "synthetic", "--out", self.synthetic, "--cells", str(cells),
                                       "--seed", str(seed), "--shared-fraction", str(shared_fraction)]),
                  lambda: synthetic_complete(self.synthetic)),
            Stage("analyze", "pretrain MAE, embed, fit joint model, analyses", self.workdir,
                  lambda: {"overrides": analyze_overrides, "synthetic": self.state["synthetic"].get("build")},
                  lambda: self.cosmic(["analyze", "--data", self.synthetic, "--workdir", self.workdir, "--quick",
                                       *analyze_overrides]),
                  lambda: analysis_complete(self.workdir), resumable=True),
        ]

    def cosmic(self, argv: list[str]) -> None:
        rc = self.cosmic_fn(argv)
        if rc:
            raise SystemExit(f"demo: `cosmic {' '.join(argv)}` failed (exit {rc}); fix the cause and run the demo "
                             "again: finished stages are kept")

    def _load_state(self) -> dict[str, dict]:
        try:
            with open(self.state_path) as f:
                state = json.load(f)
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}  # no (or an unreadable) record: every stage is rebuilt

    def _save_state(self) -> None:
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.state_path)

    def run_stage(self, i: int, stage: Stage) -> str:
        """Skip, resume or rebuild ``stage``; returns what happened ("skipped" | "resumed" | "built")."""
        print(f"\n=== {i}/{len(self.stages) + 1} {stage.title} ===", flush=True)
        params, rec = stage.params(), self.state.get(stage.name) or {}
        same = rec.get("params") == params
        if same and rec.get("done") and stage.complete():
            print(f"demo: {stage.name}: complete in {stage.path} with the same settings; skipped "
                  f"(built in {rec.get('seconds', 0):.0f} s)", flush=True)
            return "skipped"
        resume = same and stage.resumable and os.path.exists(stage.path)
        aside = stage.path + ".old"
        if os.path.exists(stage.path) and not resume:
            why = "settings changed" if rec and not same else "incomplete or unrecorded"
            _remove(aside)  # left by an earlier interrupted rebuild: older than stage.path
            os.rename(stage.path, aside)
            print(f"demo: {stage.name}: {why}; rebuilding (the old output waits in {aside} until then)", flush=True)
        elif resume:
            print(f"demo: {stage.name}: resuming the interrupted run in {stage.path}", flush=True)
        self.state[stage.name] = {"params": params, "done": False}
        self._save_state()
        t = time.perf_counter()
        stage.run()
        if not stage.complete():
            raise SystemExit(f"demo: {stage.name}: the command finished but {stage.path} is incomplete")
        self.state[stage.name] = {"params": params, "done": True, "seconds": round(time.perf_counter() - t, 1),
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "build": uuid.uuid4().hex}
        self._save_state()
        _remove(aside)
        return "resumed" if resume else "built"

    def run(self) -> dict[str, str]:
        """Every stage, then the report (always rebuilt: it is cheap and reads only finished outputs)."""
        os.makedirs(self.out, exist_ok=True)
        t0 = time.perf_counter()
        done = {s.name: self.run_stage(i, s) for i, s in enumerate(self.stages, 1)}
        print(f"\n=== {len(self.stages) + 1}/{len(self.stages) + 1} report ===", flush=True)
        t = time.perf_counter()
        self.cosmic(["report", "--workdir", self.workdir, "--out", self.report, "--nuclei", self.nuclei])
        print("\nstage      seconds  this run")
        for s in self.stages:
            print(f"{s.name:<10} {self.state[s.name]['seconds']:>7.1f}  {done[s.name]}")
        print(f"{'report':<10} {time.perf_counter() - t:>7.1f}  built")
        print(f"\nreport: {self.report}\ntotal {(time.perf_counter() - t0) / 60:.1f} min this run", flush=True)
        return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Other --config.KEY=VALUE arguments "
                                "are passed to `cosmic analyze`.")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--cells", type=int, default=3000)
    p.add_argument("--shared-fraction", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="MAE pretraining steps (default: analyze --quick's)")
    args, extra = p.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: exists and is not a folder")
    overrides = ([f"--config.pretrain.steps={args.steps}"] if args.steps else []) + extra
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        Demo(args.out, args.cells, args.shared_fraction, args.seed, overrides).run()
    except KeyboardInterrupt:
        print("\ndemo: interrupted; run it again to resume (finished stages are kept)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
