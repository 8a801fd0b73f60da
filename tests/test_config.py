"""The trainer's config, presets, schedules, checkpoint files and metrics helpers (no Ray, no data)."""
from __future__ import annotations

import json
import random
import re
import typing

import numpy as np
import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.config import SECTIONS, _field_types, build_config, config_from_dict, modern_preset, paper_preset
from trainer.metrics import MetricsLog, read_metrics, topk_correct
from trainer.model import AlexNet, count_parameters
from trainer.schedule import PlateauDivider, WarmupCosine, make_optimizer


def one_param_optimizer(lr=0.01):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


# ---- presets ---------------------------------------------------------------------------------

def test_paper_preset_is_section_5_of_the_paper():
    cfg = paper_preset().validate(need_data=False)
    # "stochastic gradient descent with a batch size of 128 examples, momentum of 0.9, and weight decay of 0.0005"
    assert cfg.train.batch_size == 128
    assert cfg.optim.momentum == 0.9 and not cfg.optim.nesterov
    assert cfg.optim.weight_decay == 0.0005 and cfg.optim.decay_biases
    # "equal learning rate for all layers ... initialized at 0.01", unscaled
    assert cfg.peak_lr() == 0.01
    opt = make_optimizer(AlexNet(10, width=0.125, image_size=63), cfg)
    assert [g["lr"] for g in opt.param_groups] == [0.01] and opt.param_groups[0]["weight_decay"] == 0.0005
    # "divide the learning rate by 10 when the validation error rate stopped improving ... three times"
    assert (cfg.schedule.kind, cfg.schedule.factor, cfg.schedule.max_reductions) == ("plateau", 0.1, 3)
    # "roughly 90 cycles"; N(0, 0.01) weights, biases 1 in conv2/4/5 and fc6/7; dropout 0.5; no extras
    assert cfg.train.epochs == 90 and cfg.model.init == "paper" and cfg.model.dropout == 0.5
    assert cfg.optim.label_smoothing == 0 and cfg.optim.grad_clip == 0 and cfg.train.precision == "fp32"
    assert cfg.data.image_size == 224 and cfg.data.shorter_side() == 256 and cfg.data.crop == "paper"
    assert cfg.data.lighting and cfg.data.flip
    # section 2: "subtracting the mean activity over the training set from each pixel", raw 0-255 otherwise
    assert cfg.data.normalize == "mean"


def test_paper_model_init_and_parameter_count():
    model = AlexNet(1000, init="paper")
    assert count_parameters(model) == 60_965_224
    for name, layer in model.learned_layers():
        assert abs(float(layer.weight.detach().std()) - 0.01) < 0.001, name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(layer.bias == expected_bias), name


def test_image_size_only_changes_fc6_input():
    small = AlexNet(10, width=0.25, image_size=64)
    full = AlexNet(10, width=0.25)
    assert small.fc6.in_features * 36 == full.fc6.in_features * 1  # 1x1 maps at 64 px, 6x6 at 224 px
    assert set(small.state_dict()) == set(full.state_dict())
    assert small(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_modern_is_default_and_scales_lr_with_global_batch():
    assert build_config(need_data=False).preset == "modern"
    cfg = build_config(flags={"train.batch_size": 512}, need_data=False)
    assert cfg.peak_lr() == pytest.approx(modern_preset().optim.lr * 2)
    assert cfg.model.init == "kaiming" and cfg.schedule.kind == "cosine" and cfg.optim.label_smoothing > 0
    assert cfg.data.normalize == "standard"
    assert not cfg.use_bf16() and not cfg.use_compile()          # CPU workers: fp32, eager
    cfg.run.gpus_per_worker = 1
    assert cfg.use_bf16() and cfg.use_channels_last() and cfg.use_compile()


# ---- building and validating -----------------------------------------------------------------

def test_precedence_preset_file_flags_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: paper\noptim: {lr: 0.05, momentum: 0.8}\ntrain: {epochs: 7, batch_size: 64}\n")
    cfg = build_config(None, str(f), {"train.epochs": 5, "model.width": None}, ["optim.lr=0.03", "data.flip=false"],
                       need_data=False)
    assert cfg.preset == "paper"                  # from the file
    assert cfg.optim.momentum == 0.8              # file over preset
    assert cfg.train.epochs == 5                  # flag over file
    assert cfg.optim.lr == 0.03                   # --set over everything
    assert cfg.train.batch_size == 64 and cfg.model.width == 1.0 and cfg.data.flip is False
    assert build_config("modern", str(f), need_data=False).preset == "modern"  # --preset over the file


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"optim\.lrr") as e:
        build_config(sets=["optim.lrr=1", "train.epochs=3"], need_data=False)
    assert "valid keys" in str(e.value) and "optim.lr," in str(e.value)
    f = tmp_path / "c.yaml"
    f.write_text("model: {width: 0.5, depth: 3}\noptimiser: {lr: 1}\n")
    with pytest.raises(ValueError, match=r"c\.yaml.*model\.depth, optimiser"):
        build_config(config_file=str(f), need_data=False)


