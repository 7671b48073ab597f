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
