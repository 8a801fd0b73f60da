"""One typed configuration for `python -m trainer fit`, built from a preset, a YAML file and overrides.

Precedence, lowest first: the preset (``paper`` or ``modern``), the YAML file (``--config``), the
command's flags (``--epochs`` etc.), then ``--set section.key=value``. Everything is validated in
:meth:`Config.validate` before any process starts, so a typo costs a second, not a cluster start-up.

The YAML file mirrors the dataclasses::

    preset: modern          # optional; --preset wins
    data:  {train: shards/train, val: shards/val, loader: dali}
    model: {width: 0.25}
    optim: {lr: 0.02}
    train: {epochs: 10, batch_size: 128}
    run:   {out: runs/demo, workers: 2}

Each section checks its own values (``DataConfig.validate`` etc.); :meth:`Config.validate` runs them and
then the checks that span sections. Every message is one line naming one key and its value. Numbers must
be finite (NaN and inf are refused) and within these bounds:

=============================  ====================================================================
data.image_size                integer 63..1024 (63: the smallest input AlexNet's layers accept)
data.resize_shorter            0 (= image_size * 256 / 224) or image_size..2048
data.num_threads               integer 0..256 (0 = auto: run.cpus_per_worker on GPU workers, 2 on the CPU)
data.normalize                 mean (x - mean, 0-255 scale: the paper, section 2) | standard ((x - mean) / std)
model.width                    (0, 8]
model.dropout                  [0, 1)
model.init                     paper | kaiming
model.lrn                      true | false (response normalisation after conv1 and conv2)
model.lrn_alpha_convention     cuda-convnet (1e-4 / 5 = 2e-5 per squared neighbour) | paper (1e-4 per term)
model.pool                     overlapping (3x3, stride 2) | non-overlapping (2x2, stride 2)
model.columns                  integer 1..2 (1: the one-GPU net, conv1-conv4 halved; not with run.parallel=model)
model.activation               relu | tanh
optim.lr                       (0, 10]
optim.lr_reference_batch       integer 0..65536 (0 = no scaling)
optim.momentum                 [0, 1)
optim.weight_decay             [0, 1]
optim.label_smoothing          [0, 1)
optim.grad_clip                [0, 1e6] (0 = off)
schedule.factor                (0, 1)
schedule.patience              integer 1..10000 (the lr drops after this many epochs in a row without improvement)
schedule.min_delta             [0, 1) (absolute top-1: an epoch improves when it beats the best by more than this)
schedule.max_reductions        integer 0..100
schedule.warmup_epochs         [0, 10000]
schedule.warmup_start          (0, 1]
schedule.final_fraction        [0, 1]
train.epochs                   integer 1..10000
train.batch_size               integer 1..65536 (global; divisible by run.workers)
train.seed                     integer 0..2**32-1 (numpy's seed range)
train.max_steps_per_epoch      integer >= 0 (0 = full epochs)
train.log_every                integer >= 1
train.checkpoint_every         integer >= 0 (0 = at epoch ends only)
train.cuda_stream              default (torch's current stream: the legacy default stream) | side (a non-blocking
                               stream of its own; not with run.parallel=model); CPU: no effect (docs/training.md)
run.workers                    integer 0..4096 (0 = local mode, in this process)
run.min_workers                integer 0..run.max_workers (elastic group: the fewest workers it trains with)
run.max_workers                integer 0..4096 (0 = a fixed group of run.workers; else the most workers, and
                               train.batch_size must divide by it: the per-worker micro-batch is
                               batch_size / max_workers, docs/training.md "Elastic groups")
run.gpus_per_worker            [0, 16]; 0 or 2 with run.parallel=model
run.cpus_per_worker            (0, 1024] or auto (8 for a GPU worker, at most its share of the cluster; 1 on the CPU)
run.max_failures               integer >= -1 (-1 = retry forever)
run.placement_timeout_s        (0, 604800] (a week)
run.resize_check_s             (0, 86400] (an elastic group looks for room to grow this often)
run.preemption_check_every     integer 0..1000000 (steps between preemption checks; 0 = off)
run.max_preemption_failures    integer >= -1 (-1 = restart after every reclaim)
run.preemption_grace_s         [0, 3600] (survivors may run this long past a reclaim's deadline)
fault.*_at_step                integer >= 0 (0 = off)
fault.rank                     integer 0..run.workers-1
fault.record_keys              true or false (each step's sample keys to RUN_DIR/keys/, for exactly-once tests)
=============================  ====================================================================
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml


class _Check:
    """Checks the fields of one config section; each failure is one line naming ``section.key`` and its value."""

    def __init__(self, section: str, values: Any):
        self.section, self.values = section, values

    def fail(self, name: str, rule: str) -> None:
        raise ValueError(f"{self.section}.{name} {rule}, got {getattr(self.values, name)!r}")

    def choice(self, name: str) -> None:
        allowed = typing.get_args(typing.get_type_hints(type(self.values))[name])
        if getattr(self.values, name) not in allowed:
            self.fail(name, f"must be one of {list(allowed)}")

    def flag(self, name: str) -> None:
        if not isinstance(getattr(self.values, name), bool):
            self.fail(name, "must be true or false")

    def integer(self, name: str, minimum: int, maximum: int | None = None, note: str = "") -> None:
        value = getattr(self.values, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.fail(name, f"must be an integer >= {minimum}{note}")
        if maximum is not None and value > maximum:
            self.fail(name, f"must be <= {maximum}{note}")

    def number(self, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
               note: str = "") -> None:
        value = getattr(self.values, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(name, "must be a finite number")
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            self.fail(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}{note}")


@dataclass(kw_only=True)
class DataConfig:
    train: str = ""                 # shard directory (python -m shards build)
    val: str = ""
    # --stage-to DIR: train/val are then sources (paths or s3://, gs://, file:// URLs) that each node copies
    # to DIR/train, DIR/val before training (shards.stage.stage_once_per_node; see cluster/)
    stage_to: str = ""
    loader: Literal["dali", "reference"] = "dali"
    crop: Literal["paper", "rrc"] = "paper"
    lighting: bool = True           # the paper's PCA lighting (section 4.1)
    flip: bool = True
    # "mean": subtract the ImageNet mean, keep the 0-255 scale (the paper, section 2); "standard": also divide
    # by the std (docs/pipeline.md, "Normalise")
    normalize: Literal["mean", "standard"] = "mean"
    image_size: int = 224
    resize_shorter: int = 0         # 0: image_size * 256 / 224, the paper's 256 for 224
    num_threads: int = 0            # DALI CPU threads / DataLoader workers per rank; 0 = auto (Config.loader_threads)

    def shorter_side(self) -> int:
        return self.resize_shorter or round(self.image_size * 256 / 224)

    def validate(self) -> None:
        c = _Check("data", self)
        for name in ("loader", "crop", "normalize"):
            c.choice(name)
        for name in ("lighting", "flip"):
            c.flag(name)
        c.integer("image_size", 63, 1024, " (63 is the smallest input AlexNet's layers accept)")
        c.integer("resize_shorter", 0, 2048, " (0 = image_size * 256 / 224)")
        if self.resize_shorter and self.resize_shorter < self.image_size:
            c.fail("resize_shorter", f"must be 0 or >= data.image_size ({self.image_size})")
        c.integer("num_threads", 0, 256)


@dataclass(kw_only=True)
class ModelConfig:
    width: float = 1.0              # multiplies every conv and fc width (1.0 = the paper's net)
    dropout: float = 0.5
    init: Literal["paper", "kaiming"] = "paper"
    # the variants below default to the paper's net; trainer/model.py's docstring says what each changes
    lrn: bool = True                # response normalisation after conv1 and conv2 (section 3.3)
    # alpha = 1e-4 / n = 2e-5 per squared neighbour (cuda-convnet, which trained the paper's nets; Caffe, torch)
    # or 1e-4 (the paper's formula as printed); the default is measured: docs/training.md, "Model options"
    lrn_alpha_convention: Literal["paper", "cuda-convnet"] = "cuda-convnet"
    pool: Literal["overlapping", "non-overlapping"] = "overlapping"   # 3x3 stride 2, or 2x2 stride 2
    columns: int = 2                # 2: the paper's two-GPU net; 1: its one-GPU comparison net (section 3.2)
    activation: Literal["relu", "tanh"] = "relu"

    def validate(self) -> None:
        c = _Check("model", self)
        c.number("width", 0, 8, low_open=True)
        c.number("dropout", 0, 1, high_open=True)
        c.choice("init")
        c.flag("lrn")
        for name in ("lrn_alpha_convention", "pool", "activation"):
            c.choice(name)
        c.integer("columns", 1, 2, " (2: the paper's two-column net, 1: its one-GPU net)")

    def build_args(self) -> dict:
        """AlexNet's keyword arguments for the variant options (also saved in a model file's meta)."""
        return {"lrn": self.lrn, "lrn_alpha": self.lrn_alpha_convention, "pool": self.pool,
                "columns": self.columns, "activation": self.activation}


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 0.01                # at a global batch of lr_reference_batch
    lr_reference_batch: int = 0     # 0: no scaling; else lr * batch_size / lr_reference_batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_biases: bool = True       # the paper decays every weight; modern recipes skip biases
    label_smoothing: float = 0.0
    grad_clip: float = 0.0          # max global grad norm; 0: off

    def validate(self) -> None:
        c = _Check("optim", self)
        c.number("lr", 0, 10, low_open=True)
        c.integer("lr_reference_batch", 0, 65536, " (0 = no scaling)")
        c.number("momentum", 0, 1, high_open=True)
        for name in ("nesterov", "decay_biases"):
            c.flag(name)
        if self.nesterov and self.momentum == 0:
            c.fail("nesterov", "needs optim.momentum > 0 (Nesterov momentum without momentum is plain SGD)")
        c.number("weight_decay", 0, 1)
        c.number("label_smoothing", 0, 1, high_open=True)
        c.number("grad_clip", 0, 1e6, note=" (0 = off)")


@dataclass(kw_only=True)
class ScheduleConfig:
    kind: Literal["plateau", "cosine"] = "plateau"
    # plateau (section 5): divide by `factor` after `patience` epochs in a row whose val top-1 did not beat the
    # best by more than `min_delta`, at most `max_reductions` times (trainer/schedule.py PlateauDivider).
    factor: float = 0.1
    patience: int = 2              # not in the paper: epochs without improvement before dividing
    max_reductions: int = 3
    # not in the paper: 0.002 = 0.2 top-1 points, about one binomial standard error of top-1 near 60 % on
    # ImageNet's 50,000 val images (sqrt(0.6 * 0.4 / 50000)), so sampling noise does not count as progress
    min_delta: float = 0.002
    # cosine: linear warm-up from lr * warmup_start for warmup_epochs, then cosine to lr * final_fraction.
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1
    final_fraction: float = 0.0

    def validate(self) -> None:
        c = _Check("schedule", self)
        c.choice("kind")
        c.number("factor", 0, 1, low_open=True, high_open=True)
        c.integer("patience", 1, 10000)
        c.number("min_delta", 0, 1, high_open=True)
        c.integer("max_reductions", 0, 100)
        c.number("warmup_epochs", 0, 10000)
        c.number("warmup_start", 0, 1, low_open=True)
        c.number("final_fraction", 0, 1)


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 90
    batch_size: int = 128           # global: split evenly across workers
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "fp32"     # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: Literal["auto", "on", "off"] = "off"      # auto: on for GPU
    compile: Literal["auto", "on", "off"] = "off"            # auto: torch.compile on GPU
    max_steps_per_epoch: int = 0    # 0: full epochs; >0 caps steps (smoke tests, benchmarks)
    log_every: int = 20             # steps between progress lines
    # a checkpoint (with every rank's data position) every N steps inside an epoch; 0: at epoch ends only
    checkpoint_every: int = 0
    skip_nonfinite: bool = False    # a NaN/inf loss or gradient skips that step instead of stopping the run
    # the CUDA stream training runs on (trainer/parallelize.py training_stream); "side" is unmeasured so far
    cuda_stream: Literal["default", "side"] = "default"

    def validate(self) -> None:
        c = _Check("train", self)
        c.integer("epochs", 1, 10000)
        c.integer("batch_size", 1, 65536)
        c.integer("seed", 0, 2**32 - 1)
        for name in ("precision", "channels_last", "compile", "cuda_stream"):
            c.choice(name)
        c.integer("max_steps_per_epoch", 0, note=" (0 = full epochs)")
        c.integer("log_every", 1)
        c.integer("checkpoint_every", 0, note=" (0 = at epoch ends only)")
        c.flag("skip_nonfinite")


@dataclass(kw_only=True)
class RunConfig:
    out: str = ""                   # RUN_DIR
    # "auto" (trainer/fit.py decide_workers): one worker per GPU of the cluster, one GPU each; no GPU: 1 CPU worker
    workers: int | Literal["auto"] = "auto"
    # an elastic group (both > 0): it trains with any size in min_workers..max_workers; 0, 0: a fixed group of `workers`
    min_workers: int = 0
    max_workers: int = 0
    gpus_per_worker: float | Literal["auto"] = "auto"   # 0: CPU workers (gloo); >0: GPU workers (NCCL)
    # "auto" (trainer/ray_cluster.py decide_cpus): GPU_WORKER_CPUS for a GPU worker, 1 for a CPU worker
    cpus_per_worker: float | Literal["auto"] = "auto"
    parallel: Literal["data", "model"] = "data"
    max_failures: int = 2           # Ray Train restarts the group from the last checkpoint this often
    save_rank_states: bool = False  # every rank writes RUN_DIR/rank_states/rank<r>.pt each epoch (DDP check)
    placement_timeout_s: float = 120  # wait this long for a cluster with room for every worker, then fail
    resize_check_s: float = 60      # an elastic group below max_workers checks for room to grow this often
    # preemption notices (trainer/preemption.py): checked every N steps, a checkpoint on a notice; 0: off
    preemption_check_every: int = 10
    max_preemption_failures: int = -1   # restarts after a reclaimed node, counted apart from max_failures
    preemption_grace_s: float = 0.0     # Ray Train keeps the survivors this long past the reclaim's deadline

    def validate(self) -> None:
        c = _Check("run", self)
        if self.workers != "auto":
            c.integer("workers", 0, 4096, " (0 = local mode, in this process)")
        c.integer("max_workers", 0, 4096, " (0 = a fixed group of run.workers)")
        c.integer("min_workers", 0, 4096)
        if bool(self.min_workers) != bool(self.max_workers):
            c.fail("min_workers", f"and run.max_workers ({self.max_workers}) must both be 0 (a fixed group) or "
                                  f"both >= 1 (an elastic one)")
        c.integer("min_workers", 0, self.max_workers, " (run.max_workers)")
        if self.gpus_per_worker != "auto":
            c.number("gpus_per_worker", 0, 16)
        if self.cpus_per_worker != "auto":
            c.number("cpus_per_worker", 0, 1024, low_open=True)
        c.choice("parallel")
        if self.parallel == "model" and self.gpus_per_worker not in (0, 2, "auto"):
            raise ValueError(f"--parallel model needs two devices per worker: --gpus-per-worker 2 "
                             f"(or 0 for two CPU columns), got {self.gpus_per_worker}")
        c.integer("max_failures", -1, note=" (-1 = retry forever)")
        c.flag("save_rank_states")
        c.number("placement_timeout_s", 0, 604800, low_open=True)
        c.number("resize_check_s", 0, 86400, low_open=True)
        c.integer("preemption_check_every", 0, 1_000_000, " (0 = off)")
        c.integer("max_preemption_failures", -1, note=" (-1 = restart after every reclaim)")
        c.number("preemption_grace_s", 0, 3600)


@dataclass(kw_only=True)
class FaultConfig:
    """Injected failures for tests and drills (trainer/faults.py); 0 = off. Global 1-based steps, once per RUN_DIR."""
    kill_at_step: int = 0           # SIGKILL the worker process of `rank` before this step
    raise_at_step: int = 0          # raise RuntimeError in `rank` before this step
    nan_at_step: int = 0            # `rank`'s loss becomes NaN at this step
    hang_at_step: int = 0           # `rank` stops for good before this step (a hung process)
    rank: int = 0
    record_keys: bool = False       # every rank appends each step's sample keys to RUN_DIR/keys/ (tests)

    def validate(self) -> None:
        c = _Check("fault", self)
        for name in ("kill_at_step", "raise_at_step", "nan_at_step", "hang_at_step"):
            c.integer(name, 0, note=" (0 = off)")
        c.integer("rank", 0)
        c.flag("record_keys")


# CPUs (and so DALI decoder threads) a GPU worker gets when run.cpus_per_worker is "auto"
GPU_WORKER_CPUS = 8

SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
            "train": TrainConfig, "run": RunConfig, "fault": FaultConfig}


@dataclass(kw_only=True)
class Config:
    preset: str = "modern"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    # ---- derived values -------------------------------------------------------------------------
    def peak_lr(self) -> float:
        """The learning rate actually used: ``lr`` scaled linearly with the global batch (Goyal et al.)."""
        ref = self.optim.lr_reference_batch
        return self.optim.lr * (self.train.batch_size / ref if ref else 1.0)

    def per_worker_batch(self) -> int:
        return self.train.batch_size // max(1, 1 if self.run.workers == "auto" else self.run.workers)

    def loader_config(self, shard_dir: str, *, rank: int, world_size: int, device, batch_size: int,
                      ten_crop: bool = False):
        """The input pipeline's config for one rank, derived from this run's data and train sections."""
        from pipeline import LoaderConfig

        d = self.data
        return LoaderConfig(shard_dir=shard_dir, batch_size=batch_size, rank=rank, world_size=world_size,
                            device=str(device), seed=self.train.seed, crop=d.crop, lighting=d.lighting,
                            flip=d.flip, normalize=d.normalize, image_size=d.image_size, resize_shorter=d.shorter_side(),
                            layout="NHWC" if self.use_channels_last() else "NCHW", dtype="float32",
                            num_threads=self.loader_threads(), num_workers=self.loader_threads(), ten_crop=ten_crop)

    def loader_threads(self) -> int:
        """``data.num_threads``; 0 (auto) gives a GPU worker the CPUs Ray gives it (nvJPEG runs the Huffman stage of
        every image the hardware decoder does not take on these threads) and a CPU worker 2."""
        if self.data.num_threads:
            return self.data.num_threads
        if not self.on_gpu():
            return 2
        cpus = self.run.cpus_per_worker
        return GPU_WORKER_CPUS if cpus == "auto" else max(1, int(cpus))

    def on_gpu(self) -> bool:
        # "auto" is decided by fit (trainer/fit.py decide_workers) before any worker reads this
        return self.run.gpus_per_worker != "auto" and self.run.gpus_per_worker > 0

    def use_bf16(self) -> bool:
        return self.train.precision == "bf16" or (self.train.precision == "auto" and self.on_gpu())

    def use_tf32(self) -> bool:
        """TF32 for float32 convolutions and matmuls on GPUs: only beside bf16 autocast. An fp32 run (the paper
        preset, or auto on the CPU) computes in IEEE float32 (trainer/parallelize.py apply_float32_precision)."""
        return self.use_bf16()

    def precision_note(self) -> str:
        """What the start line says about precision."""
        return "bf16 autocast, TF32 on" if self.use_bf16() else "fp32, TF32 off"

    def use_channels_last(self) -> bool:
        return self.train.channels_last == "on" or (self.train.channels_last == "auto" and self.on_gpu())

    def use_compile(self) -> bool:
        # auto leaves --parallel model eager: the split's forward (streams, cross-device joins) is not compiled
        return self.train.compile == "on" or (self.train.compile == "auto" and self.on_gpu()
                                              and self.run.parallel == "data")

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- validation -----------------------------------------------------------------------------
    def validate(self, need_data: bool = True) -> "Config":
        """Raise a one-line ValueError naming the key for anything that would fail later: each section's own
        values, then what spans sections; with ``need_data`` also the shard directories and RUN_DIR."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for section in SECTIONS:
            getattr(self, section).validate()
        d, t, r = self.data, self.train, self.run
        if need_data:
            for key in ("train", "val"):
                path = getattr(d, key)
                if not path:
                    raise ValueError(f"data.{key} is not set: pass --{key} SHARD_DIR (a `python -m shards build` output)")
                if not d.stage_to and not Path(path).is_dir():  # a staged source is checked by fit()
                    raise ValueError(f"data.{key}: {path} is not a directory; build it with `python -m shards build`")
            if not r.out:
                raise ValueError("run.out is not set: pass --out RUN_DIR")
        if r.max_workers and r.workers not in ("auto", r.max_workers):
            raise ValueError(f"run.workers ({r.workers}) must be auto or run.max_workers ({r.max_workers}) in an "
                             f"elastic group; --workers {r.min_workers}-{r.max_workers} sets all three")
        if r.workers != "auto" and r.workers and not r.max_workers and t.batch_size % r.workers:
            raise ValueError(f"train.batch_size ({t.batch_size}) is the global batch and must divide evenly by "
                             f"run.workers ({r.workers}); e.g. --batch-size {t.batch_size // r.workers * r.workers or r.workers}")
        if r.parallel == "model" and self.model.columns != 2:
            raise ValueError(f"run.parallel=model places the net's two columns on two devices, model.columns is "
                             f"{self.model.columns}: use --parallel data or --set model.columns=2")
        if r.max_workers and t.batch_size % r.max_workers:
            raise ValueError(f"train.batch_size ({t.batch_size}) is the global batch and must divide evenly by "
                             f"run.max_workers ({r.max_workers}), the per-worker micro-batch being batch_size / "
                             f"max_workers; e.g. --batch-size {t.batch_size // r.max_workers * r.max_workers or r.max_workers}")
        if r.parallel == "model" and t.cuda_stream == "side":
            raise ValueError("train.cuda_stream=side is for a model on one device; run.parallel=model places its two "
                             "columns on streams itself (trainer/parallel.py): use train.cuda_stream=default")
        if r.parallel == "model" and t.compile == "on":
            raise ValueError("--parallel model runs eagerly (trainer/parallel.py's two-column forward is not "
                             "compiled); use --set train.compile=auto or off")
        if self.fault.rank >= max(1, 1 if r.workers == "auto" else r.workers):
            raise ValueError(f"fault.rank must be in [0, run.workers={r.workers}), got {self.fault.rank}")
        return self


