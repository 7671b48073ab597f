"""Distillation step speed: ours vs the official code's SEED step, each teacher optimisation in turn, and the KD overhead.

Every variant trains a fresh student on the same random batch with the same
models, batch, image size and K; variants run interleaved, round-robin, and
each reports medians (``bench/speed.py``). Rows, from the official code's step:

1. the official step (jacobswan1/SEED: teacher eval + ``no_grad``, BatchNorm as
   is, the (D, K) queue cloned for each einsum, fp32);
2. ours (``seed.distill.SEED``: queue read in place) with that same teacher;
3. then one teacher optimisation more per row: ``inference_mode``
   (``FrozenTeacher``), channels_last, BatchNorm folded, and on a GPU bf16 autocast
   over the step (Lightning's ``bf16-mixed``, what ``seed-distill`` uses there);
4. on a CPU, ``seed-distill``'s own CPU setting (BN folded, no channels_last), then
   with ``--channels-last`` (student and teacher in NHWC, as ``seed.engine.fit`` sets it),
   then also with ``--precision bf16-mixed`` where the CPU has bf16 units (other arithmetic);
5. ``seed-distill --teacher-cache`` in a cached epoch: that step with the teacher's
   embeddings read back from the memory-mapped cache, no teacher forward.

KD overhead: our step against the student alone trained self-supervised, a MoCo
v2 step of the student (``pretrain/mocov2.py``'s parts: two views, momentum
encoder, K negatives), same batch. Writes ``bench/results/distill_speed.json``
(``distill_speed_gpu.json`` with ``--device cuda``).

    python -m bench.distill_speed                       # CPU: r50 -> r18, 64px, batch 32, K 65536 (about 3 min on 2 cores)
    python -m bench.distill_speed --device cuda --image-size 224 --batch-size 256 --pairs r50:r18,r50x2:mbv3l
"""

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.common import write_result
from bench.speed import (
    EMBED_DIM,
    OfficialSEED,
    OfficialTeacher,
    StepFn,
    Stopwatch,
    autocast,
    fmt_ms,
    interleaved,
    mocov2_step,
    official_step,
    ours_step,
    parse_pairs,
    parse_speed_args,
    result_name,
    seed_module,
    spread,
    teacher_parts,
    teacher_variant,
)
from seed.precision import native_cpu_bf16
from seed.teacher_cache import TeacherCache

OFFICIAL = "official step (no_grad teacher, BN as is, queue cloned, fp32)"
SAME_TEACHER = "ours, the official teacher (queue read in place)"
MOCO = "student alone: MoCo v2 step (2 views, momentum encoder)"
TEACHER_ALONE = "teacher forward alone (seed-distill's teacher on this device)"
CACHED = "seed-distill --teacher-cache, a cached epoch (embeddings read back, no teacher)"
CPU_DEFAULT = "seed-distill on CPU: inference_mode + BN folded (no channels_last)"
CHANNELS_LAST = "seed-distill --channels-last on CPU: student and teacher NHWC"
BF16_CPU = "seed-distill --channels-last --precision bf16-mixed on CPU (bf16 autocast: not the same math)"
COMPILED_STUDENT = "--channels-last + torch.compile of the student backbone (bench only; compile time apart)"
COMPILED_BOTH = "--channels-last + torch.compile of the student and of the teacher (inductor freezing; bench only)"
SHORT = {OFFICIAL: "official", SAME_TEACHER: "ours, no_grad teacher", "+ inference_mode": "+ inference_mode", "+ channels_last": "+ channels_last",
         "+ BN folded": "+ BN folded", "+ bf16 autocast (seed-distill on GPU)": "+ bf16", CPU_DEFAULT: "seed-distill CPU",
         CHANNELS_LAST: "--channels-last", BF16_CPU: "+ bf16-mixed", MOCO: "MoCo v2, student alone",
         CACHED: "--teacher-cache", TEACHER_ALONE: "teacher alone", COMPILED_STUDENT: "+ compiled student", COMPILED_BOTH: "+ compiled teacher"}


