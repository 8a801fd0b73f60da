"""The two-column split (trainer/parallel.py) against the single-device grouped AlexNet, on two CPU devices.

Dropout draws different masks in the two implementations, so forward outputs are compared in eval mode and
gradients with dropout p=0 (train mode otherwise)."""
from __future__ import annotations

import io
import re
import time

import pytest
import torch
import torch.nn.functional as F

from trainer.model import AlexNet
from trainer.parallel import TwoColumnAlexNet, split_two_devices

CPU2 = ["cpu", "cpu"]
WIDTH, CLASSES = 0.125, 10          # fc6 needs a 224 input, so the batch stays tiny instead
ATOL, RTOL = 1e-5, 1e-4


def small_model(seed: int = 0, dropout: float = 0.5) -> AlexNet:
    torch.manual_seed(seed)
    return AlexNet(num_classes=CLASSES, width=WIDTH, dropout=dropout, init="kaiming")


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 224, 224, generator=generator), torch.tensor([0, 7, 3])


def whole_layer_grads(split: TwoColumnAlexNet) -> dict[str, torch.Tensor]:
    """The split model's gradients under the single-device names: column halves joined on the output dim."""
    halves: dict[str, list] = {}
    for name, p in split.named_parameters():
        m = re.fullmatch(r"(\w+)\.columns\.(\d)\.(\w+)", name)
        key, column = (f"{m[1]}.{m[3]}", int(m[2])) if m else (name, 0)
        halves.setdefault(key, [None, None])[column] = p.grad
    return {k: torch.cat([h for h in v if h is not None], dim=0) for k, v in halves.items()}


@pytest.mark.parametrize("concurrent", [True, False])
def test_forward_matches_single_device_in_eval_mode(batch, concurrent):
    images, _ = batch
    model = small_model().eval()
    split = split_two_devices(model, CPU2, concurrent=concurrent).eval()
    with torch.no_grad():
        expected, got = model(images), split(images)
    assert got.shape == (3, CLASSES)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("concurrent", [True, False])
def test_every_gradient_matches_single_device(batch, concurrent):
    images, labels = batch
    model = small_model(dropout=0.0).train()
    split = split_two_devices(model, CPU2, concurrent=concurrent).train()
    for net in (model, split):
        F.cross_entropy(net(images), labels).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    got = whole_layer_grads(split)
    assert got.keys() == expected.keys()
    for name in expected:
        assert expected[name].abs().max() > 0, name        # every layer really got a gradient
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=RTOL, msg=name)


def test_parameters_are_leaves_and_training_steps_match(batch):
    """Two SGD steps (the paper's momentum and weight decay) on each form leave the same weights."""
    images, labels = batch
    # the paper's LRN alpha: with cuda-convnet's 5x smaller one this tiny net's second step meets a near-tie (a
    # max-pool choice or ReLU edge) where float differences between the two forms, which depend on oneDNN's
    # thread count, flip a unit and move the weights by ~1e-5 (one step's gradients match at the default alpha above)
    torch.manual_seed(0)
    model = AlexNet(num_classes=CLASSES, width=WIDTH, dropout=0.0, init="kaiming", lrn_alpha="paper")
    split = split_two_devices(model, CPU2)
    assert all(p.is_leaf and p.device == torch.device("cpu") for p in split.parameters())
    for net in (model, split):
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(net(images), labels).backward()
            opt.step()
    after_split = split.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(after_split[name], tensor, atol=ATOL, rtol=RTOL, msg=name)


def test_a_run_with_dropout_repeats_bit_for_bit_whichever_column_thread_is_late(batch):
    """Column 1's CPU work runs in a helper thread. Its dropout masks must not depend on which thread reaches the
    shared generator first: here one column or the other is made late (a forward pre-hook that sleeps in fc6
    and fc7), and three SGD steps with dropout 0.5 must end in the same weights either way."""
    images, labels = batch

    def train(late_column: int) -> dict[str, torch.Tensor]:
        split = split_two_devices(small_model(dropout=0.5), CPU2, concurrent=True).train()
        for name in ("fc6", "fc7"):
            split.get_submodule(f"{name}.columns.{late_column}").register_forward_pre_hook(
                lambda *_: time.sleep(0.05))
        opt = torch.optim.SGD(split.parameters(), lr=0.01, momentum=0.9)
        torch.manual_seed(5)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(split(images), labels).backward()
            opt.step()
        return split.state_dict()

    first, second = train(late_column=0), train(late_column=1)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not torch.equal(first["fc7.weight"], small_model().state_dict()["fc7.weight"])   # it trained


