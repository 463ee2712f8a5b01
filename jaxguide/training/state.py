"""The train state (parameters, optimizer state, EMA) and the sharded, jitted train step.

Patterned on the Flax imagenet example (create_train_state / train_step) and vdm (EMA inside the
state, per-step keys from `fold_in(rng, step)`). The batch is split over a `data` mesh axis of
every device of every process; one device is the same code path.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxguide import data, parallel
from jaxguide.diffusion.losses import LossFn


class TrainState(flax.struct.PyTreeNode):
  """Parameters, their EMA, the optimizer state and the run's base key; `step` counts updates."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.999)

  def apply_gradients(self, grads) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    # EMA warm-up (as in TF's ExponentialMovingAverage with num_updates): short runs still get a
    # useful average instead of one dominated by the random initialisation.
    decay = jnp.minimum(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
    ema = optax.incremental_update(params, self.ema_params, 1.0 - decay)
    return self.replace(step=self.step + 1, params=params, ema_params=ema, opt_state=opt_state)

  def checkpoint_tree(self) -> dict[str, Any]:
    """What a checkpoint holds: everything but the static optimizer definition."""
    return {"step": self.step, "params": self.params, "ema_params": self.ema_params,
            "opt_state": self.opt_state, "rng": self.rng}

  def from_checkpoint_tree(self, tree: dict[str, Any]) -> "TrainState":
    return self.replace(**tree)


def make_optimizer(tc: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW after global-norm clipping, with linear warm-up then constant or cosine learning rate."""
  warmup = max(int(tc.warmup_steps), 1)
  if tc.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(int(tc.steps), warmup + 1),
                                            end_value=0.1 * tc.lr)
  else:
    lr = optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warmup), optax.constant_schedule(tc.lr)],
                              [warmup])
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                     optax.adamw(lr, weight_decay=tc.weight_decay))


def create_train_state(key: jax.Array, model: flax.linen.Module, init_args: tuple,
                       tx: optax.GradientTransformation, ema_decay: float) -> TrainState:
  init_key, state_key = jax.random.split(key)
  params = jax.jit(model.init)(init_key, *init_args)["params"]
  # The EMA gets its own buffers: the train step donates the state, and one buffer cannot be
  # donated twice.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), rng=state_key, tx=tx, ema_decay=ema_decay)


def make_train_step(loss_fn: LossFn, mesh: jax.sharding.Mesh) -> Callable:
  """One jitted update: the state replicated, the batch split over `data`, the state donated.
  The batch is a host batch as placed (`data.model_batch` converts uint8 images inside the step).

  Under jit with a sharded batch the mean loss is over the global batch, so gradients are
  averaged across devices by XLA; no pmean by hand.
  """
  def train_step(state: TrainState, batch):
    batch = data.model_batch(batch)   # uint8 pixels from the host become float32 here
    key = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.apply_gradients(grads), metrics

  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(rep, shard), out_shardings=(rep, rep), donate_argnums=0)
