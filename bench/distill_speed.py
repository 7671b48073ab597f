"""Speed of one SEED step: teacher, student and total images/s, ours vs a plain PyTorch step.

The plain step is written the way the official SEED code does it: teacher in
eval mode under ``torch.no_grad`` with its BatchNorm layers, the queue cloned
before the enqueue. Ours adds each teacher optimisation in turn (inference mode,
BatchNorm folding, channels_last, autocast on GPU). Variants run interleaved,
round-robin, so that load from other processes hits all of them alike.

    python bench/distill_speed.py --teacher r50 --student r18 --image-size 64 --batch-size 32
    python bench/distill_speed.py --device cuda --image-size 224 --batch-size 256     # on a GPU
"""

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from seed.backbones import create_backbone
from seed.losses import seed_loss
from seed.queue import TeacherQueue
from seed.teacher import FrozenTeacher


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


class PlainTeacher(nn.Module):
    """The official code's teacher: eval mode, no_grad, BatchNorm as is."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.backbone(images), dim=1)


def make_teachers(arch: str, device: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = create_backbone(arch).to(device)
    gpu = device == "cuda"
    variants = {
        "plain (official style)": PlainTeacher(copy.deepcopy(base)),
        "+ inference_mode": FrozenTeacher(copy.deepcopy(base), None, fold_bn=False),
        "+ BN folded": FrozenTeacher(copy.deepcopy(base), None, fold_bn=True),
        "+ BN folded + channels_last": FrozenTeacher(copy.deepcopy(base), None, fold_bn=True, channels_last=True),
    }
    if gpu:
        variants["+ BN folded + channels_last + bf16"] = FrozenTeacher(copy.deepcopy(base), None, fold_bn=True, channels_last=True)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="r50")
    parser.add_argument("--student", default="r18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--queue-size", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="bench/results/distill_speed.json")
    args = parser.parse_args()
    device = args.device
    teachers = make_teachers(args.teacher, device)
    student = create_backbone(args.student).to(device)
    dim, embed_dim = student.feature_dim, teachers["+ BN folded"].embed_dim
    head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, embed_dim)).to(device)
    optimizer = torch.optim.SGD([*student.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    queue = TeacherQueue(args.queue_size, embed_dim, gather_distributed=False).to(device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def step(name: str, teacher: nn.Module) -> tuple[float, float]:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=name.endswith("bf16"))
        plain = name.startswith("plain")
        sync()
        start = time.perf_counter()
        with autocast:
            target = teacher(images)
        sync()
        teacher_time = time.perf_counter() - start
        with autocast:
            embedding = F.normalize(head(student(images)), dim=1)
            bank = queue.bank.clone() if plain else queue.bank  # lightly/official: a K x D copy per step
            loss = seed_loss(embedding, target, bank, 0.2, 1e-4)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        queue.enqueue(target)
        sync()
        return teacher_time, time.perf_counter() - start

    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in teachers}
    for name, teacher in teachers.items():  # warm-up
        step(name, teacher)
    for _ in range(args.steps):
        for name, teacher in teachers.items():
            timings[name].append(step(name, teacher))
    rows = []
    for name, values in timings.items():
        teacher_s = statistics.median(t for t, _ in values)
        total_s = statistics.median(t for _, t in values)
        rows.append({"variant": name, "teacher_img_s": args.batch_size / teacher_s, "student_img_s": args.batch_size / (total_s - teacher_s),
                     "total_img_s": args.batch_size / total_s, "teacher_share": teacher_s / total_s})
    baseline = rows[0]["total_img_s"]
    for row in rows:
        row["speedup_total"] = row["total_img_s"] / baseline
        row["speedup_teacher"] = row["teacher_img_s"] / rows[0]["teacher_img_s"]
    result = {"machine": machine(), "device": device, **vars(args), "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"{args.teacher} -> {args.student}, {args.image_size}px, batch {args.batch_size}, K={args.queue_size}, {device}: {result['machine']}")
    print("| variant | teacher img/s | student img/s | total img/s | teacher share | teacher speed-up | total speed-up |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['teacher_img_s']:.0f} | {row['student_img_s']:.0f} | {row['total_img_s']:.0f} | "
              f"{100 * row['teacher_share']:.0f}% | {row['speedup_teacher']:.2f}x | {row['speedup_total']:.2f}x |")


if __name__ == "__main__":
    main()