# ---- presets ------------------------------------------------------------------------------------
def paper_preset() -> Config:
    """Section 5 of the paper, nothing added: SGD, momentum 0.9, weight decay 0.0005 on every weight,
    lr 0.01 divided by 10 when validation error stops improving (at most three times), batch 128,
    90 epochs, weights N(0, 0.01) with biases 1 in conv2/4/5 and fc6/7, fp32, inputs centred on the 0-255
    scale (section 2)."""
    return Config(preset="paper")  # the dataclass defaults *are* the paper


def modern_preset() -> Config:
    """A faster recipe for the same network; each choice is explained in docs/training.md ("Presets")."""
    return Config(
        preset="modern",
        data=DataConfig(normalize="standard"),
        model=ModelConfig(init="kaiming"),
        optim=OptimConfig(lr=0.02, lr_reference_batch=256, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          decay_biases=False, label_smoothing=0.1, grad_clip=5.0),
        schedule=ScheduleConfig(kind="cosine", warmup_epochs=1.0, warmup_start=0.1, final_fraction=0.0),
        train=TrainConfig(epochs=30, batch_size=256, precision="auto", channels_last="auto", compile="auto"),
    )


PRESETS = {"paper": paper_preset, "modern": modern_preset}


# ---- building a config --------------------------------------------------------------------------
def _convert(value: Any, type_: Any, key: str) -> Any:
    """Coerce a YAML value or a --set string to the field's type; raise naming the key."""
    origin = typing.get_origin(type_)
    if origin in (typing.Union, types.UnionType):   # e.g. int | Literal["auto"]: the first option that fits
        for option in sorted(typing.get_args(type_), key=lambda t: typing.get_origin(t) is not Literal):
            try:
                return _convert(value, option, key)
            except ValueError:
                pass
        names = [{int: "an integer", float: "a number"}.get(t) or " or ".join(map(repr, typing.get_args(t)))
                 for t in typing.get_args(type_)]
        raise ValueError(f"{key} must be {' or '.join(names)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(type_)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):   # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value not in allowed:
            raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")
        return value
    try:
        if type_ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if type_ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if type_ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if type_ is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise TypeError(f"unsupported field type {type_!r} for {key}")
    raise ValueError(f"{key} must be a {type_.__name__}, got {value!r}")


def _field_types(section: str) -> dict[str, Any]:
    hints = typing.get_type_hints(SECTIONS[section])
    return {f.name: hints[f.name] for f in fields(SECTIONS[section])}


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    """Set ``{"section.key": value}`` pairs; unknown keys are rejected, naming them and the valid ones."""
    unknown = []
    for dotted, value in overrides.items():
        section, _, name = dotted.partition(".")
        if section not in SECTIONS or name not in _field_types(section):
            unknown.append(dotted)
            continue
        setattr(getattr(cfg, section), name, _convert(value, _field_types(section)[name], dotted))
    if unknown:
        valid = ", ".join(f"{s}.{n}" for s in SECTIONS for n in _field_types(s))
        raise ValueError(f"{source}: unknown config key(s) {', '.join(sorted(unknown))}; valid keys: {valid}")
    return cfg


def flatten_yaml(doc: Any, path: str) -> tuple[str | None, dict[str, Any]]:
    """A YAML mapping of sections -> the preset it names and ``{"section.key": value}``."""
    if doc is None:
        return None, {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of sections (data, model, optim, schedule, train, run)")
    preset = doc.get("preset")
    flat: dict[str, Any] = {}
    for section, body in doc.items():
        if section == "preset":
            continue
        if isinstance(body, dict) and section in SECTIONS:
            flat.update({f"{section}.{k}": v for k, v in body.items()})
        else:
            flat[str(section)] = body  # reported as unknown by apply_overrides
    return preset, flat


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not key.isprintable():   # a newline in a key would split the error
            raise ValueError(f"--set {item[:80]!r}: expected key=value, e.g. --set optim.lr=0.02")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except (yaml.YAMLError, ValueError) as e:  # a control character, an unclosed bracket, a 5000-digit int
            raise ValueError(f"--set {key.strip()}: value {value[:40]!r} is not a YAML scalar or list "
                             f"({str(e).splitlines()[0]}); quote it or fix it") from None
    return out


def build_config(preset: str | None = None, config_file: str | None = None,
                 flags: dict[str, Any] | None = None, sets: list[str] | None = None,
                 need_data: bool = True) -> Config:
    """Preset < YAML file < flags (``{"section.key": value}``, None = not given) < --set; then validate."""
    file_preset, file_values = None, {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"--config {config_file}: no such file")
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"--config {config_file}: not valid YAML ({str(e).splitlines()[0]})") from None
        file_preset, file_values = flatten_yaml(doc, config_file)
    name = preset or file_preset or "modern"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    apply_overrides(cfg, file_values, f"--config {config_file}")
    apply_overrides(cfg, {k: v for k, v in (flags or {}).items() if v is not None}, "command line")
    apply_overrides(cfg, parse_set(sets or []), "--set")
    return cfg.validate(need_data=need_data)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved with :meth:`Config.to_dict` (e.g. from a checkpoint), validated like a new one
    (the shard directories are not looked for: they may be staged, or on another machine)."""
    cfg = Config(preset=d.get("preset", "modern"))
    flat = {f"{s}.{k}": v for s in SECTIONS for k, v in d.get(s, {}).items()}
    return apply_overrides(cfg, flat, "checkpoint config").validate(need_data=False)
