"""CRCKD (Categorical Relation-Preserving Contrastive Knowledge Distillation) in JAX/Flax."""

# The package version, single source: pyproject.toml reads it (`[tool.setuptools.dynamic]`).
__version__ = "0.1.0"


def load_model(path: str, teacher: bool = False, checkpoint: str | None = None):
    """A trained model for inference (`crckd_jax.inference.load_model`): `load_model(W)(images)`
    maps uint8 RGB images [N, H, W, 3] to class probabilities [N, C]."""
    from crckd_jax.inference import load_model as load

    return load(path, teacher=teacher, checkpoint=checkpoint)
