"""seed-eval detection: VOC/COCO readers, VOC07 metric, detectron2 conversion, torchvision runs (through the engine) on synthetic data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from downstream import report
from downstream.common import Checkpoint, EvalConfig, file_sha256, write_results
from downstream.detection import config as flags
from downstream.detection import metrics as scores
from downstream.detection import models, run, train
from downstream.detection.data import read_voc
from seed.backbones import available, create_backbone
from seed.checkpoints import load_file
from seed.config import make_config
from tests.test_reliability import _assert_identical

HAS_DETECTRON2 = flags.detectron2_state() == "ready"


def non_resnets() -> list[str]:
    """Every registry backbone without ResNet stages, found by building each on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return [name for name in available() if not models.is_resnet(create_backbone(name))]


def tiny_run(checkpoint: Path, voc: Path, out: Path, *extra: str) -> list[str]:
    """The flags of a seconds-long torchvision run on the synthetic VOC set (12 train images: 6 iterations an epoch)."""
    return ["--checkpoint", str(checkpoint), "--data", str(voc), "--engine", "torchvision", "--accelerator", "cpu", "--image-size", "64",
            "--batch-size", "2", "--num-workers", "0", "--roi-per-image", "16", "--max-eval-images", "2", "--output", str(out), *extra]


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    """``downstream.run.main`` in-process: (exit code, stdout, stderr)."""
    code = 0
    try:
        run.main(args)
    except SystemExit as stop:
        code = int(stop.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- torchvision engine


def test_torchvision_voc_fpn_run_writes_results(synthetic, student, tmp_path, capsys):
    out = tmp_path / "runs" / "detection"
    code, printed, err = run_main(["--checkpoint", str(student), "--data", str(synthetic[0]), "--engine", "torchvision", "--head", "fpn",
                          "--image-size", "64", "--max-iter", "2", "--batch-size", "2", "--num-workers", "0",
                          "--max-eval-images", "3", "--output", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert results["protocol"] == "detection" and results["primary"] == "VOC07_AP50" and results["data"] == str(synthetic[0])
    assert settings["engine"] == "torchvision" and settings["iterations"] == 2 and settings["test_images"] == 3
    assert results["checkpoint"] == {"path": str(student), "sha256": file_sha256(student), "arch": "r18", "format": "seed export (seed)"}
    assert set(results["metrics"]) == {"AP", "AP50", "AP75", "VOC07_AP50", "VOC07_AP75", "VOC07_AP"}
    assert settings["model"] == "Faster R-CNN FPN" and settings["max_iter"] == 2
    assert settings["splits"].startswith("VOC2007 trainval + VOC2012 trainval")
    assert (out / "config.yaml").is_file() and load_file(out / "last.ckpt")["global_step"] == 2 and (out / "logs" / "metrics.csv").is_file()
    assert f"run folder: {out} (results.json, config.yaml, last.ckpt, logs/)" in printed
    assert "AP50 (VOC07 11-point)" in printed and "AP (COCO, IoU .50:.95)" in printed

    # seed-eval report over this run beside a knn and a linear result, all written by the one writer
    checkpoint = Checkpoint(student, file_sha256(student), "r18", "ours", create_backbone("r18"))
    config = EvalConfig(checkpoint=str(student), data="digits", image_size=16)
    write_results(tmp_path / "runs" / "knn", "knn", {"top1_k200": 81.25, "top1_k20": 83.5}, "top1_k200", config, checkpoint, {}, 1.0)
    write_results(tmp_path / "runs" / "linear", "linear", {"top1": 90.125, "top5": 99.0}, "top1", config, checkpoint, {}, 1.0)
    report.main([str(tmp_path / "runs"), "--png", str(tmp_path / "chart.png")])
    lines = capsys.readouterr().out.splitlines()
    label = f"student.pt ({file_sha256(student)[:8]})"
    assert lines[2:] == [f"| detection | detection | VOC07_AP50 | {results['metrics']['VOC07_AP50']:.2f} | {label} | {synthetic[0]} |",
                         f"| knn | knn | top1_k200 | 81.25 | {label} | digits |",
                         f"| linear | linear | top1 | 90.12 | {label} | digits |"]
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_undefined_detection_metrics_as_n_a(student, tmp_path, capsys):
    """A COCO run whose test images hold no object has no AP (null); a detection file of the old layout is still read."""
    checkpoint = Checkpoint(student, "f" * 64, "r18", "ours", create_backbone("r18"))
    config = flags.DetectionConfig(checkpoint=str(student), dataset="coco", data="coco-dir")
    written = write_results(tmp_path / "coco", "detection", {"AP": float("nan"), "AP50": None, "AP75": 12.5}, "AP", config, checkpoint, {}, 1.0)
    assert written["metrics"] == {"AP": None, "AP50": None, "AP75": 12.5}
    assert json.loads((tmp_path / "coco" / "results.json").read_text())["metrics"]["AP"] is None
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"protocol": "detection", "checkpoint": "/x/student.pt", "checkpoint_sha256": "ab" * 32,
                                                                "data": "VOC2007 ...", "metrics": {"AP": 50.0, "VOC07_AP50": 80.5}}))
    report.main([str(tmp_path), "--all-metrics"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == ["| coco | detection | AP | n/a | student.pt (ffffffff) | coco-dir |",
                         "| coco | detection | AP50 | n/a | student.pt (ffffffff) | coco-dir |",
                         "| coco | detection | AP75 | 12.50 | student.pt (ffffffff) | coco-dir |",
                         "| old | detection | AP | 50.00 | student.pt (abababab) | VOC2007 ... |",
                         "| old | detection | VOC07_AP50 | 80.50 | student.pt (abababab) | VOC2007 ... |"]
    assert (tmp_path / "report.png").is_file()


def test_torchvision_coco_mask_rcnn_c4_run(synthetic, student, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, err = run_main(["--checkpoint", str(student), "--dataset", "coco", "--data", str(synthetic[1]), "--engine", "torchvision",
                          "--image-size", "64", "--max-iter", "1", "--batch-size", "2", "--num-workers", "0", "--roi-per-image", "16",
                          "--max-eval-images", "2", "--output", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["model"] == "Mask R-CNN C4" and results["settings"]["masks"] is True and results["primary"] == "AP"
    assert set(results["metrics"]) == {"AP", "AP50", "AP75", "mask_AP", "mask_AP50", "mask_AP75"}  # no VOC07 metric on COCO
    assert all(0 <= value <= 100 for value in results["metrics"].values())


def perfect(records) -> list[dict]:
    """Every non-difficult ground-truth box found once, with distinct scores."""
    found = []
    for record in records:
        keep = ~record.difficult
        found.append({"image_id": record.image_id, "boxes": record.boxes[keep].astype(np.float32),
                      "scores": np.linspace(0.9, 0.5, int(keep.sum()), dtype=np.float32), "labels": record.labels[keep]})
    return found


def test_metrics_of_perfect_predictions_are_100_and_of_one_miss_the_hand_computed_value(synthetic):
    """The synthetic VOC test split: person (15) 7 boxes on 3 images, dog (12) 1 box on image 12 and 1 (+1 difficult) on image 13.

    Perfect detections: every AP is 100. Without the dog of image 12, dog recall stops at 1/2 at precision 1
    and person stays perfect. VOC07 11-point: the dog scores at t = 0, .1, ..., .5, so 6/11, and the mAP is
    (1 + 6/11) / 2. COCOeval's 101 recall points: 0, .01, ..., .50 are reached, 51/101, at every IoU
    threshold (the boxes are exact), so AP = AP50 = AP75 = (1 + 51/101) / 2.
    """
    data = read_voc(synthetic[0])
    test = data.test
    assert [(r.image_id, r.labels.tolist(), r.difficult.tolist()) for r in test] == [
        (12, [15, 15, 12], [False] * 3), (13, [12, 12], [True, False]), (14, [15], [False]), (15, [15] * 3, [False] * 3)]
    metrics = scores.evaluate_predictions(perfect(test), data, test, masks=False)
    assert metrics == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "VOC07_AP50": 100.0, "VOC07_AP75": 100.0, "VOC07_AP": 100.0}

    missed = perfect(test)
    first = missed[0]
    keep = first["labels"] != 12
    missed[0] = {"image_id": first["image_id"], "boxes": first["boxes"][keep], "scores": first["scores"][keep], "labels": first["labels"][keep]}
    metrics = scores.evaluate_predictions(missed, data, test, masks=False)
    voc, coco = 100 * (1 + 6 / 11) / 2, 100 * (1 + 51 / 101) / 2
    assert metrics == pytest.approx({"AP": coco, "AP50": coco, "AP75": coco, "VOC07_AP50": voc, "VOC07_AP75": voc, "VOC07_AP": voc}, abs=1e-9)
    assert round(voc, 2) == 77.27 and round(coco, 2) == 75.25


def test_detector_on_a_non_resnet_uses_its_last_feature_map():
    plan = flags.schedule(flags.resolve_config(flags.DetectionConfig(checkpoint="x", image_size=64, max_iter=1)))
    model = models.build_detector(create_backbone("mbv3s"), 4, "c4", False, plan, roi_per_image=8)
    image = torch.rand(3, 64, 64)
    losses = model([image], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])}])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.roi_heads.box_roi_pool.scales == [1 / 32]  # the true stride, not a guess from the first 64-px image (1/16)
    c4 = models.build_detector(create_backbone("r18"), 4, "c4", True, plan)
    assert c4.roi_heads.mask_head is c4.roi_heads.box_head[0]  # Mask R-CNN C4 shares res5 between box and mask heads
    assert c4.backbone.out_channels == 256 and not hasattr(c4.backbone, "layer4")
    assert c4.roi_heads.box_roi_pool.scales == c4.roi_heads.mask_roi_pool.scales == [1 / 16]


