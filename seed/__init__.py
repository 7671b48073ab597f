"""seed: self-supervised distillation (SEED) and ensemble distillation (MEAL V2)."""

__version__ = "0.1.0"
