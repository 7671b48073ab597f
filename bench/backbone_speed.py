"""Backbone doors: one network built through each door, one SEED step each, side by side.

``r18`` (our registry), ``tv:resnet18`` (torchvision's model by name, ``seed.models``) and ``timm:resnet18``
(timm's) are the same ResNet-18 (11.7M parameters without the classifier); a student built through any of them
should train at the same speed: the claim is within 5 % of ``r18``. Each student trains a fresh SEED module against
the same frozen random teacher (``--teacher``, BatchNorm folded, as ``seed-distill`` runs it) on the same random
batch; the students run interleaved, round-robin (``bench/speed.py``), each reporting the median step and the ratio
of its median to ``r18``'s. Writes ``bench/results/backbone_speed.json`` (``backbone_speed_gpu.json`` with ``--device cuda``).

    python -m bench.backbone_speed                                                        # CPU: r50 teacher, 64px, batch 32
    python -m bench.backbone_speed --device cuda --image-size 224 --batch-size 256 --rounds 10
"""

import argparse
import os
import sys

import torch

from bench.common import write_result
from bench.speed import fmt_ms, interleaved, ours_step, parse_speed_args, result_name, seed_module, spread, teacher_parts, teacher_variant

#: The students, the reference first: the same ResNet-18 through each door.
STUDENTS = ("r18", "tv:resnet18", "timm:resnet18")
#: The claim: a student through another door is within this fraction of the reference's step time.
TOLERANCE = 0.05


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median step seconds (and spread) of each student, plus its parameter count."""
    device, gpu = args.device, args.device.startswith("cuda")
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)).to(device)
    backbone, head = teacher_parts(args.teacher)
    steps, params = {}, {}
    for student in args.students:
        torch.manual_seed(0)
        module = seed_module(student, teacher_variant(backbone, head, device, True, gpu), args.queue_size, args.image_size).to(device).train()
        params[student] = sum(p.numel() for p in module.backbone.parameters())
        steps[student] = ours_step(module, images, device, bf16=gpu)
    timings = interleaved(steps, args.rounds, device, warmup=args.warmup)
    return {student: {**timings[student], "params": params[student]} for student in args.students}


def ratios(timings: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each student's median step over the reference's (the first student's)."""
    reference = timings[next(iter(timings))]["step_s"]
    return {student: timing["step_s"] / reference for student, timing in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=lambda text: tuple(text.split(",")), default=STUDENTS, help="comma-separated, the reference first")
    parser.add_argument("--teacher", default="r50")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--queue-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per student (medians)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parse_speed_args(parser)
    load_before = os.getloadavg()
    timings = measure(args)
    load_after = os.getloadavg()
    relative = ratios(timings)
    reference = args.students[0]
    rows = [[student, f"{timing['params'] / 1e6:.2f}M", fmt_ms(timing["step_s"]) + spread(timing, "step_s"),
             f"{args.batch_size / timing['step_s']:.0f}", f"{relative[student]:.3f}"] for student, timing in timings.items()]
    others = [student for student in args.students if student != reference]
    within = all(abs(relative[student] - 1) <= TOLERANCE for student in others)
    claim = (f"{', '.join(f'{s} / {reference} = {relative[s]:.3f}' for s in others)}: "
             f"{'within' if within else 'not within'} {100 * TOLERANCE:.0f} % of {reference}'s step (claim: within {100 * TOLERANCE:.0f} %).")
    gpu = args.device.startswith("cuda")
    write_result(result_name("backbone_speed", args.device), {
        "title": "Backbone doors: ours, torchvision's and timm's ResNet-18" + (" (GPU)" if gpu else ""), "order": 25 if not gpu else 26,
        "command": "python " + " ".join(["-m", "bench.backbone_speed", *sys.argv[1:]]),
        "description": (f"One SEED step ({args.teacher} teacher, BN folded; batch {args.batch_size}, {args.image_size}px, K {args.queue_size}) "
                        f"of the same ResNet-18 built as {', '.join(args.students)}; interleaved rounds ({args.rounds}), medians."),
        "tables": [{"columns": ["student", "parameters", "SEED step", "images/s", f"step / {reference}'s"], "rows": rows}],
        "notes": [claim, f"Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after."],
        "data": {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}, "timings": timings, "ratios": relative,
                 "within_tolerance": within, "load_average": [load_before, load_after]},
    }, device=args.device)
    print(claim)


if __name__ == "__main__":
    main()