@pytest.mark.parametrize("arch", non_resnets())
def test_every_non_resnet_shows_its_resolutions_to_the_fpn_without_moving_a_statistic(arch):
    """The last block at each resolution of ``.features``: strides 2..32, or 1..16 with the small-image stem."""
    backbone = create_backbone(arch)
    before = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    levels = models.resolution_ends(backbone.features)
    assert [level.stride for level in levels] == [2, 4, 8, 16, 32] and levels[-1].block == str(len(backbone.features) - 1)
    assert levels[-1].channels == backbone.features[-1].out_channels
    assert backbone.features.training and all(torch.equal(before[name], tensor) for name, tensor in backbone.state_dict().items())
    small = models.resolution_ends(create_backbone(arch, small_images=True).features)
    assert [level.stride for level in small] == [1, 2, 4, 8, 16]


def test_fpn_detector_on_mbv3s_reads_strides_8_to_64_and_trains():
    plan = flags.schedule(flags.resolve_config(flags.DetectionConfig(checkpoint="x", image_size=64, max_iter=1)))
    torch.manual_seed(0)
    model = models.build_detector(create_backbone("mbv3s"), 4, "fpn", False, plan, roi_per_image=8)
    with torch.no_grad():
        maps = model.backbone.eval()(torch.zeros(1, 3, 128, 128))
    assert {name: (128 // value.shape[-1], value.shape[1]) for name, value in maps.items()} == {
        "0": (8, 256), "1": (16, 256), "2": (32, 256), "pool": (64, 256)}
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"] and model.roi_heads.box_roi_pool.scales == [1 / 8, 1 / 16, 1 / 32]
    model.train()
    losses = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])}])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    for part in (model.backbone.body["3"], model.backbone.body["12"], model.backbone.fpn):  # the stride-8 and stride-32 blocks, the pyramid
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    masks = models.build_detector(create_backbone("mbv3s"), 4, "fpn", True, plan, roi_per_image=8)
    assert masks.roi_heads.mask_roi_pool.featmap_names == ["0", "1", "2"]
    assert models.detector_name(create_backbone("mbv3s"), "fpn", True) == "Mask R-CNN FPN"


