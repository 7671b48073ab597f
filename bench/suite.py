"""The benchmarks of ``python -m bench``, each with its script and arguments: read by the runner and by the page."""

# name -> (script, CPU arguments, GPU arguments or None when the benchmark is CPU-only).
# A GPU run writes bench/results/<name>_gpu.json beside the CPU one.
SUITE: dict[str, tuple[str, list[str], list[str] | None]] = {}
OPTIONAL: set[str] = set()  # registered but too long for `make bench`: run with --only NAME
GPU_OPTIONAL: set[str] = set()  # has a GPU variant that `make bench-gpu` leaves out: python -m bench --gpu --only NAME


def register(name: str, script: str, cpu_args: list[str], gpu_args: list[str] | None = None, default: bool = True,
             gpu_default: bool = True) -> None:
    SUITE[name] = (script, cpu_args, gpu_args)
    if not default:
        OPTIONAL.add(name)
    if gpu_args is not None and not gpu_default:
        GPU_OPTIONAL.add(name)


# quality needs the reference teacher (make teacher); on a GPU it trains a ResNet-50 teacher itself (about 8 min in all), so
# `make bench-gpu` (the speed benchmarks, within 8 min) leaves it to `python -m bench --gpu --only quality`.
register("quality", "bench/quality.py", [], ["--teacher-config", "configs/bench/gpu/teacher_r50.yaml", "--configs", "configs/bench/gpu",
                                             "--seeds", "0", "--weak-epoch", "4", "--name", "quality_gpu"], gpu_default=False)
register("teacher_curve", "bench/teacher_curve.py", [])
GPU_SPEED = ["--device", "cuda", "--image-size", "224", "--batch-size", "256", "--rounds", "10"]
register("distill_speed", "bench/distill_speed.py", ["--threads", "1", "--rounds", "8"], [*GPU_SPEED, "--pairs", "r50:r18,r50x2:mbv3l"])
# The same ResNet-18 through each door (r18, tv:resnet18, timm:resnet18), one SEED step side by side: python -m bench --only backbone_speed.
register("backbone_speed", "bench/backbone_speed.py", ["--threads", "1", "--rounds", "8"], GPU_SPEED, default=False, gpu_default=False)
register("queue", "bench/queue_bench.py", ["--threads", "1", "--rounds", "6"], GPU_SPEED)
register("knn", "bench/knn_bench.py", ["--threads", "1"], ["--device", "cuda", "--sizes", "10000,100000,1000000"])
register("knn_ivf", "bench/knn_ivf.py", ["--threads", "1"])
register("data_loading", "bench/data_loading.py", ["--threads", "1"],
         ["--device", "cuda", "--datasets", "fashion-mnist:32:256,synthetic:224:256", "--workers", "0,4,8,16"])
register("meal", "bench/meal_bench.py", [], default=False)
# The labelled benchmark trains its two teachers when $SEED_CACHE/labelled-teachers lacks them; on a GPU only its KD overhead figure.
register("labelled", "bench/labelled.py", [], ["--overhead-only", "--device", "cuda", "--image-size", "224", "--batch-size", "256", "--rounds", "10"])
register("eval_speed", "bench/eval_speed.py", ["--threads", "1"])
register("detection", "bench/detection_bench.py", ["--threads", "1"])
register("detection_fashion", "bench/detection_bench.py", ["--scenes", "fashion"], default=False)  # needs make teacher and quality's r18 student
