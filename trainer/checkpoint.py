"""What a run saves and how: atomic writes, RNG states, and the plain files eval/predict read.

Two kinds of file, both loadable with ``torch.load(path, weights_only=True)`` (only tensors and plain
Python values inside, so loading never runs pickled code):

- the *training state* (``checkpoint.pt`` inside each Ray Train checkpoint directory): model,
  optimizer, scheduler, epoch, every rank's RNG states, the config and the class names; enough to
  continue a run exactly where it stopped.
- the *model file* (``RUN_DIR/last.pt``, ``RUN_DIR/best.pt``): ``{"model": state_dict, "meta": {...}}``
  with the class names, width, image size and the epoch's metrics; what ``eval`` and ``predict`` need.
"""
from __future__ import annotations

import datetime
import math
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from shards.fileio import atomic_write

TRAINING_STATE = "checkpoint.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through :func:`shards.fileio.atomic_write`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes removed,
    on the CPU, so files are interchangeable between single-device, DDP, compiled and split models."""
    out = {}
    for key, value in model.state_dict().items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value.detach().to("cpu", copy=True)
    return out


def _cuda_devices(devices: Sequence[torch.device | str] | None) -> list[torch.device]:
    """The distinct CUDA devices among ``devices``, in order (None: the current one, once CUDA is in use)."""
    if devices is None:
        initialised = torch.cuda.is_available() and torch.cuda.is_initialized()
        return [torch.device("cuda", torch.cuda.current_device())] if initialised else []
    out = []
    for d in map(torch.device, devices):
        if d.type == "cuda":
            d = torch.device("cuda", torch.cuda.current_device() if d.index is None else d.index)
            if d not in out:
                out.append(d)
    return out


def rng_state(devices: Sequence[torch.device | str] | None = None) -> dict[str, Any]:
    """This process's RNG states as weights_only-safe values (tensors, ints, lists): torch's CPU generator,
    numpy's, Python's and the generator of every CUDA device in ``devices`` (a worker's devices: two GPUs
    for run.parallel=model, whose columns draw dropout masks on their own GPU), as a list in that order."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    cuda = _cuda_devices(devices)
    if cuda:
        state["cuda"] = [torch.cuda.get_rng_state(d) for d in cuda]
    return state


def set_rng_state(state: dict[str, Any], devices: Sequence[torch.device | str] | None = None) -> None:
    """Restore :func:`rng_state`'s states, the CUDA ones onto ``devices``' CUDA devices in the same order
    (device indices may differ between runs: Ray assigns them)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state.get("cuda")
    if saved is not None and torch.cuda.is_available():
        saved = [saved] if isinstance(saved, torch.Tensor) else saved   # older files: one device's state
        for device, cuda_state in zip(_cuda_devices(devices), saved):
            torch.cuda.set_rng_state(cuda_state, device)


CHECKPOINT_PREFIX = "checkpoint_"   # Ray Train's name for a checkpoint directory on the storage path


def assert_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write weights that hold NaN/inf: a poisoned file is worse than none."""
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ValueError(f"{what}: not written, {bad} holds NaN/inf values; the last good checkpoint is kept")


class ModelState:
    """A model as a checkpoint entry: saved without DDP/compile prefixes, on the CPU (:func:`plain_state_dict`)."""

    def __init__(self, net: torch.nn.Module):
        self.net = net

    def state_dict(self) -> dict[str, torch.Tensor]:
        return plain_state_dict(self.net)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state)

    def misfit(self, state: Any) -> str | None:
        """Why ``state`` cannot load into the model (None if it can), checked before anything is changed."""
        own = self.net.state_dict()
        if not isinstance(state, dict):
            return "no model weights"
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            return f"different layers ({', '.join((missing + extra)[:3])} ...)"
        for k, v in own.items():
            if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape):
                got = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
                return f"{k} is {got}, this model's is {tuple(v.shape)}"
        return None