def chain(gpu: bool) -> list[tuple[str, bool, bool, bool]]:
    """(row, fold BN, channels_last, bf16): one teacher optimisation more per row."""
    rows = [("+ inference_mode", False, False, False), ("+ channels_last", False, True, False), ("+ BN folded", True, True, False)]
    if gpu:
        rows.append(("+ bf16 autocast (seed-distill on GPU)", True, True, True))
    return rows


def measure_pair(teacher: str, student: str, args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Each variant's median timings, and the op breakdown (:func:`profile_step`) of the official step and ours."""
    device, gpu = args.device, args.device.startswith("cuda")
    backbone, head = teacher_parts(teacher)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)).to(device)

    def official_teacher() -> Stopwatch:
        return Stopwatch(OfficialTeacher(copy.deepcopy(backbone), copy.deepcopy(head)).to(device), device)

    def ours(teacher_module: Stopwatch, bf16: bool = False, channels_last: bool = False, compiled: bool = False):
        module = seed_module(student, teacher_module, args.queue_size, args.image_size).to(device)
        if channels_last:  # what seed.engine.fit does with --channels-last
            module.to(memory_format=torch.channels_last)
        if compiled:
            module.backbone = torch.compile(module.backbone)
        return ours_step(module, images, device, bf16)

    def compiled_teacher() -> Stopwatch:
        timed = teacher_variant(backbone, head, device, True, True)
        timed.teacher.backbone = torch.compile(timed.teacher.backbone, options={"freezing": True})  # a frozen network: weights as constants
        return timed

    steps = {OFFICIAL: official_step(OfficialSEED(student, official_teacher(), args.queue_size).to(device), images),
             SAME_TEACHER: ours(official_teacher())}
    for name, fold_bn, channels_last, bf16 in chain(gpu):
        steps[name] = ours(teacher_variant(backbone, head, device, fold_bn, channels_last), bf16)
    if not gpu:
        steps[CPU_DEFAULT] = ours(teacher_variant(backbone, head, device, True, False))
        steps[CHANNELS_LAST] = ours(teacher_variant(backbone, head, device, True, True), channels_last=True)
        if native_cpu_bf16():  # bf16 units; seed-distill refuses emulated bf16
            steps[BF16_CPU] = ours(teacher_variant(backbone, head, device, True, True), bf16=True, channels_last=True)
        if args.compile:
            steps[COMPILED_STUDENT] = ours(teacher_variant(backbone, head, device, True, True), channels_last=True, compiled=True)
            steps[COMPILED_BOTH] = ours(compiled_teacher(), channels_last=True, compiled=True)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*self.log.*")  # the cache's hit rate is logged through a Trainer, absent here
        cache = TeacherCache(Path(folder), {}, len(images), 1, EMBED_DIM)
        module = seed_module(student, teacher_variant(backbone, head, device, True, gpu), args.queue_size, args.image_size).to(device)
        steps[CACHED] = ours_step(module, images, device, bf16=gpu, cache=cache)
        steps[MOCO] = mocov2_step(student, args.queue_size, args.image_size, images, device, bf16=gpu)
        steps[TEACHER_ALONE] = teacher_alone_step(teacher_variant(backbone, head, device, True, gpu), images, device, bf16=gpu)
        first_calls = {name: first_call_seconds(steps[name]) for name in (COMPILED_STUDENT, COMPILED_BOTH) if name in steps}
        profiles = {} if gpu else {name: profile_step(steps[name]) for name in (OFFICIAL, CHANNELS_LAST)}  # the profile counts CPU time
        print(f"{teacher} -> {student}: {len(steps)} variants x {args.rounds} rounds", flush=True)
        timings = interleaved(steps, args.rounds, device, args.warmup)
        for name, seconds in first_calls.items():
            timings[name]["compile_s"] = seconds - timings[name]["step_s"]
        return timings, profiles


def teacher_alone_step(teacher: Stopwatch, images: torch.Tensor, device: str, bf16: bool) -> StepFn:
    """The teacher's forward with nothing else: one of the two parts whose sum a SEED step is measured against."""

    def step() -> dict[str, float]:
        with autocast(device, bf16):
            teacher(images)
        return {"teacher_s": teacher.seconds}

    return step