@pytest.mark.parametrize("sets, message", [
    (["train.epochs=0"], "train.epochs"),
    (["train.epochs=2.5"], "train.epochs must be a int"),
    (["model.width=-1"], "model.width"),
    (["optim.lr=abc"], "optim.lr must be a float"),
    (["schedule.kind=step"], r"schedule.kind must be one of \['plateau', 'cosine'\]"),
    (["data.flip=maybe"], "data.flip must be a bool"),
    (["run.workers=3", "train.batch_size=128"], "divide evenly by run.workers"),
    (["run.parallel=model", "run.gpus_per_worker=1"], "two devices per worker"),
    (["data.image_size=32"], "data.image_size"),
    (["optim.lr"], "expected key=value"),
])
def test_bad_values_fail_early_with_the_key(sets, message):
    with pytest.raises(ValueError, match=message):
        build_config(sets=sets, need_data=False)


def test_missing_shards_and_run_dir_are_reported(tmp_path):
    with pytest.raises(ValueError, match="--train SHARD_DIR"):
        build_config()
    with pytest.raises(ValueError, match="not a directory"):
        build_config(flags={"data.train": str(tmp_path / "nope"), "data.val": str(tmp_path)})
    with pytest.raises(ValueError, match="--out RUN_DIR"):
        build_config(flags={"data.train": str(tmp_path), "data.val": str(tmp_path)})


def test_config_round_trips_through_a_checkpoint_dict():
    cfg = build_config("paper", sets=["model.width=0.25", "run.workers=2"], need_data=False)
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


ALL_KEYS = [f"{s}.{n}" for s in SECTIONS for n in _field_types(s)]
FLOAT_KEYS = [f"{s}.{n}" for s in SECTIONS for n, t in _field_types(s).items()
              if t is float or float in typing.get_args(t)]   # run.gpus_per_worker: a number or "auto"


def refusal(sets: list[str]) -> str:
    with pytest.raises(ValueError) as e:
        build_config(sets=sets, need_data=False)
    message = str(e.value)
    assert "\n" not in message
    return message


def other_keys(message: str, key: str) -> list[str]:
    return [k for k in ALL_KEYS if k != key and re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message)]