def save_to_storage(storage: Path, keep: int = 2) -> Callable[[dict, Path | None], None]:
    """A ``publish`` for :class:`Checkpointer` that keeps checkpoints under ``storage`` itself, named as Ray
    Train names them (``checkpoint_<time>``): what Ray Train's local mode, which persists nothing, needs."""
    def publish(metrics: dict, directory: Path | None) -> None:
        if directory is None:
            return
        storage.mkdir(parents=True, exist_ok=True)
        name = CHECKPOINT_PREFIX + datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
        tmp = storage / f".{name}.tmp"
        shutil.copytree(directory, tmp)
        os.replace(tmp, storage / name)          # a reader sees a whole checkpoint directory or none
        for old in sorted(storage.glob(CHECKPOINT_PREFIX + "*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return publish


class Checkpointer:
    """Owns the training state: what is saved, saving it, choosing the newest loadable one, restoring it.

    ``states`` are the objects with ``state_dict``/``load_state_dict`` saved under their names (model,
    optimizer, scheduler); :meth:`save` adds the loop's position (epoch, step, best top-1, every rank's RNG
    and data position, config, classes). Every rank calls :meth:`save`; rank 0 passes the position and
    writes. ``publish(metrics, directory)`` persists a written checkpoint directory: Ray Train's
    ``report`` (which copies it to ``storage/checkpoint_<time>``) or :func:`save_to_storage`.
    """

    def __init__(self, storage: str | os.PathLike, states: dict[str, Any], publish: Callable[[dict, Path | None], None],
                 *, registered: Any = None, log: Callable[[str], None] = print):
        self.storage, self.states, self.publish = Path(storage), states, publish
        self.registered, self.log = registered, log

    def save(self, metrics: dict, position: dict | None) -> None:
        """Save (rank 0: ``position`` given) and publish; other ranks pass None and only publish metrics."""
        with tempfile.TemporaryDirectory() as tmp:
            directory = None
            if position is not None:
                state = {name: obj.state_dict() for name, obj in self.states.items()}
                assert_finite(state["model"], f"checkpoint at epoch {position['epoch'] + 1}")
                torch.save({**state, **position}, Path(tmp) / TRAINING_STATE)
                directory = Path(tmp)
            self.publish(metrics, directory)

    def restore(self) -> tuple[str | None, dict | None]:
        """Load the newest checkpoint that loads and fits into ``states``; return (where, its position)."""
        from trainer.distributed import from_rank0, rank

        choice = self._choose() if rank() == 0 else None
        choice = from_rank0(choice)
        if choice is None:
            return None, None
        if choice == "registered":
            with self.registered.as_directory() as d:
                where, state = self.registered.path, load(Path(d) / TRAINING_STATE)
        else:
            where, state = choice, load(Path(choice) / TRAINING_STATE)
        for name, obj in self.states.items():
            obj.load_state_dict(state.pop(name))
        return where, state

    def _choose(self) -> str | None:
        """Rank 0: the newest ``checkpoint_*`` directory on the storage path that loads and fits, else Ray's
        registered one. Ray Train learns of a reported checkpoint by polling its workers, so one reported
        just before a worker died can be on disk yet unknown to its controller (seen on a loaded 2-core
        machine: a restart from scratch instead of from step 3). With remote storage (s3://, gs://) nothing
        is on local disk and Ray's registered checkpoint is used."""
        misfits = []
        found = sorted((p for p in self.storage.glob(CHECKPOINT_PREFIX + "*") if p.is_dir()), reverse=True) \
            if self.storage.is_dir() else []   # not Ray's checkpoint_manager_snapshot.json
        for path in found:
            try:
                state = load(path / TRAINING_STATE)   # weights_only: no pickled code runs
            except Exception as error:   # cut short by a failure, or refused: fall back to the one before
                reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
                self.log(f"[trainer] not resuming from {path}: {reason}")
                continue
            misfit = self.states["model"].misfit(state.get("model"))
            if misfit is None:
                return str(path)
            misfits.append(f"{path.name}: {misfit}")
            self.log(f"[trainer] not resuming from {path}: it does not fit this model ({misfit})")
        if misfits:   # checkpoints of another model: resuming from scratch would silently discard them
            raise ValueError(f"{self.storage}: no checkpoint there fits this model (newest: {misfits[0]}); "
                             f"resume with the run's own settings or pass a new --out")
        return "registered" if self.registered is not None else None


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load a model file or training state safely; a directory means its ``checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / TRAINING_STATE, path / "best.pt", path / "last.pt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ValueError(f"{path}: no {TRAINING_STATE}, best.pt or last.pt inside; pass a file written by "
                             f"`python -m trainer fit` (RUN_DIR/best.pt)")
        path = found
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint; pass RUN_DIR/best.pt or RUN_DIR/last.pt")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); use a file written by `python -m trainer fit`")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects that weights_only refuses
        raise unreadable(path, e) from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise ValueError(f"{path}: not a trainer checkpoint (no 'model' entry); use RUN_DIR/best.pt")
    return obj


