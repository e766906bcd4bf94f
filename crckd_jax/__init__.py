"""CRCKD (Categorical Relation-Preserving Contrastive Knowledge Distillation) in JAX/Flax."""

# The package version, single source: pyproject.toml reads it (`[tool.setuptools.dynamic]`).
__version__ = "0.1.0"
