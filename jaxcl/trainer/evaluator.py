"""Evaluation orchestration: the frozen model's jitted embedding functions,
and the method's evaluation run with them (during training, at its end, and
by `jaxcl eval`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcl import parallel, presets
from jaxcl.methods.base import Encoders
from jaxcl.models.temperature import logit_transform
from jaxcl.trainer.experiment import Experiment, TrainState


def make_embed_fns(exp: Experiment) -> dict:
  """Jitted (params, batch_stats, batch) -> embeddings: 'image' (uint8
  images) and, for a text tower, 'text' (token ids); batch-sharded. Made
  once per run, bound to each state's weights by `run_evaluation`."""
  batch = parallel.batch_sharding(exp.mesh)
  state = exp.state_sharding
  shardings = dict(in_shardings=(state.params, state.batch_stats, batch), out_shardings=batch)
  fns = {'image': jax.jit(exp.embed, **shardings)}
  if exp.method.text_tower:
    fns['text'] = jax.jit(exp.embed_text, **shardings)
    if exp.config.model.name in presets.VIT_NAMES:  # jaxcl.evaluation.patch_probe
      fns['patch_tokens'] = jax.jit(exp.patch_tokens, **shardings)
    if exp.config.decoder.weight:  # jaxcl.evaluation.decoder_eval
      fns['decoder'] = jax.jit(exp.decoder_logits, in_shardings=(
          state.params, state.batch_stats, batch, batch), out_shardings=batch)
  return fns


def run_evaluation(exp: Experiment, state: TrainState, eval_data, embed_fns,
                   workdir=None) -> dict:
  """The method's evaluation of the model in `state` on `eval_data` (from
  exp.method.open_eval_data); fractions in [0, 1]. workdir: the run's, where
  a text tower's zero-shot classifiers are cached (jaxcl.evaluation.zeroshot_cache)."""
  bind = lambda fn: functools.partial(fn, state.params, state.batch_stats)
  text, patch_tokens = embed_fns.get('text'), embed_fns.get('patch_tokens')
  decoder = embed_fns.get('decoder')
  cached = workdir is not None and text is not None
  encoders = Encoders(config=exp.config, mesh=exp.mesh, image=bind(embed_fns['image']),
                      text=bind(text) if text is not None else None, tokenizer=exp.tokenizer,
                      patch_tokens=bind(patch_tokens) if patch_tokens is not None else None,
                      decoder=bind(decoder) if decoder is not None else None,
                      workdir=workdir if cached else None, step=int(state.step),
                      weights=weights_fingerprint(state.params) if cached else '',
                      temperature=model_temperature(exp, state),
                      logit_transform=logit_transform(exp.config.temperature.mode))
  return exp.method.evaluate(encoders, eval_data)


def model_temperature(exp: Experiment, state: TrainState) -> float:
  """The model's τ at the state's step (a float)."""
  model = nnx.merge(exp.eval_graphdef, state.params, state.batch_stats)
  return float(model.temperature(state.step))


@jax.jit
def _bits_hash(params):
  """A uint32 hash of the parameters' exact bits: each leaf's float32 bits,
  weighted by their position, summed modulo 2^32. Integer sums do not depend
  on the order XLA adds in, so every mesh gets the same value; a changed bit
  changes it (up to 2^-32 collisions)."""
  total = jnp.uint32(0)
  for i, x in enumerate(jax.tree.leaves(params)):
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(i + 1)
    total = total + jnp.sum(bits * weights + (bits >> 16), dtype=jnp.uint32)
  return total


def weights_fingerprint(params) -> str:
  """A hash of the parameters' exact bits: tells two states of one step
  apart (a step trained again from an earlier checkpoint) for caches."""
  return f'{int(_bits_hash(params)):08x}'
