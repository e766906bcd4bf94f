"""The reference CRCKD train step in PyTorch, timed on given batches (run by step_time.py).

    python benchmarks/torch_reference.py --inputs batches.npz (--output torch.json | --serve)
        [--model densenet121] [--steps 5] [--warmup 2] [--amp] [--channels-last]
        [--device cpu|cuda] [--threads 2]

Written for the benchmark, after the authors' code (github.com/hathawayxxh/CRCKD; the torch
transcription of their training iteration used by the tests is described in
tests/fixtures/README.md, section `train_steps.npz`): a torchvision DenseNet student and its
EMA teacher (train-mode BatchNorm, no-grad forward) with the CRCKD head (ReLU -> global
average pool -> fc_layer to 128 -> classifier), the CCD projections embed_s / embed_t
(Linear 128 -> 128, l2-normalised), the bank memory (one student and one teacher row per
training item): P positives of the item's class and K negatives of the other classes per
item, column 0 overwritten with the item's own row, rows gathered and scored with a batched
matmul, Z set on first use and frozen, NCE loss, momentum update, CRP against the class
centres of the updated memory; class-weighted CE, softmax-KL mean-teacher consistency;
Adam(weight_decay=5e-4) + OneCycleLR; the EMA update with alpha = min(1 - 1/(step + 1),
0.99). Weights as the paper: CE + lambda MT + 0.1 CCD + 1.0 CRP. The teacher view is turned
by a random multiple of 90 degrees and flipped, and the contrast indices are drawn, inside
the timed step (the JAX step does both on device).

Inputs: an .npz with `train_labels` [N] and, per batch i, `image_student_i`,
`image_teacher_i` [B, H, W, 3] float32, `label_i`, `index_i` [B] int32.
Output: JSON with the step times, images/s and peak memory; with --serve, the process stays
up after warm-up and runs steps on request, so that step_time.py can interleave rounds of
JAX and torch steps (fair timing on a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", required=True)
    p.add_argument("--output", default=None, help="JSON result file (without --serve)")
    p.add_argument("--serve", action="store_true",
                   help="after warm-up, run steps on request (see main) for interleaved timing")
    p.add_argument("--model", default="densenet121")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--num-positives", type=int, default=20)
    p.add_argument("--num-negatives", type=int, default=4096)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None)
    return p.parse_args()


# (growth_rate, block_config, num_init_features, bn_size), as crckd_jax's presets.
DENSENET_PRESETS = {
    "densenet121": (32, (6, 12, 24, 16), 64, 4),
    "densenet169": (32, (6, 12, 32, 32), 64, 4),
    "densenet201": (32, (6, 12, 48, 32), 64, 4),
    "densenet_small": (8, (2, 3, 2, 2), 16, 2),
    "densenet_tiny": (4, (1, 1, 1, 1), 8, 2),
}


class CRCKDNet(nn.Module):
    """torchvision DenseNet features + the CRCKD head; returns (feature4, logits)."""

    def __init__(self, arch: str, num_classes: int, hidden_dim: int):
        super().__init__()
        growth, blocks, init_features, bn_size = DENSENET_PRESETS[arch]
        net = torchvision.models.DenseNet(growth, blocks, init_features, bn_size)
        self.features = net.features
        self.fc_layer = nn.Linear(net.classifier.in_features, hidden_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x))
        out = F.adaptive_avg_pool2d(out, (1, 1)).flatten(1)
        feature = self.fc_layer(out)
        return feature, self.classifier(feature)


class Embed(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.view(x.shape[0], -1))
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class BankMemory(nn.Module):
    """The reference ContrastMemory: memory_v1 (student), memory_v2 (teacher), Z frozen."""

    def __init__(self, dim, num_items, temperature=0.07, momentum=0.5):
        super().__init__()
        self.num_items, self.temperature, self.momentum = num_items, temperature, momentum
        std = 1.0 / (dim / 3) ** 0.5
        self.register_buffer("params", torch.tensor([-1.0, -1.0, temperature]))
        self.register_buffer("memory_v1", torch.rand(num_items, dim).mul_(2 * std).add_(-std))
        self.register_buffer("memory_v2", torch.rand(num_items, dim).mul_(2 * std).add_(-std))
        self.z_v1 = self.z_v2 = -1.0
        self.temperature_f32 = float(self.params[2])  # read back from the float32 buffer

    def forward(self, v1, v2, y, idx):
        batch, dim = v1.shape
        length = idx.shape[1]
        t = self.temperature_f32
        idx[:, 0] = y  # the reference overwrites column 0 with the item's own row
        w = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach()
        w = w.view(batch, length, dim)
        out_v1 = torch.exp(torch.div(torch.bmm(w, v1.view(batch, dim, 1)), t))
        w = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach()
        w = w.view(batch, length, dim)
        out_v2 = torch.exp(torch.div(torch.bmm(w, v2.view(batch, dim, 1)), t))
        if self.z_v1 < 0:
            self.params[0] = out_v1.mean() * self.num_items
            self.z_v1 = self.params[0].clone().detach().item()
        if self.z_v2 < 0:
            self.params[1] = out_v2.mean() * self.num_items
            self.z_v2 = self.params[1].clone().detach().item()
        out_v1 = torch.div(out_v1, self.z_v1).contiguous()
        out_v2 = torch.div(out_v2, self.z_v2).contiguous()
        with torch.no_grad():
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = torch.index_select(memory, 0, y.view(-1))
                pos.mul_(self.momentum).add_(torch.mul(v.detach().float(), 1 - self.momentum))
                norm = pos.pow(2).sum(1, keepdim=True).pow(0.5)
                memory.index_copy_(0, y, pos.div(norm))
        return out_v1.squeeze(-1), out_v2.squeeze(-1)


def nce_loss(x, num_positives, noise):
    eps = 1e-7
    batch = x.shape[0]
    pos, neg = x[:, :num_positives], x[:, num_positives:]
    log_d1 = torch.div(pos, pos.add(noise + eps)).log_()
    log_d0 = torch.div(neg.clone().fill_(noise), neg.add(noise + eps)).log_()
    return -(log_d1.sum() / (batch * num_positives) + log_d0.sum() / batch)


def softmax_kl_loss(student_logits, teacher_logits):
    """Sum over the batch of KL(softmax(teacher) || softmax(student)) (the reference's)."""
    p_log = F.log_softmax(student_logits, dim=1)
    q = F.softmax(teacher_logits, dim=1)
    return F.kl_div(p_log, q, reduction="sum")


class CcdCrpLoss(nn.Module):
    def __init__(self, s_dim, t_dim, embed_dim, num_items, class_index, num_positives,
                 num_negatives, temperature=0.07, momentum=0.5):
        super().__init__()
        self.embed_s = Embed(s_dim, embed_dim)
        self.embed_t = Embed(t_dim, embed_dim)
        self.memory = BankMemory(embed_dim, num_items, temperature, momentum)
        self.class_index = class_index  # list of [n_c] index tensors
        self.num_positives, self.num_negatives = num_positives, num_negatives
        self.noise = num_negatives / num_items
        self.temperature = temperature

    def centres(self, memory):
        return torch.stack([memory[i].relu().mean(0) for i in self.class_index])

    def forward(self, f_s, f_t, index, contrast_idx):
        e_s, e_t = self.embed_s(f_s), self.embed_t(f_t)
        out_v1, out_v2 = self.memory(e_s, e_t, index, contrast_idx)
        loss_s = nce_loss(out_v1, self.num_positives, self.noise)
        loss_t = nce_loss(out_v2, self.num_positives, self.noise)
        with torch.no_grad():
            a_s = self.centres(self.memory.memory_v1)
            a_t = self.centres(self.memory.memory_v2)
            a_s = a_s.div(a_s.pow(2).sum(1, keepdim=True).pow(0.5))
            a_t = a_t.div(a_t.pow(2).sum(1, keepdim=True).pow(0.5))
            rel_t = e_t.detach() @ a_t.t() / self.temperature
        rel_s = e_s @ a_s.t() / self.temperature
        loss_crp = softmax_kl_loss(rel_s, rel_t) / e_s.shape[0]
        return loss_s + loss_t, loss_crp


class ContrastSampler:
    """Per item: P positives of its class (distinct when possible), K negatives of the others
    (distinct when possible, else with replacement), as the reference's data set draws them."""

    def __init__(self, train_labels, num_positives, num_negatives, device):
        labels = torch.as_tensor(train_labels, dtype=torch.long)
        num_classes = int(labels.max()) + 1
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=num_classes)
        self.sorted_rows = order.to(device)
        self.start = (torch.cumsum(counts, 0) - counts).to(device)
        self.count = counts.to(device)
        self.max_count = int(counts.max())
        self.num_items = labels.shape[0]
        self.P, self.K = num_positives, num_negatives
        self.device = device

    def _positions(self, count, max_count, num, generator=None):
        batch = count.shape[0]
        repl = (torch.rand(batch, num, device=self.device) * count[:, None]).long()
        if num > max_count:
            return repl
        noise = torch.rand(batch, max_count, device=self.device)
        noise = torch.where(torch.arange(max_count, device=self.device)[None] < count[:, None],
                            noise, torch.full_like(noise, 2.0))
        distinct = torch.topk(noise, num, dim=1, largest=False).indices
        return torch.where((count >= num)[:, None], distinct, repl)

    def __call__(self, labels):
        start, count = self.start[labels], self.count[labels]
        pos = start[:, None] + self._positions(count, self.max_count, self.P)
        others = self._positions(self.num_items - count, self.num_items, self.K)
        neg = torch.where(others >= start[:, None], others + count[:, None], others)
        return self.sorted_rows[torch.cat([pos, neg], dim=1)]