def model_meta(obj: dict[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, Any]:
    """The model's construction arguments and class names from a model file or training state, checked
    against its weights: the architecture is read off the tensors' shapes and ``meta`` must agree with it,
    so a file can never make the reader build a model larger than the tensors it holds. Raises a one-line
    ``ValueError`` naming ``path`` for anything missing, ill-typed, out of bounds or non-finite."""
    fix = "use a file written by `python -m trainer fit`"
    if "meta" in obj:
        meta = obj["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: 'meta' is a {type(meta).__name__}, expected a dict; {fix}")
    else:  # a training state: the same facts live in its config
        try:
            cfg = obj["config"]
            meta = {"classes": obj["classes"], "width": cfg["model"]["width"],
                    "image_size": cfg["data"]["image_size"], "dropout": cfg["model"]["dropout"],
                    "resize_shorter": cfg["data"].get("resize_shorter", 0), "epoch": obj.get("epoch", 0),
                    "normalize": cfg["data"].get("normalize", LEGACY_NORMALIZE)}
            meta.update({key: cfg["model"][name] for key, name in CONFIG_NAMES.items() if name in cfg["model"]})
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}: neither 'meta' nor a complete training state ('classes' and a 'config' "
                             f"with model.width, model.dropout, data.image_size); {fix}") from None
        if not meta["resize_shorter"] and _is_int(meta["image_size"]):
            meta["resize_shorter"] = round(meta["image_size"] * 256 / 224)  # Config.shorter_side()
    arch = architecture(obj["model"], path)
    check_meta(meta, arch, path)
    check_finite(obj["model"], path)
    return meta


# --------------------------------------------------------------------------- untrusted model files

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# the bounds trainer/config.py puts on model.width, data.image_size and data.resize_shorter
MAX_WIDTH, MAX_IMAGE_SIZE, MAX_RESIZE_SHORTER = 8.0, 1024, 2048
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
FIX = "use a file written by `python -m trainer fit`"
# pickle opcodes that import or call something (or hand an object to the loader) when unpickled
CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "PERSID",
                "BINPERSID", "EXT1", "EXT2", "EXT4"}
SCAN_BYTES = 64 << 20     # a checkpoint's pickles (not its tensor data) sit in its first bytes


def unreadable(path: Path, error: Exception) -> ValueError:
    """The one-line error for a file ``torch.load(weights_only=True)`` refused: pickled code is named as
    such (whatever pickle protocol, opcode or container carried it), anything else is "not readable"."""
    message = str(error)
    found = re.search(r"GLOBAL (\S+?)\.? (was not an allowed global by default|whose module \S+ is blocked)", message)
    what = f"Unsupported global: GLOBAL {found.group(1)} {found.group(2)}" if found else pickled_code(path)
    if what:  # would run code if loaded without weights_only
        return ValueError(f"{path}: refused, it holds pickled Python objects ({what}); checkpoints are loaded "
                          f"with weights_only=True and never run pickled code: {FIX}")
    noise = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.startswith(noise)]
    reason = f"{type(error).__name__}: {lines[0][:120]}" if lines else type(error).__name__
    return ValueError(f"{path}: not a readable checkpoint ({reason}); {FIX}")


