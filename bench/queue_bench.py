"""Queue scaling: SEED step time and memory at K = 1k, 4k, 16k, 65k teacher embeddings.

Step time: one process, one student and teacher (``seed-distill``'s teacher
settings for the device), one queue per K, the Ks interleaved round-robin
(medians). Beside the whole step, the part that depends on K alone: the loss
and enqueue on given embeddings (student embedding with grad, backward included),
ours (``seed_loss`` reading the bank in place + ``TeacherQueue.enqueue``) and
the official code's (two clones of the (D, K) queue + einsums).

Memory: on a CPU each K runs in a fresh process (spawn) that reports its peak
resident memory (``ru_maxrss``) and what a step adds on top of the memory
resident before it (``VmHWM`` reset through ``/proc/self/clear_refs``; glibc made to
unmap freed blocks from 64 KiB up, so that RSS follows the live tensors); on a
GPU, ``torch.cuda.max_memory_allocated`` around a step. Writes
``bench/results/queue.json`` (``queue_gpu.json`` with ``--device cuda``).

    python -m bench.queue_bench                         # CPU: r50 -> r18, 64px, batch 32 (about 2 min on 2 cores)
    python -m bench.queue_bench --device cuda --image-size 224 --batch-size 256
"""

import argparse
import multiprocessing
import os
import resource
import sys

import torch
import torch.nn.functional as F

from bench.common import memory_status, write_result
from bench.speed import (
    EMBED_DIM,
    fmt_ms,
    interleaved,
    official_loss_and_enqueue,
    ours_step,
    parse_speed_args,
    result_name,
    seed_module,
    spread,
    teacher_parts,
    teacher_variant,
)
from seed.losses import seed_loss
from seed.queue import TeacherQueue


def build(args: argparse.Namespace):
    """Our SEED module with the device's seed-distill teacher settings, and a fixed batch."""
    gpu = args.device.startswith("cuda")
    backbone, head = teacher_parts(args.teacher)
    teacher = teacher_variant(backbone, head, args.device, fold_bn=True, channels_last=gpu)
    module = seed_module(args.student, teacher, min(args.sizes), args.image_size).to(args.device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)).to(args.device)
    return module, images


def queue_part(size: int, batch: int, device: str, official: bool):
    """Loss + backward into the student embedding + enqueue, on fixed unit embeddings: what K costs by itself."""
    generator = torch.Generator().manual_seed(1)
    student = F.normalize(torch.randn(batch, EMBED_DIM, generator=generator), dim=1).to(device).requires_grad_()
    teacher = F.normalize(torch.randn(batch, EMBED_DIM, generator=generator), dim=1).to(device)
    if official:
        bank = F.normalize(torch.randn(EMBED_DIM, size, generator=generator), dim=0).to(device)
        pointer = torch.zeros(1, dtype=torch.long, device=device)
    else:
        queue = TeacherQueue(size, EMBED_DIM, gather_distributed=False).to(device)

    def step() -> dict[str, float]:
        student.grad = None
        if official:
            loss = official_loss_and_enqueue(student, teacher, bank, pointer, 0.2, 1e-4)
            loss.backward()
        else:
            loss = seed_loss(student, teacher, queue.bank, 0.2, 1e-4)
            loss.backward()
            queue.enqueue(teacher)
        return {}

    return step


# glibc serves every block from 64 KiB up with its own mapping and unmaps it when freed, so that the
# resident size follows the live tensors instead of what the allocator keeps for reuse.
MMAP_THRESHOLD = 65536


