"""What the speed benchmarks share: SEED steps built as ``seed-distill`` builds them, the official
code's step, the student's MoCo v2 step, and interleaved timing.

"Ours" is :class:`seed.distill.SEED` itself (its ``seed_step`` and its ``optimizer_step``,
the optimiser step and the enqueue, as the Trainer calls it) around a :class:`seed.teacher.FrozenTeacher`. The official
step follows jacobswan1/SEED ``seed/builder.py``: teacher under ``torch.no_grad``
in eval mode with its BatchNorm layers, the (D, K) queue cloned for each of the
two einsums, fp32. Models have random weights (speed does not depend on them) and
the ImageNet stem at every image size, as the demo runs at 32px.
"""

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from lightly.models.utils import batch_shuffle, batch_unshuffle, update_momentum
from torch import Tensor, nn

from seed.backbones import create_backbone
from seed.config import resolve
from seed.distill import SEED
from seed.queue import TeacherQueue
from seed.registry import method_config
from seed.teacher import FrozenTeacher
from seed.teacher_cache import TeacherCache

EMBED_DIM = 128  # SEED's and MoCo v2's embedding size


def check_device(device: str) -> None:
    """One clear line, not a traceback, when a GPU run is asked for where there is none."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA GPU on this machine; run on one that has a GPU, or use --device cpu")


def parse_speed_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add ``--device`` and ``--threads`` (every speed benchmark has them), parse, check the device, set the threads."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def result_name(name: str, device: str) -> str:
    """``bench/results/<name>.json`` for CPU runs, ``<name>_gpu.json`` for GPU runs, so neither overwrites the other."""
    return name if device == "cpu" else f"{name}_gpu"


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``r50:r18,r50x2:mbv3l`` -> [(teacher, student), ...]."""
    pairs = [tuple(item.split(":")) for item in text.split(",") if item]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--pairs {text!r}: expected teacher:student[,teacher:student...], e.g. r50:r18")
    return pairs  # type: ignore[return-value]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, bf16: bool) -> Any:
    """bf16 autocast as Lightning's ``bf16-mixed`` precision applies it to a training step."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()


def teacher_parts(arch: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A random teacher backbone with MoCo v2's MLP head (d-d-128), as SEED's teachers have."""
    torch.manual_seed(seed)
    backbone = create_backbone(arch)
    dim = backbone.feature_dim
    return backbone, nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, EMBED_DIM))


class Stopwatch(nn.Module):
    """Wraps a teacher and records how long its last forward took (synchronised on GPU)."""

    def __init__(self, teacher: nn.Module, device: str) -> None:
        super().__init__()
        self.teacher, self.device, self.seconds = teacher, device, 0.0
        self.embed_dim = teacher.embed_dim

    def forward(self, images: Tensor) -> Tensor:
        sync(self.device)
        start = time.perf_counter()
        out = self.teacher(images)
        sync(self.device)
        self.seconds = time.perf_counter() - start
        return out


