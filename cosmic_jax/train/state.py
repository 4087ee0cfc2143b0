"""The train state every trainer carries through the loop, the checkpoint and the shardings."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from flax import struct

from cosmic_jax.train.optim import make_optimizer


class TrainState(struct.PyTreeNode):
    """step: int32 scalar (optimizer micro-steps); params; opt_state: optax state.

    ``optim_cfg`` (resolved, frozen) and ``model_cfg`` (frozen, or None when the step closes over
    its model) are static: a step function needs nothing but the state.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    optim_cfg: ml_collections.FrozenConfigDict = struct.field(pytree_node=False)
    model_cfg: Any = struct.field(pytree_node=False, default=None)

    @property
    def tx(self):
        return make_optimizer(self.optim_cfg)

    def apply_gradients(self, grads: Any) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state)