@pytest.mark.parametrize("value, shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_nan_and_inf_naming_the_key(key, value, shown):
    assert len(FLOAT_KEYS) >= 14
    assert refusal([f"{key}={value}"]) == f"{key} must be a finite number, got {shown}"


@pytest.mark.parametrize("setting, message", [
    # seeds: numpy's range, refused before anything starts
    ("train.seed=-1", "train.seed must be an integer >= 0, got -1"),
    ("train.seed=4294967296", "train.seed must be <= 4294967295, got 4294967296"),
    # upper bounds on sizes and counts
    ("data.image_size=1025", "data.image_size must be <= 1024 (63 is the smallest input AlexNet's layers accept), "
                             "got 1025"),
    ("data.resize_shorter=2049", "data.resize_shorter must be <= 2048 (0 = image_size * 256 / 224), got 2049"),
    ("data.num_threads=257", "data.num_threads must be <= 256, got 257"),
    ("model.width=8.5", "model.width must be in (0, 8], got 8.5"),
    ("train.batch_size=131072", "train.batch_size must be <= 65536, got 131072"),
    ("train.epochs=10001", "train.epochs must be <= 10000, got 10001"),
    ("run.workers=4097", "run.workers must be <= 4096 (0 = local mode, in this process), got 4097"),
    ("run.cpus_per_worker=2000", "run.cpus_per_worker must be in (0, 1024], got 2000.0"),
    ("optim.lr=11", "optim.lr must be in (0, 10], got 11.0"),
    # once lumped together, now one key per message
    ("optim.weight_decay=-0.1", "optim.weight_decay must be in [0, 1], got -0.1"),
    ("optim.grad_clip=-1", "optim.grad_clip must be in [0, 1e+06] (0 = off), got -1.0"),
    ("optim.label_smoothing=1", "optim.label_smoothing must be in [0, 1), got 1.0"),
    ("schedule.patience=0", "schedule.patience must be an integer >= 1, got 0"),
    ("schedule.min_delta=1.5", "schedule.min_delta must be in [0, 1), got 1.5"),
    ("schedule.max_reductions=-1", "schedule.max_reductions must be an integer >= 0, got -1"),
    ("schedule.warmup_epochs=-1", "schedule.warmup_epochs must be in [0, 10000], got -1.0"),
    ("schedule.warmup_start=0", "schedule.warmup_start must be in (0, 1], got 0.0"),
    ("schedule.final_fraction=1.5", "schedule.final_fraction must be in [0, 1], got 1.5"),
    ("train.max_steps_per_epoch=-1", "train.max_steps_per_epoch must be an integer >= 0 (0 = full epochs), got -1"),
    ("train.log_every=0", "train.log_every must be an integer >= 1, got 0"),
    ("run.gpus_per_worker=-1", "run.gpus_per_worker must be in [0, 16], got -1.0"),
    ("run.cpus_per_worker=0", "run.cpus_per_worker must be in (0, 1024], got 0.0"),
    ("fault.kill_at_step=-1", "fault.kill_at_step must be an integer >= 0 (0 = off), got -1"),
    ("fault.nan_at_step=-3", "fault.nan_at_step must be an integer >= 0 (0 = off), got -3"),
    ("fault.rank=-1", "fault.rank must be an integer >= 0, got -1"),
    ("train.cuda_stream=fast", "train.cuda_stream must be one of ['default', 'side'], got 'fast'"),
    # an int key given NaN fails in the conversion, still naming the key
    ("train.epochs=.nan", "train.epochs must be a int, got nan"),
])
def test_each_bad_value_is_one_line_naming_only_its_key(setting, message):
    key = setting.split("=")[0]
    got = refusal([setting])
    assert got == message
    assert other_keys(got, key) == []


@pytest.mark.parametrize("sets, message", [
    (["fault.rank=2", "run.workers=2"], "fault.rank must be in [0, run.workers=2), got 2"),
    (["data.resize_shorter=100", "data.image_size=128"],
     "data.resize_shorter must be 0 or >= data.image_size (128), got 100"),
    (["optim.nesterov=true", "optim.momentum=0"],
     "optim.nesterov needs optim.momentum > 0 (Nesterov momentum without momentum is plain SGD), got True"),
    (["run.min_workers=3", "run.max_workers=2"], "run.min_workers must be <= 2 (run.max_workers), got 3"),
    (["run.max_workers=2"], "run.min_workers and run.max_workers (2) must both be 0 (a fixed group) or both >= 1 "
                            "(an elastic one), got 0"),
    (["run.parallel=model", "train.cuda_stream=side"],
     "train.cuda_stream=side is for a model on one device; run.parallel=model places its two columns on streams "
     "itself (trainer/parallel.py): use train.cuda_stream=default"),
    (["run.min_workers=1", "run.max_workers=3", "train.batch_size=128"],
     "train.batch_size (128) is the global batch and must divide evenly by run.max_workers (3), the per-worker "
     "micro-batch being batch_size / max_workers; e.g. --batch-size 126"),
])
def test_checks_between_keys_name_the_refused_key_first(sets, message):
    assert refusal(sets) == message


def test_each_section_validates_itself():
    from trainer.config import DataConfig, FaultConfig, RunConfig, TrainConfig

    for section in SECTIONS.values():
        section().validate()                              # the defaults are valid
    with pytest.raises(ValueError, match=r"^data\.num_threads must be <= 256, got 1000$"):
        DataConfig(num_threads=1000).validate()
    with pytest.raises(ValueError, match=r"^train\.seed must be an integer >= 0, got -1$"):
        TrainConfig(seed=-1).validate()
    with pytest.raises(ValueError, match=r"^run\.cpus_per_worker must be a finite number, got nan$"):
        RunConfig(cpus_per_worker=float("nan")).validate()
    with pytest.raises(ValueError, match=r"^fault\.raise_at_step must be an integer >= 0 \(0 = off\), got -2$"):
        FaultConfig(raise_at_step=-2).validate()
    with pytest.raises(TypeError):
        TrainConfig(5)                                    # keyword-only


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "seed", -1, "train.seed must be an integer >= 0, got -1"),
    ("optim", "lr", float("nan"), "optim.lr must be a finite number, got nan"),
    ("run", "cpus_per_worker", float("inf"), "run.cpus_per_worker must be a finite number, got inf"),
    ("data", "image_size", 4096, "data.image_size must be <= 1024 (63 is the smallest input AlexNet's layers accept), "
                                 "got 4096"),
])
def test_config_from_dict_validates(section, key, value, message):
    saved = json.loads(json.dumps(build_config(need_data=False).to_dict()))
    saved[section][key] = value
    with pytest.raises(ValueError) as e:
        config_from_dict(saved)
    assert str(e.value) == message


