"""LoRA on Conv1d, Conv2d and Conv3d kernels: shapes, the update's math, the unmerged forward, and peft as the oracle."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftpeft import LoRAConfig, LoRAParameters, functional_forward, peft_method_from_config
from ftpeft.io import load_hf_peft_adapter, save_hf_peft_adapter

from conftest import copy_into_peft, state_of


def lora(pattern, r=2, alpha=4.0, **params):
    return peft_method_from_config(LoRAConfig(module_name_pattern=pattern, params=LoRAParameters(r=r, alpha=alpha, **params)))


class ConvNet(nn.Module):
    """Strided, 'same'-padded with circular padding, dilated 3-D, and reflect-padded 1-D convolutions."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.wrap = nn.Conv2d(8, 4, (3, 1), padding="same", padding_mode="circular")
        self.volume = nn.Conv3d(2, 3, 2, dilation=2)
        self.signal = nn.Conv1d(2, 5, 3, padding=2, padding_mode="reflect", stride=2)

    def forward(self, image, volume, signal=None):
        signal = torch.zeros(1, 2, 7) if signal is None else signal
        return self.wrap(torch.relu(self.down(image))), self.volume(volume), self.signal(signal)


def random_b(tree):
    generator = torch.Generator().manual_seed(3)
    return {k: (torch.randn(v.shape, generator=generator) * 0.1 if k.endswith("lora_B") else v) for k, v in tree.items()}


def test_conv_adapter_shapes_and_init():
    method = lora(["down", "volume"], r=2)

    tree = method.inject(state_of(ConvNet()), generator=torch.Generator().manual_seed(0))

    assert tree["down.lora_A"].shape == (2, 3, 3, 3)
    assert tree["down.lora_B"].shape == (8, 2, 1, 1)
    assert tree["volume.lora_A"].shape == (2, 2, 2, 2, 2)
    assert tree["volume.lora_B"].shape == (3, 2, 1, 1, 1)
    assert torch.equal(tree["down.lora_B"], torch.zeros(8, 2, 1, 1))
    # kaiming_uniform with a = sqrt(5): bound 1 / sqrt(in * kernel size) = 1 / sqrt(27).
    assert tree["down.lora_A"].abs().max() <= 1 / math.sqrt(27)


def test_conv_merge_matches_formula():
    method = lora(["down"], r=2, alpha=6.0)
    tree = random_b(method.inject(state_of(ConvNet())))

    merged = method.merge(tree)["down.weight"]

    lora_a, lora_b = tree["down.lora_A"], tree["down.lora_B"]
    expected = tree["down.weight"] + 3.0 * torch.einsum("or,rikl->oikl", lora_b[:, :, 0, 0], lora_a)
    torch.testing.assert_close(merged, expected)
    restored = method.unmerge(method.merge(tree), {k: tree[k] for k in ("down.lora_A", "down.lora_B")})
    torch.testing.assert_close(restored["down.weight"], tree["down.weight"])


def test_conv_forward_unmerged_equals_merged():
    model = ConvNet().eval()
    method = lora(["down", "wrap", "volume", "signal"])
    tree = random_b(method.inject(state_of(model)))
    image, volume, signal = torch.randn(2, 3, 9, 9), torch.randn(1, 2, 6, 6, 6), torch.randn(3, 2, 11)

    adapted = functional_forward(model, method)(tree, image, volume, signal)
    merged = functional_forward(model)(method.merge(tree), image, volume, signal)

    assert tree["signal.lora_A"].shape == (2, 2, 3)
    assert tree["signal.lora_B"].shape == (5, 2, 1)

    for ours, reference in zip(adapted, merged):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_conv_forward_builds_no_dense_kernel_update():
    model = nn.Conv2d(3, 5, 3)
    method = lora(r".*", r=2)
    tree = random_b(method.inject(state_of(model)))
    x = torch.randn(1, 3, 6, 6)
    low = F.conv2d(x, tree["lora_A"])

    out = functional_forward(model, method)(tree, x)

    torch.testing.assert_close(out, F.conv2d(x, tree["weight"], tree["bias"]) + 2.0 * F.conv2d(low, tree["lora_B"]))


def test_conv_matches_peft_and_round_trips(tmp_path):
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, (3, 1), padding="same")).eval()
    method = lora(["0", "2"])
    tree = random_b(method.inject(state_of(model)))
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    assert copy_into_peft(peft_model, tree) == 2
    x = torch.randn(2, 3, 9, 9)
    ours = functional_forward(model, method)(tree, x)

    torch.testing.assert_close(ours, peft_model.eval()(x), rtol=1e-5, atol=1e-5)
    peft_model.save_pretrained(tmp_path / "from_peft")
    config, adapter = load_hf_peft_adapter(tmp_path / "from_peft", base=state_of(model))
    torch.testing.assert_close(functional_forward(model, peft_method_from_config(config))({**state_of(model), **adapter}, x), ours, rtol=1e-5, atol=1e-5)
    save_hf_peft_adapter(tmp_path / "ours", config, adapter)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(reloaded(x), ours, rtol=1e-5, atol=1e-5)
    merged = peft_model.merge_and_unload().state_dict()
    torch.testing.assert_close(method.merge(tree)["0.weight"], merged["0.weight"], rtol=1e-6, atol=1e-6)


def test_grouped_conv_uses_materialised_kernel():
    model = nn.Conv2d(4, 6, 3, groups=2)
    method = lora(r".*", r=2)
    tree = random_b(method.inject(state_of(model)))
    x = torch.randn(1, 4, 5, 5)

    out = functional_forward(model, method)(tree, x)

    torch.testing.assert_close(out, F.conv2d(x, method.merge(tree)["weight"], tree["bias"], groups=2))


def test_conv_rejects_svd_init():
    with pytest.raises(ValueError, match="needs a 2-D weight"):
        lora(["down"], init="pissa").inject(state_of(ConvNet()))


def test_conv1d_matches_peft():
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Conv1d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv1d(6, 4, 5, padding="same")).eval()
    method = lora(["0", "2"])
    tree = random_b(method.inject(state_of(model)))
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    assert copy_into_peft(peft_model, tree) == 2
    x = torch.randn(2, 3, 17)

    torch.testing.assert_close(functional_forward(model, method)(tree, x), peft_model.eval()(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(method.merge(tree)["0.weight"], peft_model.merge_and_unload().state_dict()["0.weight"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_lora_bias_without_base_bias(groups):
    model = nn.Conv2d(4, 6, 3, groups=groups, bias=False)
    method = peft_method_from_config(LoRAConfig(module_name_pattern=".*", params=LoRAParameters(r=2, alpha=4, lora_bias=True)))
    generator = torch.Generator().manual_seed(0)
    tree = {k: (torch.randn(v.shape, generator=generator) if "lora" in k else v) for k, v in method.inject(state_of(model)).items()}
    x = torch.randn(2, 4, 5, 5)

    out = functional_forward(model, method)(tree, x)
    merged = method.merge(tree)

    kernel = tree["weight"] + 2.0 * (tree["lora_B"].flatten(1) @ tree["lora_A"].flatten(1)).view(tree["weight"].shape)
    expected = F.conv2d(x, kernel, 2.0 * tree["lora_bias"], groups=groups)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(merged["bias"], 2.0 * tree["lora_bias"])
