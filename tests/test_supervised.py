import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pretrain.supervised import Supervised
from seed.checkpoints import load_classifier, load_file
from seed.config import resolve
from seed.engine import build_trainer
from seed.registry import method_config

from .conftest import TINY, run_command
from .test_meal import _classifier_file


def test_the_recipe_is_the_standard_one(tmp_path):
    config = resolve(method_config("pretrain", {"method": "supervised", "batch_size": 512}), Supervised.DEFAULTS)
    module = Supervised(config, num_classes=10)
    assert (config.optimizer, config.weight_decay, config.momentum, module.lr()) == ("sgd", 1e-4, 0.9, 0.2)  # 0.1 x 512/256


def test_training_fits_the_labels(tmp_path):
    pl.seed_everything(0, verbose=False)
    config = resolve(method_config("pretrain", {"method": "supervised", "arch": "r18", "image_size": 16, "small_images": False,
                                                  "batch_size": 16, "epochs": 8, "knn_every": 0, "lr": 0.05}), Supervised.DEFAULTS)
    module = Supervised(config, num_classes=4)
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(32) % 4

    def cross_entropy() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(module(images), labels))

    module.train()
    before = cross_entropy()
    build_trainer(config, tmp_path).fit(module, DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True))
    assert cross_entropy() < 0.5 * before


def test_cli_writes_teacher_with_its_classifier(tmp_path, tiny_args):
    out = tmp_path / "run"
    result = run_command("seed-pretrain", "--method", "supervised", *TINY, "--no-small-images", "--max-steps", "2",
                         "--knn-every-steps", "2", "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "r18 supervised" in result.stdout and "val top-1 (360 images)" in result.stdout
    assert {"teacher.pt", "last.ckpt", "config.yaml", "top1.json", "knn.json"} <= {p.name for p in out.iterdir()}
    assert "val_top1" in (out / "logs" / "metrics.csv").read_text().splitlines()[0]  # the classifier is monitored
    exported = load_file(out / "teacher.pt")
    assert exported["method"] == "supervised" and exported["num_classes"] == 10 and exported["embed_dim"] == 10
    assert exported["head_state_dict"]["weight"].shape == (10, 512)
    backbone, classifier, found, small_images = load_classifier(out / "teacher.pt")
    assert found == "seed export (supervised)" and classifier.out_features == 10 and small_images is False
    assert torch.equal(classifier.weight, exported["head_state_dict"]["weight"])
    from_ckpt = load_classifier(out / "last.ckpt")[1]  # the Lightning checkpoint is a classifier too
    assert torch.equal(from_ckpt.weight, classifier.weight)


def test_init_starts_from_the_classifier_file_and_trains_on(tmp_path):
    """``--init FILE`` (the label control of a distilled student): the run starts from the file's backbone and classifier.
    One step at lr 1e-9 leaves every weight where the file had it, then the run trains on from there. Seen to fail when build
    ignored the init (the run's own random weights)."""
    init = _classifier_file(tmp_path / "init.pt", seed=5)
    out = tmp_path / "run"
    result = run_command("seed-pretrain", "--method", "supervised", *TINY, "--no-small-images", "--max-steps", "1", "--lr", "1e-9",
                         "--knn-every", "0", "--init", str(init), "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"init: {init} (seed export (supervised))" in result.stdout
    (start, start_head, _, _), (trained, trained_head, _, _) = load_classifier(init), load_classifier(out / "teacher.pt")
    for (name, before), after in zip(start.named_parameters(), trained.parameters(), strict=True):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(trained_head.weight, start_head.weight, atol=1e-6, rtol=0)


def test_an_init_of_other_classes_or_another_stem_stops_in_one_line(tmp_path):
    four = _classifier_file(tmp_path / "four.pt", classes=4)
    result = run_command("seed-pretrain", "--method", "supervised", *TINY, "--no-small-images", "--init", str(four), "--output", str(tmp_path / "a"))
    assert result.returncode == 2 and f"--init {four} classifies 4 classes, --data digits has 10" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    ten = _classifier_file(tmp_path / "ten.pt")
    result = run_command("seed-pretrain", "--method", "supervised", *TINY, "--small-images", "--init", str(ten), "--output", str(tmp_path / "b"))
    assert result.returncode == 2 and "was trained without the small-image stem; drop --small-images" in result.stderr, result.stderr