def test_loader_config_carries_the_run_settings(tmp_path):
    cfg = build_config("paper", sets=["data.image_size=64", "train.seed=7", "data.crop=rrc", "data.num_threads=3"],
                       need_data=False)
    lcfg = cfg.loader_config(str(tmp_path), rank=1, world_size=2, device=torch.device("cpu"), batch_size=16,
                             ten_crop=True)
    assert (lcfg.shard_dir, lcfg.rank, lcfg.world_size, lcfg.device, lcfg.batch_size) == (str(tmp_path), 1, 2, "cpu", 16)
    assert (lcfg.seed, lcfg.crop, lcfg.image_size, lcfg.resize_shorter) == (7, "rrc", 64, 73)
    assert (lcfg.num_threads, lcfg.num_workers, lcfg.ten_crop, lcfg.layout, lcfg.dtype) == (3, 3, True, "NCHW", "float32")
    assert lcfg.lighting is True and lcfg.flip is True and lcfg.normalize == "mean"
    cfg.data.normalize = "standard"
    assert cfg.loader_config(str(tmp_path), rank=0, world_size=1, device="cpu", batch_size=8).normalize == "standard"
    cfg.train.channels_last = "on"
    assert cfg.loader_config(str(tmp_path), rank=0, world_size=1, device="cpu", batch_size=8).layout == "NHWC"


# ---- schedules --------------------------------------------------------------------------------

def plateau_lrs(val_top1: list[float], **kw) -> list[float]:
    """The lr each epoch trains with when epoch i (0-based) validates at val_top1[i]; one more than given."""
    opt = one_param_optimizer(1.0)
    sched = PlateauDivider(opt, **kw)
    lrs = [opt.param_groups[0]["lr"]]
    for top1 in val_top1:
        sched.step(top1)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_plateau_drops_after_patience_epochs_without_improvement():
    # epoch 1 is the best; epochs 2 and 3 do not improve: with patience 2, epoch 4 trains at lr / 10
    assert plateau_lrs([0.1, 0.2, 0.2, 0.15], patience=2) == pytest.approx([1, 1, 1, 1, 0.1])
    assert plateau_lrs([0.1, 0.2, 0.2], patience=1) == pytest.approx([1, 1, 1, 0.1])
    # an improvement restarts the count; after a drop the count restarts too
    assert plateau_lrs([0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.2], patience=2) == pytest.approx(
        [1, 1, 1, 1, 1, 0.1, 0.1, 0.01])


def test_plateau_min_delta_is_absolute_top1_and_small_gains_do_not_restart_the_count():
    creeping = [0.5, 0.501, 0.5015, 0.5019]               # gains of 0.04-0.1 points: noise on ImageNet
    assert plateau_lrs(creeping, patience=2, min_delta=0.0)[-1] == 1       # strict >: every gain counts
    assert plateau_lrs(creeping, patience=2, min_delta=0.002) == pytest.approx([1, 1, 1, 0.1, 0.1])
    # a gain larger than min_delta is an improvement, measured from the best that counted (0.5)
    assert plateau_lrs([0.5, 0.501, 0.5021, 0.5021], patience=2, min_delta=0.002) == pytest.approx([1] * 5)


def test_plateau_divides_by_ten_at_most_three_times():
    opt = one_param_optimizer(0.01)
    sched = PlateauDivider(opt, factor=0.1, patience=1, max_reductions=3)
    lrs = []
    for top1 in [0.1, 0.2, 0.2] + [0.2] * 20:          # improves twice, then never again
        sched.step(top1)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:2] == [0.01, 0.01]
    assert lrs[2] == pytest.approx(0.001)                # the first epoch without a new best (patience 1)
    assert lrs[-1] == pytest.approx(1e-5) and sched.reductions == 3
    restored = PlateauDivider(one_param_optimizer(), patience=1)
    restored.load_state_dict(sched.state_dict())
    assert restored.state_dict() == sched.state_dict()