def pickled_code(path: Path) -> str | None:
    """The first thing in the file's pickle streams that imports or calls an object other than torch's
    own tensor rebuilders, or None. Reads opcodes only (pickletools), never unpickles."""
    import zipfile

    streams = []
    try:
        if zipfile.is_zipfile(path):  # torch's format: data.pkl inside a zip
            with zipfile.ZipFile(path) as z:
                streams = [z.open(i).read(SCAN_BYTES) for i in z.infolist() if i.filename.endswith(".pkl")]
        else:  # a bare pickle, or torch's legacy format (several pickles, then raw storages)
            with open(path, "rb") as f:
                streams = [f.read(SCAN_BYTES)]
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError):
        return None
    for data in streams:
        found = _code_in_pickles(data)
        if found:
            return found
    return None


def _code_in_pickles(data: bytes) -> str | None:
    import io
    import pickletools

    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        start, strings, memo, marks = stream.tell(), [], {}, []
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    if not _torch_global(module, attr):
                        return f"Unsupported global: {name} {module}.{attr}"
                elif name == "STACK_GLOBAL":
                    module, attr = (strings[-2:] if len(strings) >= 2 else ["?", "?"])
                    if not _torch_global(module, attr):
                        return f"Unsupported global: STACK_GLOBAL {module}.{attr}"
                elif name == "PERSID":
                    return f"persistent id {str(arg)[:40]!r}"
                elif name == "BINPERSID" and (not marks or marks[-1] != "storage"):
                    return "persistent id that is not a tensor storage"
                elif name.startswith("EXT"):
                    return f"extension code {arg}"
                if isinstance(arg, str) and "UNICODE" in name or name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                    strings.append(arg)
                elif name in ("MEMOIZE",) and strings:
                    memo[len(memo)] = strings[-1]
                elif name in ("PUT", "BINPUT", "LONG_BINPUT") and strings:
                    memo[arg] = strings[-1]
                elif name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
                    strings.append(memo[arg])
                if name == "MARK":
                    marks.append(None)
                elif marks and marks[-1] is None and isinstance(arg, str):
                    marks[-1] = arg  # the first string after a MARK: torch's storage ids start with 'storage'
                elif name == "TUPLE" and marks:
                    marks.append(marks.pop())  # keep the tuple's first string for a BINPERSID right after
                if name == "STOP":
                    break
        except Exception:  # noqa: BLE001 - the rest is not a pickle (a legacy file's raw storages)
            return None
        if stream.tell() == start:
            return None
    return None


def _torch_global(module: str, attr: str) -> bool:
    """What torch's own files import: tensor and storage rebuilders, dtypes, OrderedDict."""
    return module == "torch" or module.startswith("torch.") or (module, attr) == ("collections", "OrderedDict")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# The model variant options a model file's meta may hold (trainer/model.py AlexNet's keyword arguments),
# their values when absent (files written before they existed: the paper's net), and what each may be.
VARIANT_DEFAULTS = {"lrn": True, "lrn_alpha": "paper", "pool": "overlapping", "columns": 2, "activation": "relu"}
VARIANT_VALUES = {"lrn": (True, False), "lrn_alpha": ("paper", "cuda-convnet"),
                  "pool": ("overlapping", "non-overlapping"), "columns": (1, 2), "activation": ("relu", "tanh")}
CONFIG_NAMES = {"lrn": "lrn", "lrn_alpha": "lrn_alpha_convention", "pool": "pool", "columns": "columns",
                "activation": "activation"}   # meta key -> model.* config key


