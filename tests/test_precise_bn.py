import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pretrain.simclr import SimCLR, SimCLRConfig


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("arch", ["r18", "mbv3s"])
def test_settled_statistics_are_the_plain_average_over_the_images(arch):
    """In the settled copy every BatchNorm holds the mean and unbiased variance of its input over exactly
    --precise-bn-images images (two batches, averaged), whatever its momentum (MobileNetV3's is 0.01); the module
    that trains keeps its running averages, so a resumed run still equals an uninterrupted one."""
    torch.manual_seed(0)
    module = SimCLR(SimCLRConfig(arch=arch, image_size=32, precise_bn_images=16, temperature=0.5), num_classes=10)
    images = torch.randn(40, 3, 32, 32) * 2 + 0.5
    loader = DataLoader(TensorDataset(images, torch.zeros(40)), batch_size=8)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    inputs: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        return lambda m, x, _: inputs.setdefault(name, []).append(x[0].detach())

    for name, bn in module.evaluated().named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.register_forward_hook(record(name))  # deep-copied with the module, so the copy records too
    settled = module.settled_copy(loader)
    assert not settled.training
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())  # the training module is untouched
    bns = dict(settled.named_modules())
    assert len(inputs) == len(batchnorms(settled)) > 0
    assert [bn.momentum for bn in batchnorms(settled)] == [bn.momentum for bn in batchnorms(module.evaluated())]
    for name, seen in inputs.items():
        bn = bns[name]
        assert len(seen) == 2  # 16 images: two batches of 8, not the whole loader
        dims = [0, 2, 3] if seen[0].dim() == 4 else [0]
        mean = torch.stack([x.mean(dims) for x in seen]).mean(0)
        var = torch.stack([x.var(dims, unbiased=True) for x in seen]).mean(0)
        assert torch.allclose(bn.running_mean, mean, atol=1e-5, rtol=1e-4)
        assert torch.allclose(bn.running_var, var, atol=1e-5, rtol=1e-4)


def test_zero_images_keeps_the_running_averages():
    module = SimCLR(SimCLRConfig(arch="r18", image_size=32, precise_bn_images=0, temperature=0.5), num_classes=10)
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.zeros(8)), batch_size=8)
    settled = module.settled_copy(loader).state_dict()
    assert all(torch.equal(settled[k], v) for k, v in module.evaluated().state_dict().items())
