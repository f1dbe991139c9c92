"""The CPU layout of the networks (vcm.models.layout.place) and layout-free files (vcm.io.save_torch)."""

import pytest
import torch
from torch import nn

from vcm.io import save_torch
from vcm.models.layout import place
from vcm.models.segmenter import build_unet

CL = torch.channels_last_3d


def _nets():
    torch.manual_seed(0)
    return {
        "conv": nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv3d(4, 2, 3)
        ),
        "unet": build_unet([4, 8], [2], 1, 2),
    }


@pytest.mark.parametrize("name", ["conv", "unet"])
def test_place_puts_5d_weights_channels_last_on_the_cpu_and_keeps_the_outputs(name):
    reference = _nets()[name].eval()
    placed = place(_nets()[name], "cpu").eval()
    weights = [p for p in placed.parameters() if p.dim() == 5]
    assert weights and all(p.is_contiguous(memory_format=CL) for p in weights)
    assert all(p.is_contiguous() for p in placed.parameters() if p.dim() != 5)
    x = torch.rand(2, 1, 12, 16, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = placed(x), reference(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5)  # the same network: only the order of float sums differs


def test_place_runs_group_norm_in_the_default_layout_between_channels_last_convolutions():
    placed = place(_nets()["conv"], "cpu")
    seen = []
    placed[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    x = torch.rand(2, 1, 12, 16, 12, generator=torch.Generator().manual_seed(3))
    out = place(placed, "cpu")[1](placed[0](x))  # placing twice adds no second conversion
    assert seen == [True]  # the GroupNorm saw the default layout ...
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()  # ... and hands on channels-last
    assert len(placed[1]._forward_pre_hooks) == 2  # place's conversion and this test's probe


def test_place_gradients_match_the_default_layout():
    reference, placed = _nets()["conv"], place(_nets()["conv"], "cpu")
    x = torch.rand(2, 1, 12, 16, 12, generator=torch.Generator().manual_seed(2))
    for net in (reference, placed):
        net(x).square().mean().backward()
    for a, b in zip(reference.parameters(), placed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_saved_files_do_not_depend_on_the_layout(tmp_path):
    net = _nets()["conv"]
    default = {"model": net.state_dict(), "steps": [torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 2, 2, 2, 2)]}
    save_torch(default, tmp_path / "default.pt")
    state = place(net, "cpu").state_dict()
    assert not state["3.weight"].is_contiguous()
    save_torch(
        {
            "model": state,
            "steps": [
                torch.zeros(1, 1, 2, 2, 2).to(memory_format=CL),
                torch.ones(1, 2, 2, 2, 2).to(memory_format=CL),
            ],
        },
        tmp_path / "cl.pt",
    )
    assert (tmp_path / "cl.pt").read_bytes() == (tmp_path / "default.pt").read_bytes()
    loaded = torch.load(tmp_path / "cl.pt", weights_only=True)
    assert loaded["model"]["3.weight"].is_contiguous()
    assert hasattr(loaded["model"], "_metadata")  # a state dict's version record survives the copy