def first_call_seconds(step: StepFn) -> float:
    """The first step's seconds: with torch.compile, the compilation (what a run pays once) plus a step."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def op_kind(name: str) -> str:
    if "convolution_backward" in name:
        return "convolutions, backward"
    if "conv" in name:
        return "convolutions, forward"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matrix products"
    return "everything else"


OP_KINDS = ["convolutions, forward", "convolutions, backward", "matrix products", "everything else"]


def op_shares(profiled: dict[str, float]) -> dict[str, float]:
    """Each kind of op's share of the profiled step."""
    total = sum(profiled.get(kind, 0.0) for kind in OP_KINDS)
    return {kind: profiled.get(kind, 0.0) / total for kind in OP_KINDS}


def profile_step(step: StepFn, steps: int = 2) -> dict[str, float]:
    """Seconds per step by kind of op (torch.profiler's self CPU time, so each op counts once), and the
    floating-point operations of the convolutions per step (``FlopCounterMode``)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    step()
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in range(steps):
            step()
    seconds: dict[str, float] = {}
    for event in profiled.key_averages():
        kind = op_kind(event.key)
        seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6 / steps
    with FlopCounterMode(display=False) as counter:
        step()
    seconds["convolution GFLOP"] = sum(count for op, count in counter.get_flop_counts()["Global"].items() if "convolution" in str(op)) / 1e9
    return seconds


def pair_table(teacher: str, student: str, timings: dict[str, dict[str, float]], args: argparse.Namespace) -> dict:
    gpu = args.device.startswith("cuda")
    batch = args.batch_size
    official = timings[OFFICIAL]
    columns = ["variant", "step", "images/s", "× official", "× previous row", "teacher forward", "teacher × official", "teacher share"]
    if gpu:
        columns.append("step memory (MiB)")
    rows, previous = [], None
    chained = [OFFICIAL, SAME_TEACHER, *[name for name, *_ in chain(gpu)]]
    for name, t in timings.items():
        if name in (MOCO, TEACHER_ALONE):
            continue
        teacher_cells = ([fmt_ms(t["teacher_s"]) + spread(t, "teacher_s"), f"{official['teacher_s'] / t['teacher_s']:.2f}x"]
                         if t["teacher_s"] else ["none", "—"])
        row = [name, fmt_ms(t["step_s"]) + spread(t, "step_s"), f"{batch / t['step_s']:.0f}", f"{official['step_s'] / t['step_s']:.2f}x",
               f"{previous['step_s'] / t['step_s']:.2f}x" if previous and name in chained else "—", *teacher_cells,
               f"{100 * t['teacher_s'] / t['step_s']:.0f}%"]
        if gpu:
            row.append(f"{t['step_mib']:.0f}")
        rows.append(row)
        previous = t if name in chained else previous
    caption = (f"**{teacher} → {student}**, {args.image_size}px, batch {batch}, K = {args.queue_size}, {args.device}, median of {args.rounds} "
               "interleaved steps (± half the interquartile range):")
    return {"caption": caption, "columns": columns, "rows": rows}


def ours_name(gpu: bool) -> str:
    return "+ bf16 autocast (seed-distill on GPU)" if gpu else CPU_DEFAULT


def overhead_table(pairs: list[tuple[str, str]], results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> dict:
    ours = ours_name(args.device.startswith("cuda"))
    rows = []
    for teacher, student in pairs:
        t = results[f"{teacher}:{student}"]
        seed_s, moco_s, teacher_s = t[ours]["step_s"], t[MOCO]["step_s"], t[ours]["teacher_s"]
        rows.append([f"{teacher} → {student}", fmt_ms(moco_s), fmt_ms(seed_s), f"{seed_s / moco_s:.2f}x", fmt_ms(seed_s - teacher_s),
                     f"+{100 * teacher_s / (seed_s - teacher_s):.0f}%"])
    settings = "BN folded, channels_last, bf16" if args.device.startswith("cuda") else "BN folded, fp32"
    return {"caption": f"KD overhead: our SEED step as `seed-distill` runs it on this device ({settings}) against the student trained alone with MoCo v2 "
                       "(same batch and K; the MoCo step runs a second student forward for its key view):",
            "columns": ["pair", "student alone (MoCo v2 step)", "SEED step", "SEED / MoCo v2", "SEED step without the teacher forward",
                        "teacher forward on top"],
            "rows": rows}


def listing(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def notes(pairs: list[tuple[str, str]], results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> list[str]:
    gpu = args.device.startswith("cuda")
    ours = ours_name(gpu)
    found = []
    for teacher, student in pairs:
        t = results[f"{teacher}:{student}"]
        step = {name: v["step_s"] for name, v in t.items()}
        teach = {name: v["teacher_s"] for name, v in t.items()}
        ordered = [OFFICIAL, SAME_TEACHER, *[name for name, *_ in chain(gpu)]]
        # (optimisation, row without it, row with it)
        changes = [(ordered[i].lstrip("+ ").split(" (")[0], ordered[i - 1], ordered[i]) for i in range(2, len(ordered))]
        if not gpu:
            changes.append(("BN folded alone (no channels_last)", "+ inference_mode", CPU_DEFAULT))
        gains = {name: teach[without] / teach[with_it] for name, without, with_it in changes}
        margin = {name: t[without].get("teacher_s_spread", 0.0) + t[with_it].get("teacher_s_spread", 0.0) for name, without, with_it in changes}
        noise = abs(teach[SAME_TEACHER] / teach[OFFICIAL] - 1)
        fastest = max((n for n in step if n not in (MOCO, CACHED, TEACHER_ALONE)), key=lambda n: 1 / step[n])
        found.append(f"{teacher} → {student}: as `seed-distill` runs it here ({SHORT[ours]}), our step is "
                     f"{step[OFFICIAL] / step[ours]:.2f}x the official step's speed ({args.batch_size / step[ours]:.0f} vs "
                     f"{args.batch_size / step[OFFICIAL]:.0f} images/s); its teacher forward {teach[OFFICIAL] / teach[ours]:.2f}x. "
                     f"Fastest row: {SHORT[fastest]} ({step[OFFICIAL] / step[fastest]:.2f}x).")
        helped = [name for name, gain in gains.items() if gain > 1 + margin[name]]
        hurt = [name for name, gain in gains.items() if gain < 1 - margin[name]]
        verdict = (f"{listing(helped)} speed{'s' if len(helped) == 1 else ''} the teacher up by more than that" if helped else
                   "no teacher optimisation speeds the teacher up by more than that")
        found.append(f"{teacher} → {student}: each optimisation's effect on the teacher forward, over the row before it: "
                     + ", ".join(f"{name} {gain:.2f}x (±{100 * margin[name]:.0f}%)" for name, gain in gains.items())
                     + f", the ± being the two rows' spreads added; {verdict}"
                     + (f", and {listing(hurt)} slow{'s' if len(hurt) == 1 else ''} it down" if hurt else "") + ".")
        found.append(f"{teacher} → {student}: the first two rows run the same teacher code, so their teacher forwards differ by noise alone: "
                     f"{100 * noise:.0f}% in this run.")
        found.append(f"{teacher} → {student}: the teacher is {100 * teach[ours] / step[ours]:.0f}% of our step "
                     f"({100 * teach[OFFICIAL] / step[OFFICIAL]:.0f}% of the official one): a forward without backward, so the "
                     "student's forward + backward bounds the step, and a teacher speed-up moves the step by at most that share.")
        if not gpu:
            found.append(f"{teacher} → {student}: `--channels-last` (student and teacher NHWC) makes our step {step[ours] / step[CHANNELS_LAST]:.2f}x "
                         f"faster, {step[OFFICIAL] / step[CHANNELS_LAST]:.2f}x the official step's speed ({args.batch_size / step[CHANNELS_LAST]:.0f} "
                         f"images/s); its teacher forward {teach[ours] / teach[CHANNELS_LAST]:.2f}x.")
        if BF16_CPU in step:
            found.append(f"{teacher} → {student}: with bf16 autocast as well (`--precision bf16-mixed`, which changes the arithmetic: bf16 "
                         f"products, fp32 weights) the step is {step[OFFICIAL] / step[BF16_CPU]:.2f}x the official fp32 step's speed "
                         f"({args.batch_size / step[BF16_CPU]:.0f} images/s); its teacher forward {teach[OFFICIAL] / teach[BF16_CPU]:.2f}x.")
        found.append(f"{teacher} → {student}: a SEED step costs {step[ours] / step[MOCO]:.2f}x a MoCo v2 step of the student alone.")
        parts = step[CACHED] + step[TEACHER_ALONE]
        found.append(f"{teacher} → {student}: the step as `seed-distill` runs it here ({fmt_ms(step[ours])}) is {step[ours] / parts:.2f}x the sum "
                     f"of its parts timed apart: the student's step without a teacher (the `--teacher-cache` row, {fmt_ms(step[CACHED])}) and "
                     f"the teacher's forward alone ({fmt_ms(step[TEACHER_ALONE])}).")
        bound = 1 / (1 - teach[ours] / step[ours])
        found.append(f"{teacher} → {student}: `--teacher-cache` makes a step of a cached epoch {step[ours] / step[CACHED]:.2f}x the exact "
                     f"step ({args.batch_size / step[CACHED]:.0f} vs {args.batch_size / step[ours]:.0f} images/s); removing the teacher's "
                     f"share of the step would give {bound:.2f}x. The first --cache-views epochs run the teacher and write the cache.")
    return found


def profile_notes(pairs: list[tuple[str, str]], results: dict[str, dict[str, dict[str, float]]], profiles: dict[str, dict[str, dict[str, float]]],
                  args: argparse.Namespace) -> list[str]:
    """Where the step's time goes, and what that leaves any same-arithmetic speed-up; what torch.compile gave."""
    found = []
    for teacher, student in pairs:
        pair, t = f"{teacher}:{student}", results[f"{teacher}:{student}"]
        ours, official = profiles[pair].get(CHANNELS_LAST), profiles[pair].get(OFFICIAL)
        if ours and official:
            # the profiler's shares of the timed (median, unprofiled) step: its own totals run a few % off the timed ones
            ours_share, official_share = op_shares(ours), op_shares(official)
            ours_step, official_step = t[CHANNELS_LAST]["step_s"], t[OFFICIAL]["step_s"]
            conv = (ours_share["convolutions, forward"] + ours_share["convolutions, backward"]) * ours_step
            official_conv = (official_share["convolutions, forward"] + official_share["convolutions, backward"]) * official_step
            compiled = [t[CHANNELS_LAST]["step_s"] / t[name]["step_s"] for name in (COMPILED_STUDENT, COMPILED_BOTH) if name in t]
            found.append(
                f"{teacher} → {student}: where the `--channels-last` step's time goes (torch.profiler's self time of each op, as shares of "
                f"the timed {fmt_ms(ours_step)}): " + ", ".join(f"{kind} {fmt_ms(share * ours_step)} ({100 * share:.0f}%)"
                                                                   for kind, share in ours_share.items())
                + f". The convolutions (teacher forward, student forward and backward: {ours['convolution GFLOP']:.0f} GFLOP a step, "
                f"`torch.utils.flop_counter`) run at {ours['convolution GFLOP'] / conv:.0f} GFLOP/s on one thread, the official step's at "
                f"{official['convolution GFLOP'] / official_conv:.0f} GFLOP/s ({fmt_ms(official_conv)} of its {fmt_ms(official_step)}). "
                f"Both run the same convolutions (the same operations, through oneDNN), so with the same arithmetic a step can be at most "
                f"{official_step / conv:.2f}x the official one even if everything but the convolutions cost nothing; ours spends "
                f"{fmt_ms(ours_step - conv)} outside them (the official step {fmt_ms(official_step - official_conv)}): BatchNorm, ReLU, "
                "residual adds, the optimiser and the loss's products against the queue"
                + (f"; torch.compile, which fuses such ops, made the step {max(compiled):.2f}x faster at best (below)." if compiled else "."))
        for name in (COMPILED_STUDENT, COMPILED_BOTH):
            if name in t:
                found.append(f"{teacher} → {student}: {SHORT[name]} (torch.compile, inductor): the step is "
                             f"{t[CHANNELS_LAST]['step_s'] / t[name]['step_s']:.2f}x the eager `--channels-last` step, "
                             f"{t[OFFICIAL]['step_s'] / t[name]['step_s']:.2f}x the official step; compiling took "
                             f"{t[name].get('compile_s', float('nan')):.0f} s with an empty inductor cache, once per run.")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="r50:r18", help="teacher:student pairs, comma-separated")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--queue-size", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant (medians)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="on a CPU, rows with the student (and teacher) under torch.compile (about a minute of compiling)")
    args = parse_speed_args(parser)
    gpu = args.device.startswith("cuda")
    pairs = parse_pairs(args.pairs)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="inductor-") as compiled:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compiled  # an empty cache: compile times as a first run on a machine pays them
        measured = {f"{t}:{s}": measure_pair(t, s, args) for t, s in pairs}
    results = {pair: timings for pair, (timings, _) in measured.items()}
    profiles = {pair: profiled for pair, (_, profiled) in measured.items()}
    load_after = os.getloadavg()
    tables = [pair_table(t, s, results[f"{t}:{s}"], args) for t, s in pairs]
    tables.append(overhead_table(pairs, results, args))
    for table in tables:
        print(table["caption"])
        for row in table["rows"]:
            print(" | ".join(row))
    plotted = [name for name in results[f"{pairs[0][0]}:{pairs[0][1]}"] if name != TEACHER_ALONE]
    labels = [SHORT[name] for name in plotted]
    plot = {"file": f"{result_name('distill_speed', args.device)}.png", "kind": "bar", "ylabel": "images/s (step)",
            "title": f"SEED step, {args.image_size}px, batch {args.batch_size}, K {args.queue_size}, {args.device}",
            "series": [{"label": f"{t} → {s}", "x": labels, "y": [args.batch_size / results[f"{t}:{s}"][name]["step_s"] for name in plotted]}
                       for t, s in pairs]}
    shared = (f"The CPU was shared with other jobs (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on "
              f"{os.cpu_count()} cores), so absolute numbers are low and vary between runs; the ratios come from one run with the "
              "variants interleaved. " if not gpu else "")
    description = (
        "One SEED training step (teacher forward, student forward + backward, SGD step, enqueue) on a random batch with "
        "random weights, the ImageNet stem at every size, τS 0.2, τT 1e-4. Rows: the official code's step written in plain "
        "PyTorch as jacobswan1/SEED does it (teacher in eval mode under `no_grad` with its BatchNorm, the (D, K) queue cloned for "
        "each einsum, fp32); ours (`seed.distill.SEED.seed_step` + enqueue) with that same teacher; then one teacher optimisation "
        "more per row (`inference_mode` via `FrozenTeacher`, channels_last, BatchNorm folded into the convolutions"
        + (", bf16 autocast over the step as Lightning's `bf16-mixed`" if gpu else
           "; on a CPU bf16 autocast is a row of its own, after the seed-distill rows") + "). "
        + ("" if gpu else "“seed-distill on CPU” is what `seed-distill` runs on a CPU by default (channels_last is on by default on GPUs "
                          "only); the row after it adds `--channels-last`, which puts the student in NHWC too. ")
        + "“× previous row” is each optimisation's own speed-up. KD overhead compares our step with the student trained alone, "
        "self-supervised: a MoCo v2 step (`pretrain/mocov2.py`'s encoders, momentum copy and lightly loss; 2 views). "
        "The `--teacher-cache` row is `seed-distill`'s step in an epoch whose views are all cached: the embeddings read back from "
        "the memory-mapped fp16 file, no teacher forward; with the teacher's forward timed alone it gives the step's parts. "
        + ("" if gpu else "The torch.compile rows (bench only, not `seed-distill` flags) compile the student's backbone, then also the "
                          "teacher's with inductor's freezing; their compile time is reported apart. The profile note breaks the "
                          "`--channels-last` step and the official one down by kind of op (torch.profiler) and counts the convolutions' "
                          "operations (`torch.utils.flop_counter`). ")
        + shared + f"Torch threads: {torch.get_num_threads()}."
    )
    write_result(result_name("distill_speed", args.device), {
        "title": "Distillation step speed" + (" (GPU)" if gpu else ""), "order": 20 if not gpu else 21,
        "command": "python " + " ".join(["-m", "bench.distill_speed", *sys.argv[1:]]),
        "description": description, "tables": tables, "plots": [plot], "notes": notes(pairs, results, args) + profile_notes(pairs, results, profiles, args),
        "data": {"settings": vars(args), "load_average": [load_before, load_after], "timings": results, "profiles": profiles},
    }, device=args.device)


if __name__ == "__main__":
    main()