def test_torchvision_fpn_run_on_a_mobilenet_student(synthetic, mobile_student, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, err = run_main(tiny_run(mobile_student, synthetic[0], out, "--head", "fpn", "--max-iter", "2"), capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"]["arch"] == "mbv3s" and results["settings"]["model"] == "Faster R-CNN FPN" and results["settings"]["iterations"] == 2
    assert 0 <= results["metrics"]["VOC07_AP50"] <= 100 and "note:" not in printed
    assert load_file(out / "last.ckpt")["global_step"] == 2


def test_a_stopped_run_resumes_from_last_ckpt_as_if_never_stopped(synthetic, mobile_student, tmp_path, capsys):
    """2 iterations, then the same command to 4: it continues mid-epoch at iteration 2 and ends with the weights, momentum
    and lr schedule of a run that did 4 at once, bit for bit. (mbv3s with --head c4: the last-map detector, and a note.)"""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    schedule_flags = ["--max-iter", "4", "--warmup-iters", "2"]
    code, printed, err = run_main(tiny_run(mobile_student, synthetic[0], whole, *schedule_flags), capsys)
    assert code == 0, err
    assert "note: mbv3s has no res5 to put in the RoI head (--head c4): it detects on its last feature map (Faster R-CNN last-map)" in printed
    code, printed, err = run_main(tiny_run(mobile_student, synthetic[0], stopped, *schedule_flags, "--max-steps", "2"), capsys)
    assert code == 0, err
    assert load_file(stopped / "last.ckpt")["global_step"] == 2
    code, printed, err = run_main(tiny_run(mobile_student, synthetic[0], stopped, *schedule_flags, "--max-steps", "4"), capsys)
    assert code == 0, err
    assert f"resuming from {stopped / 'last.ckpt'}" in printed
    assert json.loads((stopped / "results.json").read_text())["settings"]["iterations"] == 4
    expected, got = load_file(whole / "last.ckpt"), load_file(stopped / "last.ckpt")
    assert got["global_step"] == expected["global_step"] == 4
    for part in ("state_dict", "optimizer_states", "lr_schedulers", "callbacks"):
        _assert_identical(got[part], expected[part], part)


def test_a_nan_loss_stops_the_run_with_the_engines_one_line_error(synthetic, mobile_student, tmp_path, capsys, monkeypatch):
    finite = train.DetectionModule.training_step
    monkeypatch.setattr(train.DetectionModule, "training_step",
                        lambda self, batch, batch_idx: finite(self, batch, batch_idx) * (float("nan") if self.global_step == 1 else 1.0))
    out = tmp_path / "run"
    code, printed, err = run_main(tiny_run(mobile_student, synthetic[0], out, "--max-iter", "4", "--checkpoint-every", "1"), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == f"seed-eval detection: error: loss became nan at step 2; last good checkpoint: {out / 'last.ckpt'} (step 1)"
    assert load_file(out / "last.ckpt")["global_step"] == 1 and not (out / "results.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_asked_for_without_one_is_a_one_line_error(synthetic, student, capsys):
    code, printed, err = run_main(["--checkpoint", str(student), "--data", str(synthetic[0]), "--engine", "torchvision", "--accelerator", "gpu"], capsys)
    assert code == 2 and err == "seed-eval detection: error: --accelerator gpu: no CUDA GPU is visible; use --accelerator cpu\n"


# ---------------------------------------------------------------- user errors


@pytest.mark.parametrize("case", ["missing-path", "empty-voc", "no-coco-json", "no-data", "masks-on-voc"])
def test_bad_input_is_a_one_line_error(case, synthetic, student, tmp_path, capsys):
    args = {
        "missing-path": ["--data", str(tmp_path / "nowhere")],
        "empty-voc": ["--data", str(tmp_path)],
        "no-coco-json": ["--dataset", "coco", "--data", str(tmp_path)],
        "no-data": [],
        "masks-on-voc": ["--data", str(synthetic[0]), "--masks"],
    }[case]
    (tmp_path / "train2017").mkdir()
    code, printed, err = run_main(["--checkpoint", str(student), "--engine", "torchvision", *args], capsys)
    expected = {"missing-path": "does not exist", "empty-voc": "no VOC data under", "no-coco-json": "instances_train2017.json",
                "no-data": "pass --data PATH", "masks-on-voc": "VOC has no instance masks"}[case]
    assert code == 2 and err.startswith("seed-eval detection: error: ") and err.count("\n") == 1 and expected in err


@pytest.mark.parametrize("name", ["detection_voc_c4", "detection_coco_c4_1x", "detection_voc_smoke"])
def test_recipe_files_are_valid_configs(name):
    path = Path(__file__).parents[1] / "configs" / "eval" / f"{name}.yaml"
    config = flags.resolve_config(make_config(flags.DetectionConfig, {"config": str(path), "checkpoint": "x"}))
    if name == "detection_voc_c4":  # MoCo's numbers are the defaults too
        assert config == flags.resolve_config(flags.DetectionConfig(checkpoint="x", config=str(path)))
    assert config.masks is (name == "detection_coco_c4_1x")


def _one_step(model: torch.nn.Module) -> None:
    model.train()
    losses = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])}])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()


