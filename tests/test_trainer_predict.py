"""`python -m trainer predict`: a tiny AlexNet trained until it knows ten real training images names them."""
from __future__ import annotations

import pytest
import torch

from shards.manifest import load_classes
from trainer.checkpoint import atomic_save
from trainer.config import build_config
from trainer.evaluate import predict, preprocess
from trainer.train import build_model, model_file


@pytest.fixture(scope="module")
def tiny_model(digits_shards, tmp_path_factory):
    classes = load_classes(digits_shards.train)
    images = [sorted((digits_shards.raw / "train" / name).glob("*.jpg"))[0] for name in classes]
    cfg = build_config(sets=["model.width=0.25", "data.image_size=64"], need_data=False)
    x = torch.stack([preprocess(str(p), 64, cfg.data.shorter_side()) for p in images])
    y = torch.arange(len(classes))
    torch.manual_seed(0)
    model = build_model(cfg, len(classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    with torch.no_grad():
        assert model(x).argmax(1).tolist() == y.tolist(), "the tiny model did not learn its ten images"
    path = tmp_path_factory.mktemp("tiny") / "best.pt"
    atomic_save(model_file(model, cfg, classes, {"epoch": 0, "val_top1": 1.0, "val_top5": 1.0}), path)
    return path, images, classes


def test_predict_names_the_class_of_training_images(tiny_model):
    path, images, classes = tiny_model
    results = predict(str(path), [str(p) for p in images])
    for result, name in zip(results, classes):
        top = result["top5"]
        assert top[0]["class"] == name
        assert len(top) == 5 and all(a["prob"] >= b["prob"] for a, b in zip(top, top[1:]))
        assert 0 < sum(c["prob"] for c in top) <= 1.0 + 1e-5


def test_predict_cli_prints_top5_names_and_probabilities(tiny_model, run_main):
    path, images, classes = tiny_model
    out = run_main("trainer", "predict", "--checkpoint", path, images[3])
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(images[3]) and len(lines) == 6
    assert lines[1].split()[:2] == ["1.", classes[3]] and 0 < float(lines[1].split()[-1]) <= 1


def test_predict_rejects_an_unreadable_image(tiny_model, tmp_path, run_main):
    path, _, _ = tiny_model
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = run_main("trainer", "predict", "--checkpoint", path, bad)
    assert out.returncode == 2 and "notes.jpg: cannot read this image" in out.stderr


def test_a_model_file_records_the_normalisation_and_eval_uses_it(tiny_model, digits_shards, tmp_path):
    """meta["normalize"] is the run's data.normalize; eval feeds the model the inputs that names, and a file
    written before the key existed is evaluated on (x - mean) / std inputs, as it was trained."""
    from pipeline import make_eval_loader
    from trainer.evaluate import eval_config, evaluate, load_model
    from trainer.loop import evaluate as evaluate_counts

    path, _, classes = tiny_model
    saved = torch.load(path, weights_only=True)
    assert saved["meta"]["normalize"] == "standard"                     # the modern preset's
    paper = build_config("paper", sets=["model.width=0.25", "data.image_size=64"], need_data=False)
    assert model_file(build_model(paper, len(classes)), paper, classes,
                      {"epoch": 0, "val_top1": 0.0, "val_top5": 0.0})["meta"]["normalize"] == "mean"

    model, meta = load_model(str(path))
    def loss_on(normalize: str) -> float:
        cfg = eval_config(meta, "dali")
        cfg.data.normalize = normalize
        lcfg = cfg.loader_config(str(digits_shards.val), rank=0, world_size=1, device="cpu", batch_size=64)
        counts = evaluate_counts(model, make_eval_loader(lcfg, "dali"), torch.device("cpu"))
        return counts["loss_sum"] / counts["n"]

    files = {"mean": tmp_path / "mean.pt", "old": tmp_path / "old.pt"}
    atomic_save({**saved, "meta": {**saved["meta"], "normalize": "mean"}}, files["mean"])
    atomic_save({**saved, "meta": {k: v for k, v in saved["meta"].items() if k != "normalize"}}, files["old"])
    got = {name: evaluate(str(f), str(digits_shards.val))["loss"] for name, f in files.items()}
    expected = {"mean": loss_on("mean"), "old": loss_on("standard")}
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(expected["mean"] - expected["old"]) > 0.1                # the two inputs really differ
