"""MAE pretraining run configs: named variants plus dotted ``key=value`` overrides.

``get_config("vit_s8_64", ["optim.lr=3e-4", "model.mask_ratio=0.6", "mesh.fsdp=2"])``:

- ``model.X=...`` sets MAEConfig field X (kept as ``model_overrides``, resolved by
  ``configs.mae.get_model_config``);
- ``optim.X``, ``loader.X``, ``loader.augment.X``, ``mesh.X``, ``distributed.X`` set fields of
  the nested configs; anything else is a top-level field (``steps``, ``seed``, ``ckpt_every``...).

``optim.total_steps=-1`` (the named variants' default) means "cosine decay over ``steps``".
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from cosmic_jax.data.augment import AugmentConfig
from cosmic_jax.data.loader import LoaderConfig
from cosmic_jax.train.optim import OptimConfig, resolve_microbatch
from cosmic_jax.train.sharding import DistributedConfig, MeshConfig


@dataclasses.dataclass
class PretrainConfig:
    """Everything a ``cosmic pretrain`` run depends on (saved as ``W/config.json``)."""

    model: str = "vit_test"  # configs.mae.MODEL_CONFIGS name
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loader: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_ckpts: int = 3
    async_ckpt: bool = True
    recon_every: int = 500  # 0 = off; PNG grids in W/recon/
    recon_images: int = 8
    probe_every: int = 0  # 0 = off; kNN/linear probe on labelled crops
    # Also probe the random-init model at step 0 of a fresh run: the baseline that training must beat
    # (a random ViT already separates easy classes, so "above chance" alone says little).
    probe_at_start: bool = True
    probe_data: str = ""  # crop dataset with labels in meta; "" = the training data
    probe_label: str = "cell_type"  # meta key holding the class label
    probe_max: int = 1024  # crops used by the probe
    log_batch_indices: bool = False  # write W/batch_indices.p<i>.jsonl (data-order checks)
    progress: bool = True

    def resolved_optim(self, num_devices: int | None = None, platform: str | None = None) -> OptimConfig:
        """The optimizer config with its "auto" values made concrete: ``total_steps=-1`` -> ``steps``,
        ``microbatch=-1`` -> per ``resolve_microbatch`` for the mesh's device count and platform
        (default: all of JAX's devices)."""
        optim = self.optim
        if optim.total_steps < 0:
            optim = dataclasses.replace(optim, total_steps=self.steps)
        if optim.microbatch < 0:
            import jax

            optim = resolve_microbatch(optim, self.loader.global_batch,
                                       jax.device_count() if num_devices is None else num_devices,
                                       platform or jax.default_backend())
        return optim


def _variant(model: str, lr: float, batch: int, steps: int, warmup: int, **kw) -> PretrainConfig:
    return PretrainConfig(
        model=model,
        optim=OptimConfig(lr=lr, warmup_steps=warmup, total_steps=-1, weight_decay=0.05, clip_norm=1.0,
                          microbatch=-1),
        loader=LoaderConfig(global_batch=batch),
        steps=steps,
        **kw,
    )


CONFIGS: dict[str, Any] = {
    # unit tests / CPU demo: 32x32 crops, 16 patches, seconds per 100 steps
    "test": lambda: _variant("vit_test", 1e-3, 32, 200, 10, log_every=10, ckpt_every=100, recon_every=100),
    # 64x64 nuclei crops (the peer benchmark models)
    "vit_t8_64": lambda: _variant("vit_t8_64", 1.5e-4 * 256 / 128, 256, 50_000, 2_000),
    "vit_s8_64": lambda: _variant("vit_s8_64", 1.5e-4 * 256 / 128, 256, 100_000, 5_000),
    "vit_b16_128": lambda: _variant("vit_b16_128", 1.5e-4 * 512 / 256, 512, 100_000, 5_000),
}


def _parse_value(text: str, current: Any, hint: Any, where: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool) or hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"override {where}={text!r}: expected true/false")
        return text.lower() in ("true", "1", "yes")
    for typ in (int, float):
        if isinstance(current, typ) or hint is typ:
            try:
                return typ(float(text)) if typ is int and "e" in text.lower() else typ(text)
            except ValueError as e:
                raise ValueError(f"override {where}={text!r}: expected {typ.__name__}") from e
    if isinstance(current, str):
        return text
    try:  # None / optional / containers: JSON syntax ("1.0", "[1,2]", "0.5")
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _field_hint(obj: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    hint = hints.get(name)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else hint


def _set(obj: Any, path: list[str], text: str, where: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        raise KeyError(f"override {where!r}: {type(obj).__name__} has no field {head!r}; known: {sorted(names)}")
    current = getattr(obj, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise KeyError(f"override {where!r}: {head!r} is not a nested config")
        value = _set(current, path[1:], text, where)
    else:
        if dataclasses.is_dataclass(current):
            raise KeyError(f"override {where!r}: {head!r} is a config group; set {head}.<field>")
        value = _parse_value(text, current, _field_hint(obj, head), where)
    return dataclasses.replace(obj, **{head: value})


def apply_overrides(cfg: PretrainConfig, overrides: list[str] | None) -> PretrainConfig:
    """Apply ``["a.b=v", ...]``; errors name the offending override."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        path = key.split(".")
        if path[0] == "model" and len(path) == 2:
            from cosmic_jax.configs.mae import get_model_config

            mo = dict(cfg.model_overrides, **{path[1]: text})
            get_model_config(cfg.model, **mo)  # validate now, with a clear error
            cfg = dataclasses.replace(cfg, model_overrides=mo)
        else:
            cfg = _set(cfg, path, text, key)
    return cfg


def get_config(name: str, overrides: list[str] | None = None) -> PretrainConfig:
    """Named pretraining config with ``key=value`` overrides applied.

    Args:
      name: one of ``CONFIGS`` ("test", "vit_t8_64", "vit_s8_64", "vit_b16_128").
      overrides: dotted ``key=value`` strings.

    Returns:
      a PretrainConfig.
    """
    if name not in CONFIGS:
        raise KeyError(f"unknown pretrain config {name!r}; known: {sorted(CONFIGS)}")
    return apply_overrides(CONFIGS[name](), overrides)


def config_from_dict(d: dict[str, Any]) -> PretrainConfig:
    """Inverse of the JSON written to ``W/config.json`` (extra keys such as ``model_config`` ignored)."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    kw = {k: v for k, v in d.items() if k in known}
    if "optim" in kw:
        kw["optim"] = OptimConfig(**kw["optim"])
    if "loader" in kw:
        lo = dict(kw["loader"])
        if "augment" in lo:
            lo["augment"] = AugmentConfig(**lo["augment"])
        kw["loader"] = LoaderConfig(**lo)
    if "mesh" in kw:
        kw["mesh"] = MeshConfig(**kw["mesh"])
    if "distributed" in kw:
        kw["distributed"] = DistributedConfig(**kw["distributed"])
    return PretrainConfig(**kw)
