"""The default job: synthetic dermoscopy-like images in the HAM10000 layout, small model.

`--config demo` (or `--config configs/demo.py` in a clone) runs on a laptop CPU in minutes;
`--config demo:tiny` is a smaller variant (fewer images, one short epoch) for tests.
"""

from crckd_jax import config as config_lib


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise config_lib.ConfigError(f"unknown config argument {arg!r}: expected '' or 'tiny'")
    config = config_lib.default_config()
    config.seed = 0
    config.data.source = "synthetic"
    config.data.image_size = 64
    config.data.synthetic_num_images = 500
    config.data.synthetic_image_size = 64
    config.model.name = "densenet_small"
    config.train.epochs = 40
    config.train.batch_size = 16
    config.train.checkpoint_every_steps = 0
    config.memory.num_positives = 4
    config.memory.num_negatives = 256
    config.memory.queue_size = 32
    config.loss.rampup_epochs = 15  # the reference's schedule (30 of 80 epochs), scaled down
    config.loss.begin_epoch = 8  # MT and CRP start (reference: epoch 20 of 80)
    if arg == "tiny":
        config.data.synthetic_num_images = 140
        config.data.image_size = 32
        config.data.synthetic_image_size = 32
        config.train.epochs = 1
        config.train.batch_size = 8
        config.train.steps_per_epoch = 2
        config.memory.num_positives = 2
        config.memory.num_negatives = 32
        config.memory.queue_size = 8
        config.loss.rampup_epochs = 1
        config.loss.begin_epoch = 0
    config.lock()
    return config
