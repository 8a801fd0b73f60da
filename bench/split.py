"""The cost of the paper's two-column split (trainer/parallel.py) against the single-device model.

One command times training steps (forward, backward, SGD step) of, side by side in the same process:
  single       AlexNet on one device (grouped conv2/4/5), the baseline
  split        split_two_devices(model, [d, d]): the columns run at once (CPU: two threads; one GPU: two streams)
  split-serial the same split with concurrent=False (CPU: one thread; GPU: one stream)
  split-2gpus  with two GPUs present: column c on cuda:c, the paper's layout
and prints each as a ratio of the baseline's step time (>1 = slower). Rounds interleave the variants so
drift (other processes, clocks) hits all of them alike. On CUDA it first checks the split computes the same
function on the GPU: forward in eval mode and every gradient with dropout 0, TF32 off, fp32 tolerance.

    python bench/split.py                                   # CPU, small width (the 2-core dev machine)
    python bench/split.py --device cuda --width 1 --batch 128   # one GPU (bench/gpu_check.sh runs this)

torch only: no DALI or Ray, so it runs on a bare GPU machine.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from anywhere

import torch
import torch.nn.functional as F

from shards.fileio import write_text
from trainer.model import AlexNet
from trainer.parallel import split_two_devices


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):   # a two-GPU split works on both
            torch.cuda.synchronize(index)


def train_step(net, opt, images, labels) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(images), labels.to(images.device)).backward()
    opt.step()


def whole_layer_grads(split) -> dict[str, torch.Tensor]:
    halves: dict[str, list] = {}
    for name, p in split.named_parameters():
        m = re.fullmatch(r"(\w+)\.columns\.(\d)\.(\w+)", name)
        key, column = (f"{m[1]}.{m[3]}", int(m[2])) if m else (name, 0)
        halves.setdefault(key, [None, None])[column] = p.grad.to(split.output_device)
    return {k: torch.cat([h for h in v if h is not None], dim=0) for k, v in halves.items()}


def check_equivalence(devices: list[str], width: float, classes: int, batch: int) -> dict:
    """Forward (eval) and gradients (dropout 0) of the split vs the single-device model on ``devices``.

    In float64: a GPU's fp32 convolutions may round to TF32 or pick other algorithms for a grouped and a
    split convolution (1e-3 apart on an H200), which would hide a real difference; in float64 rounding is
    ~1e-15 and anything above 1e-4 is the split's fault."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        model = AlexNet(num_classes=classes, width=width, dropout=0.0, init="kaiming").to(devices[0])
        split = split_two_devices(model, devices).double()   # split from float32: the same weights, then widened
        model.double()
        images = torch.randn(batch, 3, 224, 224, device=devices[0], dtype=torch.float64)
        labels = torch.randint(0, classes, (batch,), device=devices[0])
        with torch.no_grad():
            out_single, out_split = model.eval()(images), split.eval()(images)
        forward_err = ((out_split - out_single).abs().max() / out_single.abs().max()).item()
        model.train(), split.train()
        for net in (model, split):
            F.cross_entropy(net(images), labels).backward()
        got = whole_layer_grads(split)
        grad_errs = {n: ((got[n] - p.grad).abs().max() / p.grad.abs().max()).item()
                     for n, p in model.named_parameters()}
        worst = max(grad_errs, key=grad_errs.get)
        grad_err = grad_errs[worst]
        ok = forward_err < 1e-4 and grad_err < 1e-4
        return {"check": "equivalence", "devices": devices, "width": width, "batch": batch, "dtype": "float64",
                "forward_rel_err": forward_err, "max_grad_rel_err": grad_err, "worst_grad": worst, "ok": ok}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def time_variants(device: str, width: float, classes: int, batch: int, rounds: int, steps: int,
                  warmup: int) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    base = AlexNet(num_classes=classes, width=width, init="kaiming")
    nets = {"single": base.to(dev),
            "split": split_two_devices(base, [dev, dev], concurrent=True),
            "split-serial": split_two_devices(base, [dev, dev], concurrent=False)}
    if dev.type == "cuda" and torch.cuda.device_count() > 1:
        nets["split-2gpus"] = split_two_devices(base, ["cuda:0", "cuda:1"])   # the paper's layout
    opts = {k: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for k, n in nets.items()}
    images = torch.randn(batch, 3, 224, 224, device=dev)
    labels = torch.randint(0, classes, (batch,), device=dev)
    for name, net in nets.items():
        for _ in range(warmup):
            train_step(net.train(), opts[name], images, labels)
    synchronise(dev)
    times: dict[str, list[float]] = {k: [] for k in nets}
    for r in range(rounds):
        for name, net in nets.items():
            start = time.perf_counter()
            for _ in range(steps):
                train_step(net, opts[name], images, labels)
            synchronise(dev)
            times[name].append((time.perf_counter() - start) / steps)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()),
              file=sys.stderr, flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"check": "step_time", "device": str(dev), "width": width, "batch": batch,
            "torch_threads": torch.get_num_threads(), "median_step_ms": {k: v * 1e3 for k, v in median.items()},
            "ratio_vs_single": {k: v / median["single"] for k, v in median.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (uses cuda:0, and cuda:1 if present)")
    parser.add_argument("--width", type=float, default=None, help="AlexNet width (default 0.25 on CPU, 1 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 16 on CPU, 128 on CUDA)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (JSON lines)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("bench/split.py: --device cuda asked for but torch sees no GPU; use --device cpu", file=sys.stderr)
        return 2
    width = args.width if args.width is not None else (1.0 if cuda else 0.25)
    batch = args.batch if args.batch is not None else (128 if cuda else 16)
    steps = args.steps if args.steps is not None else (20 if cuda else 3)
    results = []
    if cuda:
        device = "cuda:0"
        pairs = [["cuda:0", "cuda:0"]] + ([["cuda:0", "cuda:1"]] if torch.cuda.device_count() > 1 else [])
        for pair in pairs:
            results.append(check_equivalence(pair, width, args.classes, batch=8))
            print(json.dumps(results[-1]), flush=True)
    else:
        device = "cpu"
        results.append(check_equivalence(["cpu", "cpu"], 0.125, 10, batch=2))
        print(json.dumps(results[-1]), flush=True)
    print(f"timing train steps on {device}: width {width}, batch {batch}, {args.rounds} rounds x {steps} steps",
          file=sys.stderr, flush=True)
    results.append(time_variants(device, width, args.classes, batch, args.rounds, steps, warmup=2 if not cuda else 5))
    print(json.dumps(results[-1]), flush=True)
    timing = results[-1]
    print(f"\nsplit overhead on {device} (width {width}, batch {batch}, {timing['torch_threads']} torch threads):")
    for name, ratio in timing["ratio_vs_single"].items():
        print(f"  {name:13s} {timing['median_step_ms'][name]:9.1f} ms/step   {ratio:5.2f} x single")
    if args.json:
        write_text(args.json, "".join(json.dumps(r) + "\n" for r in results))
    return 0 if all(r.get("ok", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
