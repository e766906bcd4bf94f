"""The DenseNet-BC sizes by name: what `model.name` selects (no JAX, so the config schema
can list the names without starting it)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DenseNetConfig:
    """DenseNet-BC hyper-parameters, as in torchvision's ``DenseNet`` constructor."""

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int

    def __post_init__(self):
        # Accept lists / numpy values (e.g. read from an .npz) while staying hashable.
        object.__setattr__(self, "growth_rate", int(self.growth_rate))
        object.__setattr__(self, "block_config", tuple(int(n) for n in self.block_config))
        object.__setattr__(self, "num_init_features", int(self.num_init_features))
        object.__setattr__(self, "bn_size", int(self.bn_size))

    @property
    def num_features(self) -> int:
        """Channels of the final feature map (input size of the classifier)."""
        channels = self.num_init_features
        for i, num_layers in enumerate(self.block_config):
            channels += num_layers * self.growth_rate
            if i != len(self.block_config) - 1:
                channels //= 2
        return channels


DENSENET_PRESETS: dict[str, DenseNetConfig] = {
    "densenet121": DenseNetConfig(32, (6, 12, 24, 16), 64, 4),
    "densenet169": DenseNetConfig(32, (6, 12, 32, 32), 64, 4),
    "densenet201": DenseNetConfig(32, (6, 12, 48, 32), 64, 4),
    # Configuration of the torchvision parity fixture (tests/fixtures/densenet_small.npz).
    "densenet_small": DenseNetConfig(8, (2, 3, 2, 2), 16, 2),
    # Smallest useful network, for fast CPU tests.
    "densenet_tiny": DenseNetConfig(4, (1, 1, 1, 1), 8, 2),
}


def densenet_config(name: str) -> DenseNetConfig:
    """Returns the preset called ``name``; raises ValueError naming the known presets."""
    try:
        return DENSENET_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown DenseNet preset {name!r}; known presets: {sorted(DENSENET_PRESETS)}"
        ) from None