class OfficialTeacher(nn.Module):
    """The official code's teacher: eval mode, ``torch.no_grad``, BatchNorm as is, fp32."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone.eval(), head.eval()
        self.embed_dim = EMBED_DIM
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "OfficialTeacher":
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return F.normalize(self.head(self.backbone(images)), dim=1)


class OfficialSEED(nn.Module):
    """jacobswan1/SEED's ``SEED.forward`` and loss: (D, K) queue, cloned twice per step, enqueued in the forward."""

    def __init__(self, student: str, teacher: nn.Module, queue_size: int, tau_s: float = 0.2, tau_t: float = 1e-4) -> None:
        super().__init__()
        self.student = create_backbone(student)
        dim = self.student.feature_dim
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, EMBED_DIM))
        self.teacher = teacher
        self.tau_s, self.tau_t = tau_s, tau_t
        self.register_buffer("queue", F.normalize(torch.randn(EMBED_DIM, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, images: Tensor) -> Tensor:
        s_emb = F.normalize(self.head(self.student(images)), dim=1)
        t_emb = self.teacher(images)
        return official_loss_and_enqueue(s_emb, t_emb, self.queue, self.queue_ptr, self.tau_s, self.tau_t)


def official_loss_and_enqueue(s_emb: Tensor, t_emb: Tensor, queue: Tensor, queue_ptr: Tensor, tau_s: float, tau_t: float) -> Tensor:
    """The official ``SEED.forward`` after the two encoders, its ``_dequeue_and_enqueue`` and soft cross-entropy."""
    logit_stu = torch.einsum("nc,ck->nk", [s_emb, queue.clone().detach()])
    logit_tea = torch.einsum("nc,ck->nk", [t_emb, queue.clone().detach()])
    logit_s_p = torch.einsum("nc,nc->n", [s_emb, t_emb]).unsqueeze(-1)
    logit_t_p = torch.einsum("nc,nc->n", [t_emb, t_emb]).unsqueeze(-1)
    logit_stu = torch.cat([logit_s_p, logit_stu], dim=1) / tau_s
    target = F.softmax(torch.cat([logit_t_p, logit_tea], dim=1) / tau_t, dim=1)
    with torch.no_grad():  # K % batch == 0, as the official code asserts
        ptr = int(queue_ptr)
        queue[:, ptr:ptr + len(t_emb)] = t_emb.T
        queue_ptr[0] = (ptr + len(t_emb)) % queue.shape[1]
    return -(target * F.log_softmax(logit_stu, dim=1)).sum(dim=1).mean()


def seed_module(student: str, teacher: nn.Module, queue_size: int, image_size: int) -> SEED:
    """Our SEED LightningModule with the paper's temperatures; ImageNet stem at every size."""
    config = method_config("distill", {"student": student, "queue_size": queue_size, "image_size": image_size, "small_images": False,
                                         "knn_every": 0})
    return SEED(resolve(config, SEED.DEFAULTS), teacher, num_classes=10)


def sgd(module: nn.Module) -> torch.optim.Optimizer:
    """SEED's optimiser (lr 0.03, momentum 0.9, wd 1e-4) over what the step trains."""
    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.03, momentum=0.9, weight_decay=1e-4)


StepFn = Callable[[], dict[str, float]]


def official_step(model: OfficialSEED, images: Tensor) -> StepFn:
    optimizer = sgd(model)

    def step() -> dict[str, float]:
        loss = model(images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"teacher_s": model.teacher.seconds}

    return step


def ours_step(module: SEED, images: Tensor, device: str, bf16: bool = False, queue: TeacherQueue | None = None,
              cache: TeacherCache | None = None) -> StepFn:
    """One optimiser step as the Trainer runs it: ``SEED.seed_step`` (under autocast when bf16), backward, then
    ``SEED.optimizer_step``, the optimiser step and the enqueue; against ``queue`` when given instead of the module's own.
    With ``cache`` (``--teacher-cache``) a step of a cached epoch: the batch's embeddings are read back from the cache,
    which the teacher fills here first, and no teacher runs."""
    optimizer = sgd(module)
    queue = module.queue if queue is None else queue
    rows = torch.arange(len(images)), torch.zeros(len(images), dtype=torch.long)
    if cache is not None:
        module.cache = cache
        cache.prepare()
        cache.open()
        cache.write(*rows, module.teacher(images))

    def step() -> dict[str, float]:
        with autocast(device, bf16):
            teacher = module.cached(*rows, lambda miss: module.teacher(images)[miss]) if cache is not None else module.teacher(images)
            loss = module.seed_step(images, teacher, queue)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        module.optimizer_step(0, 0, optimizer)
        return {"teacher_s": 0.0 if cache is not None else module.teacher.seconds}

    return step


def mocov2_step(arch: str, queue_size: int, image_size: int, images: Tensor, device: str, bf16: bool = False) -> StepFn:
    """The student alone, self-supervised: ``pretrain.mocov2.MoCoV2``'s encoders, momentum copy and loss,
    the body of its ``training_step`` without a Trainer (two views, shuffle-BN / split BatchNorm, K negatives)."""
    from pretrain.mocov2 import MoCoV2

    config = method_config("pretrain", {"arch": arch, "queue_size": queue_size, "image_size": image_size, "batch_size": len(images),
                                          "small_images": False, "knn_every": 0})
    module = MoCoV2(resolve(config, MoCoV2.DEFAULTS), num_classes=10).to(device).train()
    optimizer = sgd(module)
    keys = images.flip(0).contiguous()  # the second view

    def step() -> dict[str, float]:
        update_momentum(module.backbone, module.backbone_momentum, module.config.moco_momentum)
        update_momentum(module.projection_head, module.projection_head_momentum, module.config.moco_momentum)
        with autocast(device, bf16):
            query = module.projection_head(module.backbone(images))
            with torch.no_grad():
                shuffled, order = batch_shuffle(keys, distributed=False)
                key = batch_unshuffle(module.projection_head_momentum(module.backbone_momentum(shuffled)), order, distributed=False)
            loss = module.criterion(query, key)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"teacher_s": 0.0}

    return step


def teacher_variant(backbone: nn.Module, head: nn.Module, device: str, fold_bn: bool, channels_last: bool) -> Stopwatch:
    return Stopwatch(FrozenTeacher(copy.deepcopy(backbone), copy.deepcopy(head), fold_bn=fold_bn, channels_last=channels_last).to(device), device)


def interleaved(steps: dict[str, StepFn], rounds: int, device: str, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Run every step ``warmup`` times, then ``rounds`` rounds round-robin, so that load from other
    processes hits all variants alike. Medians of step seconds, teacher seconds and, on GPU, the
    memory a step allocates on top of what was resident before it (MiB); ``<key>_spread`` is half the
    interquartile range of the seconds over the median, the noise to read differences against."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            gpu = device.startswith("cuda")
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            sync(device)
            start = time.perf_counter()
            found = step()
            sync(device)
            found["step_s"] = time.perf_counter() - start
            if gpu:
                found["step_mib"] = (torch.cuda.max_memory_allocated() - resident) / 2**20
                found["resident_mib"] = resident / 2**20
            samples[name].append(found)
    found: dict[str, dict[str, float]] = {}
    for name, values in samples.items():
        found[name] = {key: statistics.median(s[key] for s in values) for key in values[0]}
        for key in ("step_s", "teacher_s"):
            if len(values) > 1 and found[name].get(key):
                quartiles = statistics.quantiles([s[key] for s in values], n=4)
                found[name][f"{key}_spread"] = (quartiles[2] - quartiles[0]) / (2 * found[name][key])
    return found


def spread(timing: dict[str, float], key: str) -> str:
    """`` ±x%``: half the interquartile range of the samples, relative to their median ("" with one sample)."""
    value = timing.get(f"{key}_spread")
    return "" if value is None else f" ±{100 * value:.0f}%"


def fmt_ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms" if seconds >= 0.1 else f"{1000 * seconds:.1f} ms"
