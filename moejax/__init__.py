"""moejax: Mixture-of-Experts inference in JAX."""
