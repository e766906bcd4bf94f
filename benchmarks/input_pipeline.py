"""Training input pipeline: throughput and host CPU time per training image.

    python benchmarks/input_pipeline.py [--image-size 224] [--batch-size 32] [--batches 30]
        [--compare-torch [--torch-python /path/to/python-with-torch]]

Prepares a synthetic data set (HAM10000 layout, stored at the model size as raw uint8
pixels) in --workdir, then times the grain training pipeline with 1, 2 and 4 read threads
for both `data.augment` settings: 'device' (the host reads uint8 images; the step makes the
views) and 'host' (PIL makes two float32 views per image). For each it prints images/s and
the host CPU time per training image (process CPU time of all threads / images delivered,
not wall time). One more row gives the CPU cost of decoding the same images from PNG (the
format stored before), the reason the prepared data hold raw pixels. With --compare-torch,
the same images (exported as PNG files) and the same PIL transforms go through a torch
DataLoader run by --torch-python (default: this interpreter); torch is an optional
benchmark dependency and the comparison is skipped with a message without it.
"""

import argparse
import io
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crckd_jax import config as config_lib  # noqa: E402
from crckd_jax.data import pipeline, prepare  # noqa: E402

READ_THREADS = (1, 2, 4)

TORCH_SCRIPT = r"""
import math, os, sys, time
import numpy as np, torch
from PIL import Image
folder, size, batch, batches, workers = sys.argv[1], *map(int, sys.argv[2:6])
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

def view(img):
    # Resize((s, s)) -> RandomAffine(10, translate=(0.02, 0.02)) -> RandomHorizontalFlip
    # -> ToTensor -> Normalize, as torchvision does on PIL images.
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    w, h = img.size
    angle = float(torch.empty(1).uniform_(-10, 10))
    tx = int(round(float(torch.empty(1).uniform_(-0.02 * w, 0.02 * w))))
    ty = int(round(float(torch.empty(1).uniform_(-0.02 * h, 0.02 * h))))
    rot, cx, cy = math.radians(angle), w * 0.5, h * 0.5
    a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    img = img.transform((w, h), Image.AFFINE, m, resample=Image.NEAREST, fillcolor=(0, 0, 0))
    if torch.rand(1) < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
    return (x - MEAN) / STD

class Folder(torch.utils.data.Dataset):
    def __init__(self):
        self.files = sorted(os.listdir(folder))
    def __len__(self):
        return len(self.files)
    def __getitem__(self, i):
        img = Image.open(os.path.join(folder, self.files[i])).convert('RGB')
        return view(img), view(img), i % 7, i

if __name__ == '__main__':
    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(Folder(), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    done, start = -2, None
    while done < batches:
        for _ in loader:
            done += 1
            if done == 0:
                start = time.perf_counter()
            if done == batches:
                break
    print(batch * batches / (time.perf_counter() - start))
"""


def _prepare(workdir, num_images, image_size):
    config = config_lib.default_config()
    config.data.source = "synthetic"
    config.data.synthetic_num_images = num_images
    config.data.synthetic_image_size = image_size
    config.data.image_size = image_size
    config.memory.num_positives = 1
    prepare.prepare(config_lib.to_settings(config), workdir, log=lambda _: None)
    return prepare.load(workdir, 0)


def _grain_rate(data, image_size, batch, batches, threads, augment_on):
    """(images/s, host CPU ms per image) of the training pipeline after 2 warm-up batches."""
    ds = pipeline.train_dataset(
        data,
        global_batch_size=batch,
        image_size=image_size,
        num_epochs=100,
        seed=0,
        process_index=0,
        process_count=1,
        read_threads=threads,
        augment_on=augment_on,
    )
    it = iter(ds)
    for _ in range(2):  # warm-up: thread start, first reads
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    # Read-ahead threads keep reading while the last batches are consumed; their CPU time
    # belongs to images not counted here, so the figure slightly overstates the cost.
    if hasattr(it, "close"):
        it.close()
    return batch * batches / wall, cpu / (batch * batches) * 1e3


def _png_decode_ms(data, count=200):
    """Host CPU ms to decode one stored image from PNG (compress level 1), with PIL."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    encoded = []
    for record in data.fold.train[:count]:
        buffer = io.BytesIO()
        Image.fromarray(data.source[int(record)]["image"]).save(buffer, format="png",
                                                                compress_level=1)
        encoded.append(buffer.getvalue())
    start = time.process_time()
    for blob in encoded:
        np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    return (time.process_time() - start) / len(encoded) * 1e3


def _export_png(data, folder):
    os.makedirs(folder, exist_ok=True)
    from PIL import Image  # pylint: disable=g-import-not-at-top

    for i, record in enumerate(data.fold.train):
        path = os.path.join(folder, f"{i:06d}.png")
        if not os.path.exists(path):
            Image.fromarray(data.source[int(record)]["image"]).save(path)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/crckd_input_benchmark")
    parser.add_argument("--num-images", type=int, default=640)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--compare-torch", action="store_true")
    parser.add_argument("--torch-python", default=sys.executable)
    args = parser.parse_args()

    data = _prepare(args.workdir, args.num_images, args.image_size)
    print(
        f"{len(data.fold.train)} training images, {args.image_size} px, batch "
        f"{args.batch_size}, {args.batches} timed batches, {os.cpu_count()} CPUs"
    )
    print(f'{"pipeline":<44}{"images/s":>10}{"host CPU ms/image":>20}')
    for augment_on in ("device", "host"):
        for threads in READ_THREADS:
            rate, cpu_ms = _grain_rate(data, args.image_size, args.batch_size, args.batches,
                                       threads, augment_on)
            label = f"grain, augment={augment_on}, {threads} read threads"
            print(f"{label:<44}{rate:>10.0f}{cpu_ms:>20.3f}", flush=True)
    print(f'{"PNG decode only (PIL), for comparison":<44}{"":>10}'
          f"{_png_decode_ms(data):>20.3f}", flush=True)
    if not args.compare_torch:
        return
    probe = subprocess.run(
        [args.torch_python, "-c", "import torch, numpy, PIL"], capture_output=True, text=True
    )
    if probe.returncode:
        print(
            f"torch comparison skipped: {args.torch_python} cannot import torch, numpy and PIL "
            "(pass --torch-python with an interpreter that has them)"
        )
        return
    folder = _export_png(data, os.path.join(args.workdir, "png"))
    for workers in (0, 2):
        out = subprocess.run(
            [
                args.torch_python,
                "-c",
                TORCH_SCRIPT,
                folder,
                str(args.image_size),
                str(args.batch_size),
                str(args.batches),
                str(workers),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        label = f"torch DataLoader, {workers} workers"
        print(f"{label:<44}{float(out.stdout.split()[-1]):>10.0f}", flush=True)


if __name__ == "__main__":
    main()