def test_half_of_every_split_layer_per_column_fc8_whole():
    split = split_two_devices(small_model(), CPU2)
    w = split.widths
    assert split.conv1.columns[0].weight.shape == (w["conv1"] // 2, 3, 11, 11)
    assert split.conv2.columns[1].weight.shape[:2] == (w["conv2"] // 2, w["conv1"] // 2)   # own column only
    assert split.conv3.columns[1].weight.shape[:2] == (w["conv3"] // 2, w["conv2"])        # both columns
    assert split.conv4.columns[0].weight.shape[:2] == (w["conv4"] // 2, w["conv3"] // 2)
    assert split.conv5.columns[0].weight.shape[:2] == (w["conv5"] // 2, w["conv4"] // 2)
    assert split.fc6.columns[0].weight.shape == (w["fc6"] // 2, w["conv5"] * 36)
    assert split.fc7.columns[1].weight.shape == (w["fc7"] // 2, w["fc6"])
    assert split.fc8.weight.shape == (CLASSES, w["fc7"])


def test_no_grad_reaches_the_column_thread(batch):
    images, _ = batch
    split = split_two_devices(small_model(), CPU2, concurrent=True).eval()
    with torch.no_grad():
        assert not split(images[:1]).requires_grad
    assert split(images[:1]).requires_grad


def test_state_dict_has_the_paper_keys_and_shapes():
    torch.manual_seed(0)
    model = AlexNet()                                   # width 1, 1000 classes: the paper's shapes
    split = split_two_devices(model, CPU2)
    whole, halves = model.state_dict(), split.state_dict()
    assert list(halves) == list(whole)
    assert halves["conv1.weight"].shape == (96, 3, 11, 11)
    assert halves["conv2.weight"].shape == (256, 48, 5, 5)
    assert halves["fc6.weight"].shape == (4096, 9216)
    for name in whole:
        assert torch.equal(halves[name], whole[name]), name


def test_checkpoints_load_both_ways(batch, tmp_path):
    images, _ = batch
    trained, other = small_model(seed=0).eval(), small_model(seed=1).eval()
    with torch.no_grad():
        expected = trained(images)
    # single-device checkpoint -> split model (saved and loaded as run dirs do: weights_only)
    torch.save(trained.state_dict(), tmp_path / "single.pt")
    split = split_two_devices(other, CPU2).eval()
    split.load_state_dict(torch.load(tmp_path / "single.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(split(images), expected, atol=ATOL, rtol=RTOL)
    # split checkpoint -> single-device model
    buffer = io.BytesIO()
    torch.save(split.state_dict(), buffer)
    fresh = small_model(seed=2).eval()
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), expected, atol=ATOL, rtol=RTOL)


def test_loading_a_checkpoint_of_another_width_fails_loudly():
    split = split_two_devices(small_model(), CPU2)
    torch.manual_seed(0)
    wider = AlexNet(num_classes=CLASSES, width=0.25).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
        split.load_state_dict(wider)
    with pytest.raises(RuntimeError, match="Missing key"):
        split.load_state_dict({k: v for k, v in small_model().state_dict().items() if k != "fc6.weight"})


@pytest.mark.parametrize("devices", [["cpu"], [], ["cpu", "cpu", "cpu"], "cpu", torch.device("cpu")])
def test_wrong_number_of_devices_is_a_clear_value_error(devices):
    with pytest.raises(ValueError, match="exactly 2 devices|list of exactly 2"):
        split_two_devices(small_model(), devices)


def test_other_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="AlexNet"):
        split_two_devices(torch.nn.Linear(2, 2), CPU2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            split_two_devices(small_model(), ["cuda:0", "cuda:1"])


def test_autocast_reaches_the_column_thread(batch):
    """bf16 autocast on the CPU (train.precision bf16) must cover column 1's helper thread as well."""
    images, _ = batch
    model = small_model().eval()
    split = split_two_devices(model, CPU2, concurrent=True).eval()
    seen = {}
    for c in range(2):
        split.conv2.columns[c].register_forward_hook(lambda m, i, out, c=c: seen.__setitem__(c, out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(images), split(images)
    assert seen == {0: torch.bfloat16, 1: torch.bfloat16}
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=0.1, rtol=0.05)


def test_model_parallel_config_stays_eager_and_needs_two_devices():
    from trainer.config import Config

    cfg = Config()
    cfg.run.parallel, cfg.run.gpus_per_worker, cfg.train.compile = "model", 2, "auto"
    assert not cfg.use_compile()                       # auto compiles data-parallel GPU runs only
    cfg.train.compile = "on"
    with pytest.raises(ValueError, match="--parallel model runs eagerly"):
        cfg.validate(need_data=False)
    cfg.train.compile, cfg.run.gpus_per_worker = "off", 1
    with pytest.raises(ValueError, match="--parallel model needs two devices per worker"):
        cfg.validate(need_data=False)
