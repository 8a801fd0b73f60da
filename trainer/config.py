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
"""
from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
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
    image_size: int = 224
    resize_shorter: int = 0         # 0: image_size * 256 / 224, the paper's 256 for 224
    num_threads: int = 2            # DALI CPU threads / DataLoader workers per rank

    def shorter_side(self) -> int:
        return self.resize_shorter or round(self.image_size * 256 / 224)


@dataclass
class ModelConfig:
    width: float = 1.0              # multiplies every conv and fc width (1.0 = the paper's net)
    dropout: float = 0.5
    init: Literal["paper", "kaiming"] = "paper"


@dataclass
class OptimConfig:
    lr: float = 0.01                # at a global batch of lr_reference_batch
    lr_reference_batch: int = 0     # 0: no scaling; else lr * batch_size / lr_reference_batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_biases: bool = True       # the paper decays every weight; modern recipes skip biases
    label_smoothing: float = 0.0
    grad_clip: float = 0.0          # max global grad norm; 0: off


@dataclass
class ScheduleConfig:
    kind: Literal["plateau", "cosine"] = "plateau"
    # plateau (section 5): divide by `factor` when val top-1 has not improved for `patience` epochs,
    # at most `max_reductions` times.
    factor: float = 0.1
    patience: int = 2              # not in the paper: epochs without a new best before dividing
    max_reductions: int = 3
    # cosine: linear warm-up from lr * warmup_start for warmup_epochs, then cosine to lr * final_fraction.
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1
    final_fraction: float = 0.0


@dataclass
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


@dataclass
class RunConfig:
    out: str = ""                   # RUN_DIR
    workers: int = 1
    gpus_per_worker: float = 0      # 0: CPU workers (gloo); >0: GPU workers (NCCL)
    cpus_per_worker: float = 1
    parallel: Literal["data", "model"] = "data"
    max_failures: int = 2           # Ray Train restarts the group from the last checkpoint this often
    save_rank_states: bool = False  # every rank writes RUN_DIR/rank_states/rank<r>.pt each epoch (DDP check)
    placement_timeout_s: float = 120  # wait this long for a cluster with room for every worker, then fail


@dataclass
class FaultConfig:
    """Injected failures for tests and drills (trainer/faults.py); 0 = off. Global 1-based steps, once per RUN_DIR."""
    kill_at_step: int = 0           # SIGKILL the worker process of `rank` before this step
    raise_at_step: int = 0          # raise RuntimeError in `rank` before this step
    nan_at_step: int = 0            # `rank`'s loss becomes NaN at this step
    rank: int = 0


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
            "train": TrainConfig, "run": RunConfig, "fault": FaultConfig}


@dataclass
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
        return self.train.batch_size // max(1, self.run.workers)

    def loader_config(self, shard_dir: str, *, rank: int, world_size: int, device, batch_size: int,
                      ten_crop: bool = False):
        """The input pipeline's config for one rank, derived from this run's data and train sections."""
        from pipeline import LoaderConfig

        d = self.data
        return LoaderConfig(shard_dir=shard_dir, batch_size=batch_size, rank=rank, world_size=world_size,
                            device=str(device), seed=self.train.seed, crop=d.crop, lighting=d.lighting,
                            flip=d.flip, image_size=d.image_size, resize_shorter=d.shorter_side(),
                            layout="NHWC" if self.use_channels_last() else "NCHW", dtype="float32",
                            num_threads=d.num_threads, num_workers=d.num_threads, ten_crop=ten_crop)

    def on_gpu(self) -> bool:
        return self.run.gpus_per_worker > 0

    def use_bf16(self) -> bool:
        return self.train.precision == "bf16" or (self.train.precision == "auto" and self.on_gpu())

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
        """Raise ValueError with an actionable message for anything that would fail later."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for section in SECTIONS:
            for f in fields(SECTIONS[section]):
                value = getattr(getattr(self, section), f.name)
                allowed = typing.get_args(f.type) if typing.get_origin(f.type) is Literal else ()
                if allowed and value not in allowed:
                    raise ValueError(f"{section}.{f.name} must be one of {list(allowed)}, got {value!r}")
        d, m, o, s, t, r = self.data, self.model, self.optim, self.schedule, self.train, self.run
        if need_data:
            for key in ("train", "val"):
                path = getattr(d, key)
                if not path:
                    raise ValueError(f"data.{key} is not set: pass --{key} SHARD_DIR (a `python -m shards build` output)")
                if not d.stage_to and not Path(path).is_dir():  # a staged source is checked by fit()
                    raise ValueError(f"data.{key}: {path} is not a directory; build it with `python -m shards build`")
            if not r.out:
                raise ValueError("run.out is not set: pass --out RUN_DIR")
        _positive("data.image_size", d.image_size, minimum=63)
        if d.resize_shorter and d.resize_shorter < d.image_size:
            raise ValueError(f"data.resize_shorter ({d.resize_shorter}) must be >= data.image_size ({d.image_size}) or 0")
        _positive("data.num_threads", d.num_threads)
        if not (m.width > 0 and math.isfinite(m.width)):
            raise ValueError(f"model.width must be a positive number, got {m.width}")
        if not 0 <= m.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {m.dropout}")
        if not (o.lr > 0 and math.isfinite(o.lr)):
            raise ValueError(f"optim.lr must be positive, got {o.lr}")
        if o.lr_reference_batch < 0:
            raise ValueError(f"optim.lr_reference_batch must be >= 0 (0 = no scaling), got {o.lr_reference_batch}")
        if not 0 <= o.momentum < 1:
            raise ValueError(f"optim.momentum must be in [0, 1), got {o.momentum}")
        if o.nesterov and o.momentum == 0:
            raise ValueError("optim.nesterov needs optim.momentum > 0")
        if o.weight_decay < 0 or not 0 <= o.label_smoothing < 1 or o.grad_clip < 0:
            raise ValueError("optim.weight_decay and optim.grad_clip must be >= 0 and optim.label_smoothing in [0, 1)")
        if not 0 < s.factor < 1:
            raise ValueError(f"schedule.factor must be in (0, 1), got {s.factor}")
        if s.patience < 0 or s.max_reductions < 0 or s.warmup_epochs < 0:
            raise ValueError("schedule.patience, schedule.max_reductions and schedule.warmup_epochs must be >= 0")
        if not 0 < s.warmup_start <= 1 or not 0 <= s.final_fraction <= 1:
            raise ValueError("schedule.warmup_start must be in (0, 1] and schedule.final_fraction in [0, 1]")
        _positive("train.epochs", t.epochs)
        _positive("train.batch_size", t.batch_size)
        if t.max_steps_per_epoch < 0 or t.log_every < 1:
            raise ValueError("train.max_steps_per_epoch must be >= 0 and train.log_every >= 1")
        if t.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every must be >= 0 (0 = at epoch ends only), got {t.checkpoint_every}")
        if not isinstance(r.workers, int) or r.workers < 0:
            raise ValueError(f"run.workers must be an integer >= 0 (0 = local mode, in this process), got {r.workers!r}")
        if r.workers and t.batch_size % r.workers:
            raise ValueError(f"train.batch_size ({t.batch_size}) is the global batch and must divide evenly by "
                             f"run.workers ({r.workers}); e.g. --batch-size {t.batch_size // r.workers * r.workers or r.workers}")
        if r.gpus_per_worker < 0 or r.cpus_per_worker <= 0:
            raise ValueError("run.gpus_per_worker must be >= 0 and run.cpus_per_worker > 0")
        if r.parallel == "model" and r.gpus_per_worker not in (0, 2):
            raise ValueError(f"--parallel model needs two devices per worker: --gpus-per-worker 2 "
                             f"(or 0 for two CPU columns), got {r.gpus_per_worker}")
        if r.parallel == "model" and t.compile == "on":
            raise ValueError("--parallel model runs eagerly (trainer/parallel.py's two-column forward is not "
                             "compiled); use --set train.compile=auto or off")
        if not r.placement_timeout_s > 0:
            raise ValueError(f"run.placement_timeout_s must be > 0, got {r.placement_timeout_s}")
        f = self.fault
        if min(f.kill_at_step, f.raise_at_step, f.nan_at_step) < 0 or not 0 <= f.rank < max(1, r.workers):
            raise ValueError(f"fault.*_at_step must be >= 0 (0 = off) and fault.rank in [0, run.workers={r.workers}), "
                             f"got {f}")
        if r.max_failures < -1:
            raise ValueError(f"run.max_failures must be >= -1 (-1 = retry forever), got {r.max_failures}")
        return self


def _positive(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---- presets ------------------------------------------------------------------------------------
def paper_preset() -> Config:
    """Section 5 of the paper, nothing added: SGD, momentum 0.9, weight decay 0.0005 on every weight,
    lr 0.01 divided by 10 when validation error stops improving (at most three times), batch 128,
    90 epochs, weights N(0, 0.01) with biases 1 in conv2/4/5 and fc6/7, fp32."""
    return Config(preset="paper")  # the dataclass defaults *are* the paper


def modern_preset() -> Config:
    """A faster recipe for the same network; each choice is explained in docs/training.md ("Presets")."""
    return Config(
        preset="modern",
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
    if origin is Literal:
        allowed = typing.get_args(type_)
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
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=0.02")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
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
    """Rebuild a Config saved with :meth:`Config.to_dict` (e.g. from a checkpoint)."""
    cfg = Config(preset=d.get("preset", "modern"))
    flat = {f"{s}.{k}": v for s in SECTIONS for k, v in d.get(s, {}).items()}
    return apply_overrides(cfg, flat, "checkpoint config")
