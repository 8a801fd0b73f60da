"""The model options the ablations switch (trainer/model.py): shapes, forward passes, parameter counts, the two
LRN alpha conventions, model files that rebuild the same variant, and the two-device split's refusal."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer import checkpoint as ckpt
from trainer.config import build_config
from trainer.evaluate import load_model
from trainer.model import LRN_ALPHA, AlexNet, ColumnLRN, count_parameters, feature_map_size, scaled_widths
from trainer.parallel import split_two_devices

TINY = dict(num_classes=10, width=0.1, image_size=64)


def test_lrn_alpha_conventions_differ_by_the_window_size_and_cuda_convnet_is_torchs_module():
    x = torch.randn(2, 16, 5, 5) * 30   # 0-255-scale activations, where alpha matters
    paper = AlexNet(**TINY, lrn_alpha="paper").lrn
    convnet = AlexNet(**TINY, lrn_alpha="cuda-convnet").lrn
    assert paper.alpha == LRN_ALPHA and convnet.alpha == pytest.approx(LRN_ALPHA / 5)
    # cuda-convnet / Caffe / torch: alpha 1e-4 given, 2e-5 per squared neighbour
    torch_lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    one_column = ColumnLRN(1, alpha=convnet.alpha)
    assert torch.allclose(one_column(x), torch_lrn(x), rtol=1e-6)
    # the paper's formula written out: a / (k + 1e-4 * sum of the 5 squared neighbours) ^ 0.75
    sq = torch.nn.functional.pad(x.pow(2), (0, 0, 0, 0, 2, 2))
    window = sum(sq[:, i:i + 16] for i in range(5))
    assert torch.allclose(ColumnLRN(1, alpha=paper.alpha)(x), x / (2 + 1e-4 * window) ** 0.75, rtol=1e-5)
    assert not torch.allclose(paper(x), convnet(x))


def test_lrn_off_is_identity_and_keeps_the_state_dict_keys():
    on, off = AlexNet(**TINY), AlexNet(**TINY, lrn=False)
    assert isinstance(off.lrn, nn.Identity) and isinstance(on.lrn, ColumnLRN)
    assert {k: v.shape for k, v in on.state_dict().items()} == {k: v.shape for k, v in off.state_dict().items()}
    assert off(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("size, overlapping, non_overlapping", [(224, 6, 6), (112, 2, 3), (64, 1, 1)])
def test_non_overlapping_pool_output_size_and_fc6_input(size, overlapping, non_overlapping):
    assert feature_map_size(size) == overlapping
    assert feature_map_size(size, "non-overlapping") == non_overlapping
    net = AlexNet(num_classes=10, width=0.1, image_size=size, pool="non-overlapping")
    assert (net.pool.kernel_size, net.pool.stride) == (2, 2)
    maps = net.features(torch.randn(1, 3, size, size))
    assert maps.shape[-2:] == (non_overlapping, non_overlapping)
    assert net.fc6.in_features == net.widths["conv5"] * non_overlapping ** 2
    assert net(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_one_column_halves_conv1_to_conv4_keeps_conv5_and_fc_and_has_the_papers_parameter_count():
    two, one = scaled_widths(1.0), scaled_widths(1.0, columns=1)
    assert [one[k] for k in ("conv1", "conv2", "conv3", "conv4")] == [48, 128, 192, 192]
    assert [one[k] for k in ("conv5", "fc6", "fc7")] == [two[k] for k in ("conv5", "fc6", "fc7")] == [256, 4096, 4096]
    net = AlexNet(1000, columns=1)
    assert count_parameters(net) == 59_798_312          # section 3.2: about the two-column net's 60,965,224
    assert count_parameters(AlexNet(1000)) == 60_965_224
    assert all(getattr(net, f"conv{i}").groups == 1 for i in range(1, 6))
    assert net.lrn.columns == 1
    tiny = AlexNet(**TINY, columns=1)
    assert tiny(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_tanh_replaces_every_relu():
    torch.manual_seed(0)
    relu = AlexNet(**TINY, init="kaiming")   # zero biases: tanh's negative half shows after conv5
    tanh = AlexNet(**TINY, activation="tanh")
    tanh.load_state_dict(relu.state_dict())
    x = torch.randn(2, 3, 64, 64)
    relu.eval(), tanh.eval()
    assert tanh.act is torch.tanh
    assert not torch.allclose(relu(x), tanh(x))
    feats = tanh.features(x)
    assert feats.min() >= -1 and feats.max() <= 1 and feats.min() < 0   # pooled tanh maps, negatives kept
    assert relu.features(x).min() >= 0


@pytest.mark.parametrize("name, value", [("lrn_alpha", "both"), ("pool", "4/2"), ("activation", "gelu"),
                                         ("columns", 3)])
def test_bad_model_arguments_are_value_errors(name, value):
    with pytest.raises(ValueError, match=name):
        AlexNet(**TINY, **{name: value})


@pytest.mark.parametrize("setting, message", [
    ("model.columns=3", "model.columns must be <= 2"),
    ("model.pool=4x4", "model.pool must be one of"),
    ("model.activation=gelu", "model.activation must be one of"),
    ("model.lrn_alpha_convention=caffe", "model.lrn_alpha_convention must be one of"),
    ("model.lrn=maybe", "model.lrn must be a bool"),
])
def test_bad_model_options_are_one_line_naming_the_key(setting, message):
    with pytest.raises(ValueError, match=message) as err:
        build_config(sets=[setting], need_data=False)
    assert "\n" not in str(err.value)


def test_model_parallel_refuses_a_one_column_net_in_one_line():
    with pytest.raises(ValueError, match="model.columns is 1: use --parallel data") as err:
        build_config(sets=["run.parallel=model", "run.gpus_per_worker=0", "model.columns=1"], need_data=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="model.columns=1"):
        split_two_devices(AlexNet(**TINY, columns=1), ["cpu", "cpu"])


def test_the_split_computes_the_variant_it_was_given():
    torch.manual_seed(0)
    net = AlexNet(**TINY, lrn=False, activation="tanh", pool="non-overlapping").eval()
    split = split_two_devices(net, ["cpu", "cpu"], concurrent=False).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(split(x), net(x), atol=1e-6)


def model_file(net: AlexNet, variant: dict) -> dict:
    meta = {"classes": [str(i) for i in range(10)], "width": 0.1, "image_size": 112, "resize_shorter": 128,
            "dropout": 0.5, **variant}
    return {"model": net.state_dict(), "meta": meta}


VARIANTS = [{"columns": 1}, {"pool": "non-overlapping"}, {"lrn": False, "activation": "tanh",
                                                          "lrn_alpha": "cuda-convnet"}]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_model_file_rebuilds_its_variant(variant, tmp_path):
    torch.manual_seed(0)
    net = AlexNet(10, width=0.1, image_size=112, **variant).eval()
    variant = {"lrn_alpha": "cuda-convnet", **variant}   # the default, which a model file states (train.py)
    ckpt.atomic_save(model_file(net, variant), tmp_path / "best.pt")
    loaded, meta = load_model(str(tmp_path / "best.pt"))
    assert {k: meta[k] for k in variant} == variant
    x = torch.randn(1, 3, 112, 112)
    assert torch.equal(loaded(x), net(x))


def test_a_model_file_from_before_the_options_is_the_paper_alpha_net(tmp_path):
    torch.manual_seed(0)
    net = AlexNet(10, width=0.1, image_size=112, lrn_alpha="paper").eval()   # what every older file was
    ckpt.atomic_save(model_file(net, {}), tmp_path / "old.pt")
    loaded, _ = load_model(str(tmp_path / "old.pt"))
    assert loaded.lrn.alpha == LRN_ALPHA and AlexNet(10, width=0.1, image_size=112).lrn.alpha == LRN_ALPHA / 5
    x = torch.randn(1, 3, 112, 112) * 60
    assert torch.equal(loaded(x), net(x))


@pytest.mark.parametrize("variant, meta, message", [
    ({"columns": 1}, {}, "meta columns 2 does not match the weights, which are a 1-column net"),
    ({}, {"columns": 1}, "meta columns 1 does not match"),
    ({"pool": "non-overlapping"}, {}, "meta image_size 112 gives 2x2 maps into fc6, the weights are for 3x3; use"),
    ({}, {"pool": "non-overlapping"}, r"gives 3x3 maps into fc6, the weights are for 2x2 \(with non-overlapping"),
    ({}, {"activation": "sigmoid"}, "meta activation 'sigmoid' is not one of"),
    ({}, {"lrn": "yes"}, "meta lrn 'yes' is not one of"),
])
def test_meta_that_does_not_describe_the_weights_is_one_line(variant, meta, message, tmp_path):
    net = AlexNet(10, width=0.1, image_size=112, **variant)
    obj = model_file(net, {})
    obj["meta"].update(meta)
    ckpt.atomic_save(obj, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=message) as err:
        load_model(str(tmp_path / "m.pt"))
    assert "\n" not in str(err.value)