def variant_args(meta: dict[str, Any]) -> dict[str, Any]:
    """AlexNet's variant keyword arguments from a checked ``meta`` (absent keys: the paper's net)."""
    return {key: meta.get(key, default) for key, default in VARIANT_DEFAULTS.items()}


def alexnet_shapes(widths: dict[str, int], side: int, num_classes: int, columns: int = 2) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's shape for AlexNet with these layer widths and column count (trainer/model.py)."""
    w, g = widths, columns
    weights = {"conv1": (w["conv1"], 3, 11, 11), "conv2": (w["conv2"], w["conv1"] // g, 5, 5),
               "conv3": (w["conv3"], w["conv2"], 3, 3), "conv4": (w["conv4"], w["conv3"] // g, 3, 3),
               "conv5": (w["conv5"], w["conv4"] // g, 3, 3), "fc6": (w["fc6"], w["conv5"] * side * side),
               "fc7": (w["fc7"], w["fc6"]), "fc8": (num_classes, w["fc7"])}
    shapes = {}
    for name, shape in weights.items():
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = shape, shape[:1]
    return shapes


def architecture(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``{"widths", "side", "num_classes"}`` read off an AlexNet state dict's shapes, after checking every
    entry is a dense floating-point tensor whose elements its storage really holds (a zero-stride tensor
    could otherwise claim gigabytes the file does not have)."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: 'model' is a {type(state).__name__}, expected a state dict; {FIX}")
    expected = {f"{layer}.{p}" for layer in LAYERS for p in ("weight", "bias")}
    missing = sorted(expected - set(state))
    extra = sorted(str(k)[:40] for k in state if k not in expected)
    if missing or extra:
        raise ValueError(f"{path}: 'model' is not an AlexNet state dict (missing {missing or 'nothing'}, "
                         f"unexpected {extra[:4] or 'nothing'}); {FIX}")
    held, storages = 0, {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_meta or t.is_quantized:
            raise ValueError(f"{path}: model entry {key} is not a dense tensor; {FIX}")
        if t.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"{path}: model entry {key} has dtype {t.dtype}, expected floating point; {FIX}")
        storage = t.untyped_storage()
        need = t.numel() * t.element_size()
        if need > storage.nbytes():
            raise ValueError(f"{path}: model entry {key} claims {t.numel()} elements but its storage holds "
                             f"{storage.nbytes()} bytes; {FIX}")
        held += need
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    if held > sum(storages.values()):
        raise ValueError(f"{path}: model entries share storage ({held} bytes of tensors in "
                         f"{sum(storages.values())} bytes of data); {FIX}")
    if any(state[f"{layer}.weight"].dim() < 1 for layer in LAYERS) or state["fc6.weight"].dim() != 2:
        raise ValueError(f"{path}: model weights have the wrong number of dimensions for AlexNet; {FIX}")
    widths = {layer: int(state[f"{layer}.weight"].shape[0]) for layer in LAYERS[:-1]}
    num_classes = int(state["fc8.weight"].shape[0])
    c5, fc6_in = widths["conv5"], int(state["fc6.weight"].shape[1])
    side = math.isqrt(fc6_in // c5) if c5 > 0 and fc6_in % c5 == 0 else 0
    if side < 1 or side * side * c5 != fc6_in:
        raise ValueError(f"{path}: model entry fc6.weight has {fc6_in} inputs, not conv5's {c5} maps times a "
                         f"square map size; {FIX}")
    # grouped conv2 (two columns) reads half of conv1's maps, the one-column net's reads all of them
    columns = 1 if state["conv2.weight"].dim() > 1 and int(state["conv2.weight"].shape[1]) == widths["conv1"] else 2
    for key, shape in alexnet_shapes(widths, side, num_classes, columns).items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{path}: model entry {key} has shape {tuple(state[key].shape)}, expected {shape} "
                             f"for an AlexNet with the layer widths {list(widths.values())}; {FIX}")
    return {"widths": widths, "side": side, "num_classes": num_classes, "columns": columns}


# Model files written before data.normalize existed were trained on (x - mean) / std inputs.
LEGACY_NORMALIZE = "standard"


def input_normalize(meta: dict[str, Any]) -> str:
    """How the model's inputs were normalised (data.normalize): ``meta["normalize"]``, or "standard" for a
    file written before the key existed."""
    return meta.get("normalize", LEGACY_NORMALIZE)


def check_meta(meta: dict[str, Any], arch: dict[str, Any], path: str | os.PathLike) -> None:
    """``meta`` well typed, within bounds and describing the model ``arch`` (from :func:`architecture`)."""
    from trainer.model import feature_map_size, scaled_widths

    for key in ("classes", "width", "image_size", "resize_shorter"):
        if key not in meta:
            raise ValueError(f"{path}: meta has no {key!r}; {FIX}")
    width, size, shorter, classes = meta["width"], meta["image_size"], meta["resize_shorter"], meta["classes"]
    for key, allowed in VARIANT_VALUES.items():
        value = meta.get(key, VARIANT_DEFAULTS[key])
        if type(value) is not type(VARIANT_DEFAULTS[key]) or value not in allowed:
            raise ValueError(f"{path}: meta {key} {value!r} is not one of {list(allowed)}; {FIX}")
    variant = variant_args(meta)
    if variant["columns"] != arch["columns"]:
        raise ValueError(f"{path}: meta columns {variant['columns']} does not match the weights, which are a "
                         f"{arch['columns']}-column net (conv2's input maps); {FIX}")
    if not (_is_number(width) and 0 < width <= MAX_WIDTH):
        raise ValueError(f"{path}: meta width {width!r} is not a number in (0, {MAX_WIDTH:g}]; {FIX}")
    widths = list(scaled_widths(width, variant["columns"]).values())
    if widths != list(arch["widths"].values()):
        raise ValueError(f"{path}: meta width {width!r} means layer widths {widths}, "
                         f"the weights have {list(arch['widths'].values())}; {FIX}")
    if not (_is_int(size) and 63 <= size <= MAX_IMAGE_SIZE):
        raise ValueError(f"{path}: meta image_size {size!r} is not an integer in 63..{MAX_IMAGE_SIZE}; {FIX}")
    side = feature_map_size(size, variant["pool"])
    if side != arch["side"]:
        pool = "" if variant["pool"] == "overlapping" else f" (with {variant['pool']} pooling)"
        raise ValueError(f"{path}: meta image_size {size} gives {side}x{side} maps into fc6, the weights are for "
                         f"{arch['side']}x{arch['side']}{pool}; {FIX}")
    if not (_is_int(shorter) and size <= shorter <= MAX_RESIZE_SHORTER):
        raise ValueError(f"{path}: meta resize_shorter {shorter!r} is not an integer in {size}..{MAX_RESIZE_SHORTER} "
                         f"(image_size..{MAX_RESIZE_SHORTER}); {FIX}")
    dropout = meta.get("dropout", 0.5)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise ValueError(f"{path}: meta dropout {dropout!r} is not a number in [0, 1); {FIX}")
    if input_normalize(meta) not in ("mean", "standard"):
        raise ValueError(f"{path}: meta normalize {input_normalize(meta)!r} is not 'mean' or 'standard'; {FIX}")
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: meta classes is not a list of class names; {FIX}")
    if len(classes) != arch["num_classes"] or len(classes) < 2:
        raise ValueError(f"{path}: meta lists {len(classes)} classes, fc8 has {arch['num_classes']} outputs "
                         f"(at least 2 needed); {FIX}")


def check_finite(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    for key, t in state.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: model entry {key} holds NaN or infinite values (a diverged run); use an "
                             f"earlier checkpoint of that run, e.g. RUN_DIR/best.pt")
