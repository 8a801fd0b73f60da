"""Property-based fuzzing of the files and values a user hands the commands, with Hypothesis.

Families, each fed to the real commands in this process:

- ``manifest.json`` contents (valid manifests with fields changed, removed or retyped, hostile shard names,
  raw bytes) -> ``python -m shards verify`` and ``ShardSet.open`` (where both loaders read a manifest);
- ``classes.json`` contents, the same way;
- model files: ``meta`` values and tensor shapes, dtypes and values (NaN, zero-stride views, missing or extra
  layers) -> ``python -m trainer predict`` and ``eval`` (``trainer.cli.main``);
- ``--set KEY=VALUE`` values -> ``trainer.config.build_config``.

Properties, for every case: the exit status is 0 or 2 and a refusal is exactly one ``error:`` line (never an
uncaught exception); nothing is written anywhere under the case's folder; memory stays bounded (Python
allocations by tracemalloc, everything else by the peak RSS, reset before each case). Example counts and
the seed come from the Hypothesis profile (tests/conftest.py): fixed in CI, many more with ``make fuzz``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pipeline.shardset import ShardSet
from shards.manifest import ShardError
from trainer import checkpoint as ckpt
from trainer.model import AlexNet

CLASSES = ["digit_0", "digit_1"]
PY_PEAK = 64 << 20       # Python allocations per case: the tiny split's tars are 0.1 MB
RSS_GROWTH = 1 << 30     # all allocations per case: a meta-sized model would be 23.5 GB


# ---------------------------------------------------------------- the ground the cases run on

@pytest.fixture(scope="module")
def ground(digits_shards, tmp_path_factory) -> Path:
    """ROOT/split: a real 12-image, 3-shard split of two classes; ROOT/outside.tar, a file names could reach;
    ROOT/split/adir, a directory names could point at; ROOT/image.jpg for predict."""
    from shards.build import BuildConfig, build

    root = tmp_path_factory.mktemp("fuzz")
    src = root / "src"
    for name in CLASSES:
        (src / name).mkdir(parents=True)
        for p in sorted((digits_shards.raw / "val" / name).glob("*.jpg"))[:6]:
            shutil.copy(p, src / name / p.name)
    build(BuildConfig(str(src), str(root / "split"), "val", max_count=4, seed=0), progress=False)
    shutil.copy(root / "split" / "val-000000.tar", root / "outside.tar")
    shutil.copy(next((src / CLASSES[0]).glob("*.jpg")), root / "image.jpg")
    shutil.rmtree(src)
    (root / "split" / "adir").mkdir()
    return root


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def rss_peak_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@contextlib.contextmanager
def bounded_case(root: Path):
    """Check the properties every case shares around the command: nothing written, memory bounded."""
    before = tree(root)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")   # peak RSS := current RSS
    rss0 = rss_peak_kb()
    tracemalloc.start()
    try:
        yield
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert py_peak < PY_PEAK, py_peak
    assert (rss_peak_kb() - rss0) * 1024 < RSS_GROWTH
    assert tree(root) == before


def run_cli(main, argv: list[str]) -> tuple[int, list[str], str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    return code, err.getvalue().splitlines(), out.getvalue()


def assert_exit_0_or_one_error_line(code: int, err: list[str]) -> None:
    assert code in (0, 2), (code, err)
    errors = [line for line in err if line.startswith("error")]
    assert not [line for line in err if "Traceback" in line], err
    assert errors == [] if code == 0 else len(errors) == 1, err


# ---------------------------------------------------------------- JSON values

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["../outside.tar", "/etc/passwd", "a/b", ".", "..", "", "x\n", "a\x00b", "adir", "manifest.json",
                     "classes.json", "val-000001.tar", "val-000000.idx", "\ud800", "é" * 200]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
raw_bytes = st.one_of(st.binary(max_size=200), st.sampled_from([b"", b"[" * 100_000, b"{\"a\": " * 50_000,
                                                               b"\xff\xfe", b"1" * 10_000, b"NaN"]))


def dumps(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


def mutated(doc: dict, changes: list[tuple]) -> dict:
    """``doc`` with each ``(kind, path, value)`` applied where ``path`` still leads somewhere."""
    def has(container, key) -> bool:
        return (isinstance(container, dict) and isinstance(key, str)
                or isinstance(container, list) and isinstance(key, int) and key < len(container))

    doc = json.loads(json.dumps(doc))
    for kind, path, value in changes:
        target = doc
        for step in path[:-1]:
            if not (has(target, step) and (isinstance(target, list) or step in target)):
                break
            target = target[step]
        else:
            key = path[-1]
            if not has(target, key):
                continue
            if kind == "set":
                target[key] = value
            elif isinstance(target, dict):
                target.pop(key, None)
            else:
                del target[key]
    return doc


def field_changes(paths: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(st.tuples(st.sampled_from(["set", "set", "del"]), paths, json_values), max_size=4)


MANIFEST_PATHS = st.one_of(
    st.sampled_from([("format",), ("split",), ("num_samples",), ("total_bytes",), ("num_classes",), ("classes",),
                     ("shards",), ("rejected",), ("args",)]).map(list),
    st.tuples(st.just("shards"), st.integers(0, 3),
              st.sampled_from(["name", "index", "count", "bytes", "sha256", "extra"])).map(list),
    st.tuples(st.just("classes"), st.integers(0, 2)).map(list))
CLASSES_PATHS = st.one_of(
    st.just(["classes"]),
    st.tuples(st.just("classes"), st.integers(0, 2)).map(list),
    st.tuples(st.just("classes"), st.integers(0, 2), st.sampled_from(["index", "name", "description", "x"])).map(list))


def documents(paths) -> st.SearchStrategy:
    """``("changes", [...])`` on the real document, a whole JSON value, or raw bytes."""
    return st.one_of(st.tuples(st.just("changes"), field_changes(paths)),
                     st.tuples(st.just("value"), json_values),
                     st.tuples(st.just("bytes"), raw_bytes))


def check_shard_dir(root: Path, name: str, doc) -> None:
    """Write ``doc`` as ROOT/split/NAME, run verify and ShardSet.open on it, restore the file."""
    from shards.__main__ import main

    split = root / "split"
    original = (split / name).read_bytes()
    kind, content = doc
    data = (dumps(mutated(json.loads(original), content)) if kind == "changes"
            else dumps(content) if kind == "value" else content)
    (split / name).write_bytes(data)
    try:
        with bounded_case(root):
            try:
                opened = ShardSet.open(split)
            except ShardError as e:
                assert "\n" not in str(e), str(e)
                opened = None
            code, err, _ = run_cli(main, ["verify", str(split), "--quiet"])
        assert_exit_0_or_one_error_line(code, err)
        event(f"verify exit {code}, ShardSet.open {'ok' if opened else 'refused'}")
        if opened is not None:   # whatever it accepted lies inside the split
            assert all(Path(s.tar).parent == split.resolve() and Path(s.index).parent == split.resolve()
                       for s in opened.shards)
    finally:
        (split / name).write_bytes(original)


@settings(max_examples=settings.default.max_examples)
@given(doc=documents(MANIFEST_PATHS))
def test_fuzz_manifest_json(ground, doc):
    check_shard_dir(ground, "manifest.json", doc)


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(doc=documents(CLASSES_PATHS))
def test_fuzz_classes_json(ground, doc):
    check_shard_dir(ground, "classes.json", doc)


# ---------------------------------------------------------------- model files

LAYER_KEYS = [f"{layer}.{p}" for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
              for p in ("weight", "bias")]
META_KEYS = ["classes", "width", "image_size", "resize_shorter", "dropout", "preset", "epoch"]
tensors = st.one_of(
    st.lists(st.integers(0, 40), max_size=4).map(lambda shape: torch.zeros(shape)),
    st.tuples(st.integers(1, 10**5), st.integers(1, 10**5)).map(lambda s: torch.zeros(1).expand(*s)),
    st.sampled_from([torch.int64, torch.bool, torch.complex64, torch.uint8]).map(lambda d: torch.zeros(3, dtype=d)),
    json_scalars)
model_changes = st.lists(st.one_of(
    st.tuples(st.just("meta"), st.sampled_from(META_KEYS), json_values),
    st.tuples(st.just("meta-del"), st.sampled_from(META_KEYS), st.none()),
    st.tuples(st.just("meta-is"), st.none(), json_values),
    st.tuples(st.just("tensor"), st.sampled_from(LAYER_KEYS + ["extra.weight"]), tensors),
    st.tuples(st.just("tensor-del"), st.sampled_from(LAYER_KEYS), st.none()),
    st.tuples(st.just("tensor-fill"), st.sampled_from(LAYER_KEYS),
              st.sampled_from([math.nan, math.inf, -math.inf, 1e30])),
    st.tuples(st.just("model-is"), st.none(), json_values),
    st.tuples(st.just("training-state"), st.none(), json_values)), max_size=3)


def model_file(width: float, size: int, shorter: int, changes: list[tuple]) -> dict:
    torch.manual_seed(0)
    obj = {"model": ckpt.plain_state_dict(AlexNet(len(CLASSES), width=width, image_size=size)),
           "meta": {"classes": CLASSES, "width": width, "image_size": size, "resize_shorter": shorter,
                    "dropout": 0.5, "preset": "modern", "epoch": 0}}
    for kind, key, value in changes:
        model, meta = obj["model"], obj.get("meta")
        if kind == "meta" and isinstance(meta, dict):
            meta[key] = value
        elif kind == "meta-del" and isinstance(meta, dict):
            meta.pop(key, None)
        elif kind == "meta-is":
            obj["meta"] = value
        elif kind == "tensor" and isinstance(model, dict):
            model[key] = value
        elif kind == "tensor-del" and isinstance(model, dict):
            model.pop(key, None)
        elif kind == "tensor-fill" and isinstance(model, dict) and isinstance(model.get(key), torch.Tensor):
            model[key] = model[key].clone().view(-1).index_fill(0, torch.tensor([0]), value).view(model[key].shape)
        elif kind == "model-is":
            obj["model"] = value
        elif kind == "training-state":   # the Ray Train form: no meta, the facts in its config
            obj.pop("meta", None)
            obj.update(classes=CLASSES, epoch=0, config=value if not isinstance(value, dict) or value else {
                "model": {"width": width, "dropout": 0.5}, "data": {"image_size": size, "resize_shorter": shorter}})
    return obj


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is several times faster than two spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@settings(max_examples=max(10, settings.default.max_examples * 3 // 4))
@given(width=st.sampled_from([0.02, 0.05, 0.125]), size=st.integers(63, 130), extra=st.integers(0, 30),
       changes=model_changes, command=st.sampled_from(["predict", "predict", "predict", "eval"]))
def test_fuzz_model_files(ground, one_thread, width, size, extra, changes, command):
    from trainer.cli import main

    path = ground / "model.pt"
    torch.save(model_file(width, size, size + extra, changes), path)
    args = ([str(ground / "image.jpg")] if command == "predict"
            else ["--data", str(ground / "split"), "--loader", "dali", "--batch-size", "4"])
    try:
        with bounded_case(ground):
            code, err, out = run_cli(main, [command, "--checkpoint", str(path), *args])
        assert_exit_0_or_one_error_line(code, err)
        if code == 0:
            assert (json.loads(out)["n"] == 12) if command == "eval" else out.startswith(str(ground / "image.jpg"))
        event(f"{command} exit {code}" + (f": {err[-1].split(': ', 2)[-1][:40]}" if code else ""))
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- --set values

def _config_keys() -> list[str]:
    from trainer.config import SECTIONS, _field_types

    return [f"{s}.{n}" for s in SECTIONS for n in _field_types(s)]


set_values = st.one_of(
    st.text(max_size=12), st.integers(-(10**12), 10**12).map(str), st.floats().map(repr),
    st.sampled_from(["", "null", "true", "no", "[1, 2]", "{a: 1}", ".inf", "-.inf", ".nan", "1e400", "0x10", "0",
                     "-1", "1.5", "'quoted'", "[", "{", "a: b: c", "!!python/object/apply:os.system ['true']",
                     "&a [*a]", "\t", "1_000", "2**31", "9" * 5000, "dali", "reference", "paper", "modern"]))


@settings(max_examples=settings.default.max_examples)
@given(items=st.lists(st.tuples(st.one_of(st.sampled_from(_config_keys()), st.text(max_size=10)), set_values),
                      min_size=1, max_size=3))
def test_fuzz_config_set_values(items):
    from trainer.config import Config, build_config

    sets = [f"{key}={value}" for key, value in items]
    try:
        cfg = build_config(None, None, {}, sets, need_data=False)
    except ValueError as e:
        message = str(e)
        assert "\n" not in message, message
        assert any(key.strip() and key.strip() in message for key, _ in items) or "--set" in message, message
        event("ValueError")
    else:
        assert isinstance(cfg, Config)
        event("valid Config")
