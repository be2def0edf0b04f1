"""Which torchvision builds take a smaller side (torchvision:NAME@SIDE), which keep theirs."""

from __future__ import annotations

from graphopt.models import vision
from graphopt.models.catalog import names


def test_cnns_and_vits_take_the_side_asked():
    assert vision.ensure_torchvision("resnet50", 112) == "torchvision:resnet50@112"
    # A ViT takes image_size as a constructor argument when its patch divides the side.
    assert vision.ensure_torchvision("vit_h_14", 112) == "torchvision:vit_h_14@112"
    assert "torchvision:vit_h_14@112" in names()
    assert not vision.fixed_side("vit_l_16", 112)


def test_fixed_grids_keep_their_own_side():
    # 112 is not a multiple of 32: vit_b_32 stays at 224, as do window-grid models.
    assert vision.fixed_side("vit_b_32", 112)
    assert vision.ensure_torchvision("vit_b_32", 112) == "torchvision:vit_b_32"
    assert vision.ensure_torchvision("swin_t", 112) == "swin_t"
    assert vision.ensure_torchvision("maxvit_t", 112) == "torchvision:maxvit_t"
    # The default side, or none asked, names the catalog entry where there is one.
    assert vision.ensure_torchvision("resnet50") == "resnet50"
    assert vision.ensure_torchvision("inception_v3", 299) == "inception_v3"
