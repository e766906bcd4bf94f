"""The authors' own CRCKD training iteration, timed on given batches (run by step_time.py).

    python benchmarks/authors_iteration.py --repo PATH --inputs batches.npz
        (--output authors.json | --serve) [--steps 5] [--warmup 2] [--threads 2]
        [--num-positives 20] [--num-negatives 4096]

PATH is a checkout of the authors' code (github.com/hathawayxxh/CRCKD); nothing of it is
copied here. Their `train_CRCKD.py` runs unchanged, as `__main__`, with the paper's CRCKD
setting (`--ema_consistency 1 --CCD_distill 1 --CCD_b4_weight 0.1 --mode multi_pos
--nce_p P --nce_k K --CRP_distill 1`, `--begin_ema 0` so that the whole loss is computed
from the first step, one device, `--batch_size` = the batch size of the inputs). What is
changed around it, so that it runs on a CPU-only machine and times the iteration alone:

- `.cuda()` of tensors and modules returns the object itself (their code calls it
  unconditionally, also at import time);
- the ImageNet DenseNet-121 weights, which their code loads from a path on their own
  machine, are torchvision's randomly initialised ones (the time does not depend on them);
- their two DataLoaders are replaced: the train loader yields the batches of --inputs in
  turn, as their loader would collate them (student and teacher view [B, 3, H, W] float32,
  one-hot labels [B, C] float64, item indices [B], contrast indices [B, P + K]: P items of
  the item's class without replacement, then K of the other classes, drawn as their
  dataset draws them), and reports how long the loop body took between two requests; the
  test loader is never reached;
- their data set reads its train and test CSV files, written from the inputs' labels (no
  images: their loader is not used).

So one timed iteration is their whole loop body: the teacher view's rotation and flip, the
student and teacher forward passes with their attention maps, the features copied to the
host, CE + MT + CCD + CRP, backward, Adam, the EMA update, OneCycleLR, their meters and,
every 40 iterations, their TensorBoard summaries. Their data loading (12 worker processes)
is not timed.

Inputs: as `benchmarks/torch_reference.py` (`train_labels` [N], per batch i
`image_student_i`, `image_teacher_i` [B, H, W, 3] float32, `label_i`, `index_i` [B]).
Output: JSON with the step times, images/s and peak memory; with --serve, the line
protocol of torch_reference.py ("run N" -> step times and loss; "quit" -> memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import statistics
import sys
import tempfile
import time

import numpy as np

IMAGENET_WEIGHTS = "densenet121-a639ec97.pth"  # the file name their densenet121() loads


class EndOfBenchmark(Exception):
    """Raised from the train loader to leave the authors' loop."""


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--repo", required=True, help="checkout of github.com/hathawayxxh/CRCKD")
    p.add_argument("--inputs", required=True)
    p.add_argument("--output", default=None, help="JSON result file (without --serve)")
    p.add_argument("--serve", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-positives", type=int, default=20)
    p.add_argument("--num-negatives", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def write_split_csvs(folder: str, train_labels: np.ndarray, num_test: int = 8) -> None:
    """split1_train.csv / split1_test.csv in the APTOS columns their data set reads."""
    for name, labels in (("train", train_labels), ("test", train_labels[:num_test])):
        with open(os.path.join(folder, f"split1_{name}.csv"), "w") as f:
            f.write("id_code,diagnosis\n")
            f.writelines(f"item{i:05d},{int(y)}\n" for i, y in enumerate(labels))


def contrast_indices(labels, by_class, num_positives, num_negatives, rng) -> np.ndarray:
    """[B, P + K] int64: P items of each item's class (without replacement), then K items of
    the other classes (with replacement only when there are fewer than K)."""
    rows = []
    for y in labels:
        others = np.concatenate([ix for c, ix in enumerate(by_class) if c != y])
        positives = rng.choice(by_class[y], num_positives, replace=False)
        negatives = rng.choice(others, num_negatives, replace=num_negatives > len(others))
        rows.append(np.concatenate([positives, negatives]))
    return np.stack(rows).astype(np.int64)


class TimedTrainLoader:
    """Stands in for their train DataLoader: yields the prepared batches in turn and times
    the loop body between two requests; runs --warmup iterations, then (with --serve) the
    line protocol, and ends their loop with EndOfBenchmark."""

    def __init__(self, batches, num_items, args, protocol):
        self.batches, self.num_items, self.args = batches, num_items, args
        self.protocol = protocol
        self.batch_size = batches[0][1].shape[0]
        self.times: list[float] = []
        self.loss = None  # the last loss tensor their loop took backward of

    def __len__(self):  # their OneCycleLR's steps_per_epoch
        return -(-self.num_items // self.batch_size)

    def _timed(self, num_steps, offset):
        times = []
        for i in range(num_steps):
            batch = self.batches[(offset + i) % len(self.batches)]
            start = time.perf_counter()
            yield batch
            times.append(time.perf_counter() - start)
        self.times = times

    def __iter__(self):
        yield from self._timed(self.args.warmup, 0)
        done = self.args.warmup
        if not self.args.serve:
            yield from self._timed(self.args.steps, done)
            raise EndOfBenchmark
        self.protocol(json.dumps({"ready": info(self.batch_size)}))
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            yield from self._timed(int(cmd[1]), done)
            done += int(cmd[1])
            self.protocol(json.dumps({"step_s": self.times, "loss": self.last_loss()}))
        raise EndOfBenchmark

    def last_loss(self) -> float:
        return float("nan") if self.loss is None else float(self.loss)


def info(batch_size: int) -> dict:
    import torch

    return {"torch": torch.__version__, "device": "cpu",
            "mode": f"the authors' iteration, float32 NCHW threads={torch.get_num_threads()}",
            "batch_size": batch_size}


def main():
    import torch

    args = parse_args()
    if args.output:
        args.output = os.path.abspath(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Their script prints and logs to stdout; the protocol keeps the real stdout.
    protocol_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def protocol(line):
        protocol_out.write(line + "\n")
        protocol_out.flush()

    data = np.load(args.inputs)
    train_labels = data["train_labels"].astype(np.int64)
    num_classes = int(train_labels.max()) + 1
    by_class = [np.flatnonzero(train_labels == c) for c in range(num_classes)]
    rng = np.random.default_rng(args.seed)
    batches = []
    for i in range(len([k for k in data.files if k.startswith("label_")])):
        to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
        label = data[f"label_{i}"].astype(np.int64)
        batches.append(((to_nchw(data[f"image_student_{i}"]),
                         to_nchw(data[f"image_teacher_{i}"])),
                        torch.from_numpy(np.eye(num_classes)[label]),
                        torch.from_numpy(data[f"index_{i}"].astype(np.int64)),
                        torch.from_numpy(contrast_indices(label, by_class, args.num_positives,
                                                          args.num_negatives, rng))))
    batch_size = batches[0][1].shape[0]
    loader = TimedTrainLoader(batches, len(train_labels), args, protocol)

    class Loaders:
        """Their `DataLoader(...)` calls: the shuffled one is the train loader."""

        def __new__(cls, dataset, batch_size=1, shuffle=False, **kwargs):
            if shuffle:
                return loader
            return []

    load = torch.load

    def load_or_random_densenet(path, *a, **k):
        if str(path).endswith(IMAGENET_WEIGHTS) and not os.path.exists(path):
            import torchvision
            return torchvision.models.densenet121().state_dict()
        return load(path, *a, **k)

    torch.load = load_or_random_densenet
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.utils.data.DataLoader = Loaders
    backward = torch.Tensor.backward

    def recording_backward(self, *a, **k):
        loader.loss = self.detach()
        return backward(self, *a, **k)

    torch.Tensor.backward = recording_backward

    work = tempfile.TemporaryDirectory()
    write_split_csvs(work.name, train_labels)
    script = os.path.join(os.path.abspath(args.repo), "train_CRCKD.py")
    if not os.path.isfile(script):
        sys.exit(f"error: {script} not found: --repo must be a checkout of "
                 "github.com/hathawayxxh/CRCKD")
    sys.argv = [script, "--root_path", work.name + "/", "--csv_file_path", work.name + "/",
                "--which_split", "split1", "--exp", "benchmark", "--gpu", "0",
                "--batch_size", str(batch_size), "--labeled_bs", str(batch_size),
                "--n_data", str(len(train_labels)), "--ema_consistency", "1",
                "--CCD_distill", "1", "--CCD_b4_weight", "0.1", "--mode", "multi_pos",
                "--nce_p", str(args.num_positives), "--nce_k", str(args.num_negatives),
                "--CRP_distill", "1", "--begin_ema", "0", "--seed", str(args.seed)]
    sys.path.insert(0, os.path.dirname(script))
    os.chdir(work.name)  # their results and logs go under ./5cv_results
    try:
        runpy.run_path(script, run_name="__main__")
    except EndOfBenchmark:
        pass
    else:
        sys.exit("error: the authors' script ended before the benchmark's steps")
    memory = {"host_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
              "device_peak_mb": None}
    if args.serve:
        protocol(json.dumps({"memory": memory}))
        return
    median = statistics.median(loader.times)
    with open(args.output, "w") as f:
        json.dump({**info(batch_size), "step_s": loader.times, "median_step_s": median,
                   "img_s": batch_size / median, "loss": loader.last_loss(), **memory}, f)


if __name__ == "__main__":
    main()
