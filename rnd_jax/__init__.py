"""rnd_jax: randomized inference-time defenses vs query-based black-box attacks, in JAX."""

__version__ = "0.1.0"