def rotate_flip(images):
    """Per image a random multiple of 90 degrees and a random horizontal flip (NCHW)."""
    turns = torch.randint(0, 4, (images.shape[0],)).tolist()
    flips = torch.rand(images.shape[0]).lt(0.5).tolist()
    out = []
    for img, k, f in zip(images, turns, flips):
        img = torch.rot90(img, k, dims=(1, 2))
        out.append(torch.flip(img, dims=(2,)) if f else img)
    return torch.stack(out)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    data = np.load(args.inputs)
    train_labels = data["train_labels"].astype(np.int64)
    num_items = train_labels.shape[0]
    num_classes = int(train_labels.max()) + 1
    counts = np.bincount(train_labels, minlength=num_classes)
    class_weight = torch.tensor(counts.sum() / counts, dtype=torch.float32, device=device)
    class_index = [torch.as_tensor(np.flatnonzero(train_labels == c), device=device)
                   for c in range(num_classes)]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    n_batches = len([k for k in data.files if k.startswith("label_")])
    batches = []
    for i in range(n_batches):
        to_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().to(
            device, memory_format=memory_format)
        batches.append((to_nchw(data[f"image_student_{i}"]), to_nchw(data[f"image_teacher_{i}"]),
                        torch.as_tensor(data[f"label_{i}"], dtype=torch.long, device=device),
                        torch.as_tensor(data[f"index_{i}"], dtype=torch.long, device=device)))
    batch_size = batches[0][0].shape[0]

    model = CRCKDNet(args.model, num_classes, args.hidden_dim).to(device,
                                                                  memory_format=memory_format)
    ema_model = copy.deepcopy(model)
    for p in ema_model.parameters():
        p.requires_grad_(False)
    criterion = CcdCrpLoss(args.hidden_dim, args.hidden_dim, args.embed_dim, num_items,
                           class_index, args.num_positives, args.num_negatives).to(device)
    sampler = ContrastSampler(train_labels, args.num_positives, args.num_negatives, device)
    params = list(model.parameters()) + list(criterion.embed_s.parameters()) + \
        list(criterion.embed_t.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-4, total_steps=10_000)
    cuda = device.type == "cuda"
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and cuda)
    consistency_weight = float(np.exp(-5.0))  # 1.0 * sigmoid_rampup(epoch 0, 30)
    model.train()
    ema_model.train()  # the reference never puts the teacher in eval mode
    criterion.train()
    state = {"step": 0}

    def train_step(image_s, image_t, label, index):
        image_t = rotate_flip(image_t)
        contrast_idx = sampler(label)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            feature_s, logits_s = model(image_s)
            with torch.no_grad():
                feature_t, logits_t = ema_model(image_t)
        feature_s, logits_s = feature_s.float(), logits_s.float()
        feature_t, logits_t = feature_t.float(), logits_t.float()
        loss_ce = F.cross_entropy(logits_s, label, weight=class_weight)
        loss_mt = softmax_kl_loss(logits_s, logits_t) / batch_size
        loss_ccd, loss_crp = criterion(feature_s, feature_t, index, contrast_idx)
        loss = loss_ce + consistency_weight * loss_mt + 0.1 * loss_ccd + 1.0 * loss_crp
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():
            alpha = min(1 - 1 / (state["step"] + 1), 0.99)
            ema_params = list(ema_model.parameters())
            torch._foreach_mul_(ema_params, alpha)
            torch._foreach_add_(ema_params, list(model.parameters()), alpha=1 - alpha)
        state["step"] += 1
        return loss

    def run(num_steps, offset):
        times, loss_value = [], float("nan")
        for i in range(num_steps):
            b = batches[(offset + i) % len(batches)]
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = train_step(*b)
            loss_value = float(loss.detach())  # waits for the step
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times, loss_value

    info = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "mode": ("amp " + str(amp_dtype).replace("torch.", "") if args.amp else "float32")
        + (" channels_last" if args.channels_last else " NCHW")
        + f" threads={torch.get_num_threads()}",
        "batch_size": batch_size,
    }

    def memory():
        return {
            "host_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        }

    done = args.warmup
    run(args.warmup, 0)
    if args.serve:
        # Line protocol on stdin/stdout: "run N" -> {"step_s": [...], "loss": x}; EOF or
        # "quit" -> {"memory": {...}} and exit.
        print(json.dumps({"ready": info}), flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            times, loss_value = run(int(cmd[1]), done)
            done += int(cmd[1])
            print(json.dumps({"step_s": times, "loss": loss_value}), flush=True)
        print(json.dumps({"memory": memory()}), flush=True)
        return
    times, loss_value = run(args.steps, done)
    median = statistics.median(times)
    result = {**info, "step_s": times, "median_step_s": median,
              "img_s": batch_size / median, "loss": loss_value, **memory()}
    with open(args.output, "w") as f:
        json.dump(result, f)

if __name__ == "__main__":
    main()
