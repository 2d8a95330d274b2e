"""Evaluation of a frozen model's embeddings, as the methods run it.

The modules, each importing only those above it:

- zeroshot_lists: class names and prompt templates of the standard
  benchmarks (plain data).
- probes: weighted kNN and a linear probe on frozen features, in JAX.
- zeroshot_cache: zero-shot classifiers kept beside a run, keyed by an
  exact hash of the weights.
- zeroshot_suite: `eval.zeroshot` and `eval.retrieval`, the benchmark
  suite a two-tower model is scored on.

When and on which state evaluation runs is the trainer's
(jaxcl.trainer.evaluator).
"""
