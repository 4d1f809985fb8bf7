"""The embedded benchmark: a seeded world of invented people, a tiny pretrained LLaMA that
knows it, and the unlearning sweeps behind ``jax-unlearn demo`` and ``jax-unlearn sweep``."""