def test_a_timm_cnn_detects_on_its_features_only_maps_with_the_transferred_weights():
    """timm:NAME without ResNet stages or .features: timm's FeatureListNet over the backbone's own modules gives the FPN its
    strides 8/16/32 (and the pool, 64) and the last-map head its stride 32; the backbone's own parameters get gradients.
    Seen to fail: with TimmMaps building features from a fresh timm model (features_only=True), the backbone got no gradient."""
    plan = flags.schedule(flags.resolve_config(flags.DetectionConfig(checkpoint="x", image_size=64, max_iter=1)))
    torch.manual_seed(0)
    backbone = create_backbone("timm:mobilenetv3_small_050")
    model = models.build_detector(backbone, 4, "fpn", False, plan, roi_per_image=8)
    with torch.no_grad():
        maps = model.backbone.eval()(torch.zeros(1, 3, 128, 128))
    assert {name: 128 // value.shape[-1] for name, value in maps.items()} == {"0": 8, "1": 16, "2": 32, "pool": 64}
    assert model.roi_heads.box_roi_pool.scales == [1 / 8, 1 / 16, 1 / 32]
    _one_step(model)
    assert backbone.conv_stem.weight.grad is not None and backbone.conv_stem.weight.grad.abs().sum() > 0
    last = models.build_detector(create_backbone("timm:mobilenetv3_small_050"), 4, "c4", False, plan, roi_per_image=8)
    assert last.roi_heads.box_roi_pool.scales == [1 / 32] and models.detector_name(backbone, "c4", False) == "Faster R-CNN last-map"
    _one_step(last)


def test_timm_and_torchvision_resnets_get_the_c4_head_and_a_vit_is_a_one_line_error():
    """timm's ResNet names its stem activation act1, torchvision's relu: both get res5 in the RoI head; a ViT gives tokens.
    Seen to fail: with the C4 stem names fixed to torchvision's, timm:resnet18 had no 'relu'."""
    plan = flags.schedule(flags.resolve_config(flags.DetectionConfig(checkpoint="x", image_size=64, max_iter=1)))
    for name in ("timm:resnet18", "tv:resnet18"):
        c4 = models.build_detector(create_backbone(name), 4, "c4", False, plan, roi_per_image=8)
        assert c4.backbone.out_channels == 256 and c4.roi_heads.box_roi_pool.scales == [1 / 16]
    _one_step(c4)
    with pytest.raises(flags.SeedError, match="timm:vit_tiny_patch16_224 gives tokens, not feature maps") as error:
        models.build_detector(create_backbone("timm:vit_tiny_patch16_224"), 4, "fpn", False, plan)
    assert "\n" not in str(error.value)