def test_warmup_cosine_shape_and_resume():
    opt = one_param_optimizer(1.0)
    sched = WarmupCosine(opt, total_steps=100, warmup_steps=10, warmup_start=0.1)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(100):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    opt2 = one_param_optimizer(1.0)
    again = WarmupCosine(opt2, total_steps=100, warmup_steps=10, warmup_start=0.1)
    again.load_state_dict({"steps_done": 37, "base_lrs": [1.0]})
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[37])


def test_biases_are_not_decayed_in_modern():
    model = AlexNet(10, width=0.125, image_size=63)
    groups = make_optimizer(model, modern_preset()).param_groups
    assert groups[1]["weight_decay"] == 0 and all(p.ndim == 1 for p in groups[1]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


# ---- checkpoint files ---------------------------------------------------------------------------

def test_atomic_save_loads_weights_only_and_leaves_no_temp(tmp_path):
    model = AlexNet(10, width=0.125, image_size=63)
    ddp_like = torch.nn.ModuleDict({"module": model})  # keys "module.conv1.weight", like DDP
    state = ckpt.plain_state_dict(ddp_like)
    assert set(state) == set(model.state_dict())
    path = tmp_path / "run" / "last.pt"
    ckpt.atomic_save({"model": state, "meta": {"classes": ["a", "b"], "epoch": 3}}, path)
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "best.pt"
    ckpt.atomic_save({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(Exception):
        ckpt.atomic_save({"model": {"w": lambda: 0}}, path)  # unpicklable
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    ckpt.atomic_save({"model": {}, "rng": [ckpt.rng_state()]}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_rng_state_covers_every_cuda_device_a_worker_uses_once_in_order():
    """A --parallel model worker draws dropout masks on two GPUs: both generators are saved and restored, in the
    worker's device order (the indices themselves may change between runs). CPU devices add nothing."""
    from trainer.checkpoint import _cuda_devices

    assert _cuda_devices(["cuda:1", "cuda:0", "cuda:1", "cpu"]) == [torch.device("cuda:1"), torch.device("cuda:0")]
    assert _cuda_devices(["cuda:0", "cuda:0"]) == [torch.device("cuda:0")]        # two columns on one GPU
    assert _cuda_devices([torch.device("cpu")] * 2) == [] and "cuda" not in ckpt.rng_state(["cpu", "cpu"])


def test_load_rejects_bad_files_with_the_path(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad.pt: .*use a file written by `python -m trainer fit`"):
        ckpt.load(bad)
    with pytest.raises(ValueError, match="no such checkpoint"):
        ckpt.load(tmp_path / "missing.pt")


# ---- metrics ------------------------------------------------------------------------------------

def test_topk_counts_only_masked_rows():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 2])
    mask = torch.tensor([True, True, True, False])
    assert topk_correct(logits, labels, mask, ks=(1, 2)) == {1: 1, 2: 3}
    assert topk_correct(logits, labels, ks=(1, 5)) == {1: 2, 5: 4}   # k beyond classes = all


def test_metrics_log_resume_drops_uncommitted_epochs(tmp_path):
    rec = lambda e: {"epoch": e, "train_loss": 2.0 - e / 10, "val_top1": 0.1 * e, "val_top5": 0.5, "lr": 0.01,
                     "images_per_s": 100.0}
    log = MetricsLog(tmp_path, start_epoch=0)
    for e in range(3):
        log.log(rec(e))
    log.close()
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert (tmp_path / "curves.png").stat().st_size > 1000 and any((tmp_path / "tb").iterdir())
    log = MetricsLog(tmp_path, start_epoch=2)      # the checkpoint of epoch 2 never committed
    log.log(rec(2))
    log.close()
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    with pytest.raises(ValueError, match="images_per_s"):
        MetricsLog(tmp_path, 3).log({"epoch": 3, "train_loss": 1, "val_top1": 0, "val_top5": 0, "lr": 0})


def test_on_and_off_mean_the_words_not_yaml_booleans():
    cfg = build_config("modern", None, {}, ["train.compile=off", "train.channels_last=on"], need_data=False)
    assert (cfg.train.compile, cfg.train.channels_last) == ("off", "on")
