"""Configuration of the joint latent model (encoders + conditional flow-matching decoders).

A plain dataclass with named variants (`get_config("quick")`) and ``key=value`` overrides
(`apply_overrides(cfg, ["steps=500", "ot=true"])`), so the CLI and tests share one source of truth.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

SOLVERS = ("euler", "midpoint", "heun", "rk4", "tsit5", "dopri5", "dopri8")
CONDITION_ON = ("input", "latent")


@dataclass(frozen=True)
class JointConfig:
    """Hyper-parameters of `fit_joint`.

    Network sizes: each conditional decoder is a `VelocityMLP` with `flow_depth` residual blocks of
    width `flow_width`; the modality encoders are MLPs of `enc_depth` x `enc_width` into
    `latent_dim`.
    """

    # joint latent (contrastive encoders)
    latent_dim: int = 32
    enc_width: int = 256
    enc_depth: int = 2
    contrastive_weight: float = 1.0
    init_temperature: float = 0.1
    # conditional flow decoders p(e|m), p(m|e)
    condition_on: str = "input"  # "input": the other modality's standardised embedding; "latent": its z (stop-grad)
    flow_width: int = 256
    flow_depth: int = 3
    cond_depth: int = 2  # Dense layers of the flows' condition encoder (runs once per solve, not per step)
    time_embed_dim: int = 128  # sinusoidal features of t
    time_max_freq: float = 10.0  # highest angular frequency of those (high = wiggly v(t) = costly ODE)
    compute_dtype: str = "float32"  # matmul input dtype ("bfloat16" halves matmul cost on AVX512-BF16)
    ot: bool = False  # minibatch (conditional) OT coupling of noise to targets
    ot_epsilon: float = 0.05  # Sinkhorn entropic regularisation, relative to the mean cost
    ot_cond_weight: float = 10.0  # weight of the condition distance in the conditional OT cost
    cfg_dropout: float = 0.0  # probability of replacing the condition by the learned null embedding
    guidance: float = 1.0  # classifier-free guidance weight at sampling (1.0 = plain conditional)
    # optimisation
    steps: int = 3000
    batch_size: int = 512
    lr: float = 1e-3
    warmup_steps: int = 100
    end_lr_fraction: float = 0.05  # cosine decay to lr * end_lr_fraction
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    steps_per_call: int = 50  # train steps fused in one jitted lax.scan (amortises dispatch)
    log_every: int = 100
    checkpoint_every: int = 1000  # with a workdir: orbax checkpoint cadence (resume point)
    num_devices: int = 0  # data-parallel devices (0 = all local devices)
    # sampling
    solver: str = "midpoint"
    solver_steps: int = 6
    solver_time_power: float = 0.7  # fixed-step grid t_i = (i/n)^power: < 1 = finer steps near t = 1
    sample_chunk: int = 1024  # rows (cells x samples) per jitted solve: small = activations stay in cache
    # data checks
    min_cells: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"JointConfig.solver={self.solver!r}; expected one of {SOLVERS}")
        if self.condition_on not in CONDITION_ON:
            raise ValueError(f"JointConfig.condition_on={self.condition_on!r}; expected one of {CONDITION_ON}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"JointConfig.compute_dtype={self.compute_dtype!r}; expected float32 or bfloat16")
        for name in ("latent_dim", "enc_width", "flow_width", "flow_depth", "steps", "batch_size", "solver_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"JointConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.solver_time_power <= 0:
            raise ValueError(f"JointConfig.solver_time_power must be > 0, got {self.solver_time_power}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"JointConfig.cfg_dropout must be in [0, 1), got {self.cfg_dropout}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "JointConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown JointConfig keys {unknown}")
        return cls(**d)


VARIANTS: dict[str, dict] = {
    "default": {},
    # a few seconds on a laptop CPU: smoke runs and the CLI's --quick
    "quick": dict(steps=600, batch_size=256, enc_width=64, flow_width=128, flow_depth=2, log_every=50,
                  warmup_steps=50, steps_per_call=50),
    # quick networks trained to convergence for the variance decomposition (`cosmic analyze --quick`,
    # the end-to-end test): at 1000 steps lr 1e-3 the conditional mean was still shrunk (slope 0.96
    # vs the true E[e|S] at truth 0.70); lr 2e-3 reaches what 2000 steps at 1e-3 reach (notes/analysis.md)
    "analysis": dict(steps=1000, lr=2e-3, batch_size=256, enc_width=64, flow_width=128, flow_depth=2,
                     log_every=50, warmup_steps=50, steps_per_call=50),
    # the benchmark network: total params comparable to CellFlow's mlp3x256 (0.92M)
    # (width 256, 3 trunk blocks, 6-layer condition encoder, 256 time features: 0.907M per flow;
    # per ODE step only the trunk runs: 0.43M)
    "bench": dict(flow_width=256, flow_depth=3, cond_depth=6, time_embed_dim=256, batch_size=1024),
}


def get_config(name: str = "default", overrides: list[str] | dict | None = None) -> JointConfig:
    """Named variant plus overrides.

    Args:
      name: one of `VARIANTS`.
      overrides: ``["key=value", ...]`` (values parsed as JSON, else kept as strings) or a dict.
    Returns:
      the frozen `JointConfig`.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown joint config variant {name!r}; choose from {sorted(VARIANTS)}")
    return apply_overrides(JointConfig(**VARIANTS[name]), overrides)


def apply_overrides(cfg: JointConfig, overrides: list[str] | dict | None) -> JointConfig:
    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        items = dict(overrides)
    else:
        items = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
            key, raw = item.split("=", 1)
            try:
                items[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                items[key.strip()] = raw
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for key, val in items.items():
        if key not in fields:
            raise ValueError(f"unknown JointConfig key {key!r}; known: {sorted(fields)}")
        default = getattr(cfg, key)
        if isinstance(default, bool):
            if isinstance(val, str):
                val = val.lower() in ("1", "true", "yes", "on")
            val = bool(val)
        elif isinstance(default, (int, float)) and not isinstance(val, (int, float)):
            raise ValueError(f"JointConfig.{key} expects a number, got {val!r}")
        elif isinstance(default, float):
            val = float(val)
        items[key] = val
    return dataclasses.replace(cfg, **items)


__all__ = ["JointConfig", "VARIANTS", "get_config", "apply_overrides", "SOLVERS"]
