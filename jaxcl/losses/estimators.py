"""Per-anchor estimates of the softmax's negative term that outlive the batch.

InfoNCE's anchor i pays -x_ii + log Σ_j exp(x_ij), and a batch of N sees only
N - 1 of the dataset's negatives in that sum: small batches estimate it
poorly, which is why contrastive learning wants big ones. SogCLR (Yuan et
al., ICML 2022; FastCLIP, Wei et al. 2024, for CLIP) keeps, per training
example and anchor, a moving average u_i of the batch's mean negative term

  g_i = (1 / |negatives|) Σ_{j negative} exp(x_ij),   u_i <- (1 - γ) u_i + γ g_i,

and steps along -∇x_ii + Σ_j exp(x_ij) / (|negatives| u_i) ∇x_ij: the
gradient of the global negatives-only objective -x_ii + log mean_j exp(x_ij)
with the batch's g_i replaced by the average over the steps that saw anchor
i. With γ = 1 it is that objective's batch gradient.

The averages are kept as log u (the exponentials of x = s / τ overflow
float32 at small τ); -inf marks an anchor not seen yet, whose first average
is its batch's g_i (the papers start from u = 0, which overweights the first
epoch by 1 / γ).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

NOT_SEEN = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Moving:
  """SogCLR's state for the anchors of one loss call: log_u float32 [n, ...]
  (one per anchor, NOT_SEEN for a new one) and γ, the batch's weight."""
  log_u: jax.Array
  gamma: float = dataclasses.field(metadata=dict(static=True))

  def step(self, lse_negatives, positive, negative_mean, num_negatives):
    """(terms [n], the state after this step): see `sogclr_terms`."""
    del negative_mean
    terms, log_u = sogclr_terms(lse_negatives, positive, self, num_negatives)
    return terms, dataclasses.replace(self, log_u=log_u)

  def anchor_temperature(self, temperature):
    """The τ of the loss's anchors: the model's."""
    return temperature

  def rows(self) -> dict:
    """The state as per-example rows (TrainState.per_example's tables)."""
    return {'log_u': self.log_u}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Individual:
  """iSogCLR's state (Qiu et al., ICML 2023; temperature.mode=individual) for
  the anchors of one loss call, each [n, ...]: SogCLR's log u, the anchor's
  own τ (the loss's temperature for its row) and the moving average of its
  τ-gradient. Each anchor's term is τ_i log g_i + τ_i ρ, a KL-constrained
  robust loss whose τ_i the anchor learns. With u_i = g_i its gradient is
  ρ - KL(softmax over the negatives ‖ uniform): τ_i falls while that softmax
  is closer to uniform than ρ allows and rises when a few negatives dominate
  it, settling where the KL is ρ (a low ρ: higher τ)."""
  log_u: jax.Array
  tau: jax.Array
  moment: jax.Array
  gamma: float = dataclasses.field(metadata=dict(static=True))
  beta: float = dataclasses.field(metadata=dict(static=True))
  eta: float = dataclasses.field(metadata=dict(static=True))
  rho: float = dataclasses.field(metadata=dict(static=True))
  tau_min: float = dataclasses.field(metadata=dict(static=True))
  tau_max: float = dataclasses.field(metadata=dict(static=True))

  def step(self, lse_negatives, positive, negative_mean, num_negatives):
    """(terms [n], the state after this step).

    The model's gradient is SogCLR's times τ_i (stopped): the gradient of
    τ_i log g_i in the similarities, as the paper's objective has it. τ_i's
    own gradient, from the new u_i, is
    G_i = log u_i + ρ - Σ_j exp(x_ij) x_ij / (|negatives| u_i)
    (negative_mean: Σ_j p_ij x_ij under the softmax over the negatives), its
    moving average m_i <- (1 - β) m_i + β G_i, and
    τ_i <- clip(τ_i - η m_i, τ_min, τ_max).
    """
    terms, log_u = sogclr_terms(lse_negatives, positive, Moving(self.log_u, self.gamma),
                                num_negatives)
    terms = jax.lax.stop_gradient(self.tau) * terms
    share = jnp.exp(jax.lax.stop_gradient(lse_negatives) - jnp.log(jnp.float32(num_negatives))
                    - log_u)  # g_i / u_i
    gradient = log_u + self.rho - share * jax.lax.stop_gradient(negative_mean)
    moment = (1.0 - self.beta) * self.moment + self.beta * gradient
    tau = jnp.clip(self.tau - self.eta * moment, self.tau_min, self.tau_max)
    return terms, dataclasses.replace(self, log_u=log_u, tau=tau, moment=moment)

  def anchor_temperature(self, temperature):
    """The τ of the loss's anchors: each anchor's own, not the model's."""
    del temperature
    return self.tau

  def rows(self) -> dict:
    """The state as per-example rows (TrainState.per_example's tables)."""
    return {'log_u': self.log_u, 'tau': self.tau, 'tau_moment': self.moment}


State = Union[Moving, Individual]


def new_tables(num_rows: int, temperature_config) -> dict:
  """Per-example tables for num_rows examples of two anchors each (SimCLR's
  views; CLIP's image and caption), every anchor not seen yet; with
  temperature.mode=individual each anchor's τ at temperature.init."""
  tables = {'log_u': jnp.full((num_rows, 2), NOT_SEEN, jnp.float32)}
  if temperature_config.mode == 'individual':
    tables.update(tau=jnp.full((num_rows, 2), temperature_config.init, jnp.float32),
                  tau_moment=jnp.zeros((num_rows, 2), jnp.float32))
  return tables


def from_rows(rows: dict, loss_config, temperature_config) -> State | None:
  """The estimator's state for a batch's rows of those tables (None for no
  tables: the batch's own estimate), its hyperparameters from the config's
  loss and temperature groups."""
  if not rows:
    return None
  if 'tau' not in rows:
    return Moving(rows['log_u'], loss_config.sogclr_gamma)
  t = temperature_config
  return Individual(rows['log_u'], rows['tau'], rows['tau_moment'],
                    gamma=loss_config.sogclr_gamma, beta=t.individual_beta,
                    eta=t.individual_eta, rho=t.individual_rho, tau_min=t.min, tau_max=t.max)


def sogclr_terms(lse_negatives: jax.Array, positive: jax.Array, moving: Moving,
                 num_negatives: int) -> tuple[jax.Array, jax.Array]:
  """(terms [n], new log u [n]) of n anchors.

  lse_negatives: [n] log Σ_{j negative} exp(x_ij), differentiable; positive:
  [n] x_ii; moving.log_u: [n]. Σ_i terms_i has SogCLR's gradient (the module
  docstring), u_i being the updated average; its value is not a loss.
  """
  log_count = jnp.log(jnp.float32(num_negatives))
  log_batch = jax.lax.stop_gradient(lse_negatives) - log_count
  gamma = jnp.float32(moving.gamma)
  averaged = jnp.logaddexp(jnp.log1p(-gamma) + moving.log_u, jnp.log(gamma) + log_batch)
  new_log_u = jnp.where(jnp.isfinite(moving.log_u), averaged, log_batch)
  terms = -positive + jnp.exp(lse_negatives - log_count - jax.lax.stop_gradient(new_log_u))
  return terms, new_log_u