def _memory_child(args: argparse.Namespace, size: int, answer: multiprocessing.Queue) -> None:
    """In a fresh process: two warm-up steps at K = ``size``, then the peak of two more over what was resident."""
    if args.threads:
        torch.set_num_threads(args.threads)
    module, images = build(args)
    step = ours_step(module, images, args.device, queue=TeacherQueue(size, EMBED_DIM).to(args.device))
    for _ in range(2):
        step()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident size
    resident = memory_status("VmRSS")
    for _ in range(2):
        step()
    answer.put({"resident_mib": resident / 2**20, "step_extra_mib": (memory_status("VmHWM") - resident) / 2**20,
                "training_peak_mib": memory_status("VmHWM") / 2**20, "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def cpu_memory(args: argparse.Namespace, size: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    answer = context.Queue()
    process = context.Process(target=_memory_child, args=(args, size, answer))
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by the child's glibc at start
    process.start()
    if saved is None:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    else:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    found = answer.get()
    process.join()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="r50")
    parser.add_argument("--student", default="r18")
    parser.add_argument("--sizes", default="1024,4096,16384,65536", type=lambda text: [int(s) for s in text.split(",")], help="queue sizes K")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per K (medians)")
    args = parse_speed_args(parser)
    gpu = args.device.startswith("cuda")
    load_before = os.getloadavg()

    memory = {}
    if not gpu:
        for size in args.sizes:
            memory[size] = cpu_memory(args, size)
            print(f"K={size}: {memory[size]}", flush=True)
    module, images = build(args)
    steps = {}
    for size in args.sizes:
        steps[f"step {size}"] = ours_step(module, images, args.device, bf16=gpu, queue=TeacherQueue(size, EMBED_DIM).to(args.device))
        steps[f"ours {size}"] = queue_part(size, args.batch_size, args.device, official=False)
        steps[f"official {size}"] = queue_part(size, args.batch_size, args.device, official=True)
    timings = interleaved(steps, args.rounds, args.device)
    load_after = os.getloadavg()
    if gpu:  # what every step's model shares is resident too: report the peak over it and the queue's own bytes
        memory = {size: {"step_extra_mib": timings[f"step {size}"]["step_mib"]} for size in args.sizes}

    rows = []
    for size in args.sizes:
        step_s, ours_s, official_s = (timings[f"{kind} {size}"]["step_s"] for kind in ("step", "ours", "official"))
        rows.append([f"{size:,}", f"{size * EMBED_DIM * 4 / 2**20:.1f}", fmt_ms(step_s) + spread(timings[f"step {size}"], "step_s"),
                     f"{args.batch_size / step_s:.0f}", fmt_ms(ours_s),
                     f"{100 * ours_s / step_s:.1f}%", fmt_ms(official_s),
                     *([] if gpu else [f"{memory[size]['resident_mib']:.0f}", f"{memory[size]['training_peak_mib']:.0f}"]),
                     f"{memory[size]['step_extra_mib']:.0f}"])
    columns = ["K", "queue (MiB)", "SEED step", "images/s", "loss + enqueue (ours)", "its share of the step", "loss + enqueue (official: 2 clones)",
               *([] if gpu else ["resident between steps (MiB)", "peak during steps (MiB)"]), "step memory over resident (MiB)"]
    first, last = args.sizes[0], args.sizes[-1]
    step_first, step_last = timings[f"step {first}"]["step_s"], timings[f"step {last}"]["step_s"]
    ours_first, ours_last = timings[f"ours {first}"]["step_s"], timings[f"ours {last}"]["step_s"]
    official_last = timings[f"official {last}"]["step_s"]
    notes = [
        f"From K = {first:,} to {last:,} ({last // first}x) the whole step goes from {fmt_ms(step_first)} to {fmt_ms(step_last)} "
        f"({100 * (step_last / step_first - 1):+.0f}%); the part that depends on K (loss + enqueue) from {fmt_ms(ours_first)} to "
        f"{fmt_ms(ours_last)}, {100 * ours_last / step_last:.1f}% of the step at K = {last:,}"
        + (": the encoders, not the queue, set the step time." if ours_last / step_last < 0.1 else ": at this size the queue is a sizeable part of the step."),
        f"At K = {last:,} the official loss (two clones of the queue) takes {official_last / ours_last:.2f}x ours.",
    ]
    if not gpu:
        rss_first, rss_last = memory[first]["training_peak_mib"], memory[last]["training_peak_mib"]
        extra_first, extra_last = memory[first]["step_extra_mib"], memory[last]["step_extra_mib"]
        notes.append(f"Peak resident memory during training grows by {rss_last - rss_first:.0f} MiB from K = {first:,} to {last:,} "
                     f"(of {rss_last:.0f} MiB, most of it models, optimiser state and libraries), what a step allocates by "
                     f"{extra_last - extra_first:.0f} MiB; the bank itself grows by "
                     f"{(last - first) * EMBED_DIM * 4 / 2**20:.0f} MiB and each (batch x K) similarity matrix by "
                     f"{args.batch_size * (last - first) * 4 / 2**20:.0f} MiB.")
    else:
        extra_first, extra_last = memory[first]["step_extra_mib"], memory[last]["step_extra_mib"]
        notes.append(f"GPU memory a step allocates grows by {extra_last - extra_first:.0f} MiB from K = {first:,} to {last:,}.")
    plots = [
        {"file": f"{result_name('queue', args.device)}_time.png", "title": f"SEED step vs queue size ({args.device})", "xlabel": "K (queue size)",
         "ylabel": "ms", "logx": True, "logy": True,
         "series": [{"label": label, "x": args.sizes, "y": [1000 * timings[f"{kind} {size}"]["step_s"] for size in args.sizes]}
                    for label, kind in (("whole SEED step", "step"), ("loss + enqueue, ours", "ours"), ("loss + enqueue, official", "official"))]},
        {"file": f"{result_name('queue', args.device)}_memory.png", "title": f"Memory vs queue size ({args.device})", "xlabel": "K (queue size)",
         "ylabel": "MiB", "logx": True, "logy": True,
         "series": [*([] if gpu else [{"label": "peak RSS during steps", "x": args.sizes, "y": [memory[s]["training_peak_mib"] for s in args.sizes]}]),
                    {"label": "step memory over resident", "x": args.sizes, "y": [memory[s]["step_extra_mib"] for s in args.sizes]},
                    {"label": "queue bank", "x": args.sizes, "y": [s * EMBED_DIM * 4 / 2**20 for s in args.sizes]}]},
    ]
    shared = (f" The CPU was shared with other jobs (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores)."
              if not gpu else "")
    description = (
        f"Our SEED step ({args.teacher} → {args.student}, {args.image_size}px, batch {args.batch_size}, 128-d embeddings, "
        f"`seed-distill`'s teacher settings on {'a GPU: BN folded, channels_last, bf16' if gpu else 'a CPU: BN folded, fp32'}) with a queue "
        "of K teacher embeddings, and the part of it that depends on K: SEED's loss with its backward into the student embedding, "
        "and the enqueue, timed on fixed embeddings, for ours and for the official code's (which clones the queue twice). All Ks "
        f"interleaved round-robin in one process, median of {args.rounds} steps (± half the interquartile range). "
        + ("Memory: each K in a fresh process; after two warm-up steps, the resident memory between steps (models, optimiser state, "
           "queue, libraries), the peak resident memory over two more steps, and the difference: what a step allocates (glibc set to "
           "unmap freed blocks from 64 KiB up, so that RSS follows the live tensors)." if not gpu else
           "Memory: `torch.cuda.max_memory_allocated` during a step minus what was allocated before it.")
        + shared + f" Torch threads: {torch.get_num_threads()}."
    )
    write_result(result_name("queue", args.device), {
        "title": "Queue scaling" + (" (GPU)" if gpu else ""), "order": 30 if not gpu else 31,
        "command": "python " + " ".join(["-m", "bench.queue_bench", *sys.argv[1:]]),
        "description": description, "tables": [{"columns": columns, "rows": rows}], "plots": plots, "notes": notes,
        "data": {"settings": vars(args), "load_average": [load_before, load_after], "timings": timings,
                 "memory": {str(k): v for k, v in memory.items()}},
    }, device=args.device)


if __name__ == "__main__":
    main()
