import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pretrain.simclr import SimCLR
from seed.config import PretrainConfig


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("arch", ["r18", "mbv3s"])
def test_settled_statistics_are_the_plain_average_over_the_images(arch):
    """After settle_batchnorm every BatchNorm holds the mean and unbiased variance of its input over exactly
    --precise-bn-images images (two batches, averaged), whatever its momentum (MobileNetV3's is 0.01)."""
    torch.manual_seed(0)
    module = SimCLR(PretrainConfig(arch=arch, image_size=32, precise_bn_images=16, temperature=0.5), num_classes=10)
    images = torch.randn(40, 3, 32, 32) * 2 + 0.5
    loader = DataLoader(TensorDataset(images, torch.zeros(40)), batch_size=8)
    weights = {k: v.clone() for k, v in module.named_parameters()}
    momenta = [bn.momentum for bn in batchnorms(module.evaluated())]
    inputs: dict[nn.Module, list[torch.Tensor]] = {}
    hooks = [bn.register_forward_hook(lambda m, x, _: inputs.setdefault(m, []).append(x[0].detach())) for bn in batchnorms(module.evaluated())]
    module.eval()
    assert module.settle_batchnorm(loader) == 16
    for hook in hooks:
        hook.remove()
    assert not module.training  # the mode it had
    assert [bn.momentum for bn in batchnorms(module.evaluated())] == momenta
    assert all(torch.equal(weights[k], v) for k, v in module.named_parameters())
    assert len(inputs) == len(batchnorms(module.evaluated())) > 0
    for bn, seen in inputs.items():
        assert len(seen) == 2  # 16 images: two batches of 8, not the whole loader
        dims = [0, 2, 3] if seen[0].dim() == 4 else [0]
        mean = torch.stack([x.mean(dims) for x in seen]).mean(0)
        var = torch.stack([x.var(dims, unbiased=True) for x in seen]).mean(0)
        assert torch.allclose(bn.running_mean, mean, atol=1e-5, rtol=1e-4)
        assert torch.allclose(bn.running_var, var, atol=1e-5, rtol=1e-4)


def test_zero_images_keeps_the_running_averages():
    module = SimCLR(PretrainConfig(arch="r18", image_size=32, precise_bn_images=0, temperature=0.5), num_classes=10)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.zeros(8)), batch_size=8)
    assert module.settle_batchnorm(loader) == 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
