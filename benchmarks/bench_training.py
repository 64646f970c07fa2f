"""Training and inference throughput of the SDL bundle against a naive paper-style PyTorch loop, in one run.

TRAINING, both loops on the paper's batch: 8 pairs (16 slices) of 128 px, two AlexNet branches with 1024-wide
features, a synergic head 2048 -> 512 -> 1, lambda 3, SGD lr 1e-4 momentum 0.9; AMP on CUDA only.

* OURS is the bundle's own wiring: ``train.yaml`` + ``paper.yaml`` parsed by MONAI's ``ConfigParser`` with the
  overrides ``datalist`` (JSON of a generated demo DICOM tree indexed by ``build_datalist``), ``pretrained:
  false``, ``momentum: 0.9``, ``seed: 0``, ``epochs: 1``, a ``val_interval`` never reached, ``num_workers:
  --workers`` (train.yaml: 2), ``bundle_root``/``ckpt_dir``/``log_dir`` in a temp folder, the dataset's
  ``num_groups`` (pairs per epoch) enough for the longest round, and
  ``fold_pooling``/``channels_last`` (train.yaml: true; off with ``--no-fold``/``--no-channels-last``).
  ``train#trainer`` runs as built, with every train.yaml handler and metric and MONAI's decollation of each
  output. A step: DataLoader workers rotate cached slices (``CacheDataset`` loads, scales and resizes once, at
  build time, untimed); ``SDLTrainer`` runs both branches and the head, steps SGD; the handlers run. A round is
  one ``trainer.run()`` ended by ``engine.terminate()``, so no epoch completes: no validation, LR step or
  checkpoint (``run training``'s resume checkpointer is not attached).
* NAIVE, written plainly here: two torchvision AlexNets (unfolded, contiguous) whose 1000-way layer becomes
  Linear(4096, 1024) + ReLU (the features f), then dropout + Linear(1024, 3); the head reads
  ``scale_gradient(f, 3)`` of both branches; loss ``ce_a + ce_b + bce``. Every step draws 2 x 8 random slices,
  decodes each DICOM with pydicom (min/max scaling, antialiased resize to 128 px, 3 channels) and rotates each
  image by a random +-10 degrees (affine_grid/grid_sample); no cache, no workers.

Timed, after ``--warmup`` untimed iterations in the first round (later rounds: one for OURS' DataLoader start-up,
none for NAIVE): OURS from the end of the last warm-up iteration to the end of the last one (Ignite
``ITERATION_COMPLETED``, after its handlers), NAIVE from the start of the data step to ``loss.item()`` after
``optimizer.step()``. OURS draws pairs from the training split, NAIVE slices from the whole datalist. ``--rounds``
alternate in ABBA order (ours, naive, naive, ours, ...) so load drift hits both. Printed: pairs/s, ms/step and
the ratio ours/naive (target >= 1.5x).

ENGINE OVERHEAD over OURS' timed iterations: Ignite's ``BasicTimeProfiler`` splits an iteration into dataflow
(getting the batch), processing (``_iteration``, including the handlers MONAI fires inside it, decollation at
MODEL_COMPLETED among them) and event handlers (ITERATION_*/GET_BATCH_* events: metrics, TensorBoard, progress
bar); the handlers' share of a step has the target <= 5 %. ``HandlersTimeProfiler`` times each handler.

INFERENCE (unless ``--skip-inference``): ``inference.yaml``'s ``SDLEvaluator`` (folded unless ``--no-fold``; no
checkpoint or writers; in-memory batches of ``--infer-batch`` random images, so no DICOM decoding) for one branch
(``num_branches: 1``) and the 2-branch ensemble, contiguous and channels_last: images/s through
``evaluator.run()`` and through the bare network. ``--profile`` adds a per-step split data / forward+loss /
backward / optimizer / rest (OURS: decollation and handlers) for both loops, synchronising CUDA at each boundary.

    python benchmarks/bench_training.py [--iterations 32] [--warmup 3] [--rounds 4] [--workers 2] [--threads N]
        [--no-fold] [--no-channels-last] [--fused-sgd] [--device cuda] [--profile] [--skip-inference]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
sys.path[:0] = [str(BUNDLE), str(Path(__file__).resolve().parent)]  # scripts.*, and engine_overhead beside this
# holoscan (MONAI Deploy, when installed) warns about the stack size at `import monai`, as pyproject.toml notes
warnings.filterwarnings("ignore", "Current stack size", RuntimeWarning)

from engine_overhead import EngineOverhead  # noqa: E402
from ignite.engine import Events  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.data import DataLoader  # noqa: E402
from monai.engines.utils import IterationEvents  # noqa: E402
from monai.utils import set_determinism  # noqa: E402
from scripts.demo_data import generate_demo_dataset  # noqa: E402
from scripts.dicom_index import build_datalist  # noqa: E402
from scripts.network import scale_gradient  # noqa: E402

CONFIGS = BUNDLE / "configs"
LR, MOMENTUM, LAMBDA, HIDDEN, CLASSES = 1e-4, 0.9, 3.0, 1024, 3
PHASES = ("data", "fwd+loss", "backward", "optimizer", "rest")
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine(device: torch.device) -> str:
    cpu: dict[str, str] = {}
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            cpu.setdefault(key.strip(), value.strip())
    flags = cpu.get("flags", "").split()
    have = {k: any(f == k or (k == "amx" and f.startswith("amx_")) for f in flags) for k in SPEED_FLAGS}
    text = (
        f"cpu: {cpu.get('model name', 'unknown')}, {os.cpu_count()} logical cpus; "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in have.items())
        + f"; torch uses {torch.backends.cpu.get_cpu_capability()}\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
    )
    return text + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")


def demo_datalist(tmp: Path, args: argparse.Namespace) -> tuple[Path, list[dict]]:
    size = (args.dicom_size, args.dicom_size)
    demo = generate_demo_dataset(
        tmp / "demo", n_patients_per_grade=args.patients_per_grade, slices_per_series=args.slices, image_size=size
    )
    records, _ = build_datalist(demo["dicom_dir"], demo["grades_csv"], workers=1)
    path = tmp / "datalist.json"
    path.write_text(json.dumps(records, default=str))
    return path, records


# ----------------------------------------------------------------------------------------------------- OURS


class Ours:
    """``train#trainer`` of train.yaml + paper.yaml, run a few iterations per round under Ignite's profilers."""

    def __init__(self, args: argparse.Namespace, device: torch.device, datalist: Path, tmp: Path) -> None:
        longest = args.warmup + math.ceil(args.iterations / args.rounds)
        overrides = {
            "datalist": str(datalist), "pretrained": False, "momentum": MOMENTUM, "seed": 0, "epochs": 1,
            "val_interval": 10**9, "num_workers": args.workers, "bundle_root": str(tmp),
            "ckpt_dir": str(tmp / "models"), "log_dir": str(tmp / "logs"), "output_dir": str(tmp / "eval"),
            "device": device, "amp": device.type == "cuda", "batch_size": args.batch_pairs,
            "image_size": args.image_size, "fold_pooling": not args.no_fold, "channels_last": not args.no_channels_last,
        }  # fmt: skip
        if args.fused_sgd:
            overrides["optimizer#fused"] = True
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "paper.yaml")])
        parser.update(overrides)
        parser["train#dataset#num_groups"] = args.batch_pairs * longest  # pairs per epoch: enough for the longest round
        set_determinism(seed=0)  # as `run training` does before it builds the trainer
        t0 = time.perf_counter()
        self.trainer = trainer = parser.get_parsed_content("train#trainer")
        self.build_seconds = time.perf_counter() - t0
        self.slices = len(parser.get_parsed_content("train#dataset").base_dataset)
        self.overhead = EngineOverhead(trainer, exclude=("Ours.",))

        # phase marks for --profile; on CUDA the step is always synchronised at MODEL_COMPLETED (before
        # decollation), so that the profilers count its GPU work as processing, not as the next handler's time
        self.device, self.marks, cuda = device, {}, device.type == "cuda"
        for event, name, sync_now, first in (
            (Events.GET_BATCH_STARTED, "get", False, True),
            (Events.GET_BATCH_COMPLETED, "got", args.profile and cuda, False),
            (IterationEvents.LOSS_COMPLETED, "loss", args.profile and cuda, False),
            (IterationEvents.BACKWARD_COMPLETED, "bwd", args.profile and cuda, False),
            (IterationEvents.MODEL_COMPLETED, "model", cuda, True),
        ):
            handlers = trainer._event_handlers[event]
            handlers.insert(0 if first else len(handlers), (self._mark, (trainer, name, sync_now), {}))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        self.seconds, self.steps = 0.0, 0
        self.split: dict[str, float] = defaultdict(float)

    def _mark(self, engine, name: str, sync_now: bool) -> None:
        if sync_now:
            sync(self.device)
        self.marks[name] = time.perf_counter()

    def _iteration_completed(self, engine) -> None:
        self.stamps.append(now := time.perf_counter())
        it = engine.state.iteration
        if it == self.warm:
            self.overhead.start()
        if it > self.warm:
            m, bounds = {**self.marks, "end": now}, ("get", "got", "loss", "bwd", "model", "end")
            for k, a, b in zip(PHASES, bounds[:-1], bounds[1:], strict=True):
                self.split[k] += m[b] - m[a]
        if it == self.warm + self.iters:
            self.overhead.stop()
            engine.terminate()

    def run(self, iters: int, warm: int) -> None:
        self.iters, self.warm, self.stamps = iters, warm, []
        self.trainer.run()
        if len(self.stamps) != warm + iters:
            raise RuntimeError(f"trainer ran {len(self.stamps)} iterations, expected {warm + iters}")
        self.seconds += self.stamps[-1] - self.stamps[warm - 1]
        self.steps += iters
        self.overhead.collect(warm, iters)
        self.loss = float(self.trainer.state.output[0]["loss"])


# ---------------------------------------------------------------------------------------------------- NAIVE


class NaiveSDL(nn.Module):
    """Two plain torchvision AlexNets with the SDL classifier shape, and a synergic head on their features."""

    def __init__(self) -> None:
        super().__init__()
        self.backbones, self.classifiers = nn.ModuleList(), nn.ModuleList()
        for _ in range(2):
            alexnet = torchvision.models.alexnet(weights=None)
            alexnet.classifier[-1] = nn.Sequential(nn.Linear(4096, HIDDEN), nn.ReLU(inplace=True))  # features f
            self.backbones.append(alexnet)
            self.classifiers.append(nn.Sequential(nn.Dropout(0.5), nn.Linear(HIDDEN, CLASSES)))
        self.head = nn.Sequential(nn.Linear(2 * HIDDEN, 512), nn.ReLU(inplace=True), nn.Linear(512, 1))

    def forward(self, xa: torch.Tensor, xb: torch.Tensor):
        fa, fb = self.backbones[0](xa), self.backbones[1](xb)
        # the branches get lambda x the synergic gradient, the head the plain one
        fused = torch.cat([scale_gradient(fa, LAMBDA), scale_gradient(fb, LAMBDA)], 1)
        return self.classifiers[0](fa), self.classifiers[1](fb), self.head(fused).squeeze(1)


def naive_load(path: str, size: int) -> torch.Tensor:
    """pydicom decode -> float -> min/max to 0..1 -> antialiased bilinear resize -> 3 channels, every call."""
    ds = pydicom.dcmread(path)
    slope, intercept = float(getattr(ds, "RescaleSlope", 1)), float(getattr(ds, "RescaleIntercept", 0))
    t = torch.from_numpy(ds.pixel_array.astype(np.float32) * slope + intercept)
    t = (t - t.min()) / (t.max() - t.min() + 1e-8)
    t = F.interpolate(t[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return t.repeat(3, 1, 1)


def naive_rotate(batch: torch.Tensor, max_degrees: float = 10.0) -> torch.Tensor:
    """Rotate each image by a random angle in +-max_degrees (affine_grid + grid_sample, border padding)."""
    angles = (torch.rand(batch.shape[0]) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.zeros(batch.shape[0], 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Naive:
    def __init__(self, records: list[dict], args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.paths = [r["image"] for r in records]
        self.labels = [int(r["label"]) for r in records]
        self.rng = random.Random(0)
        torch.manual_seed(0)
        self.net = NaiveSDL().to(device)
        fused = {"fused": True} if args.fused_sgd else {}
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM, **fused)
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.seconds, self.steps = 0.0, 0
        self.split: dict[str, float] = defaultdict(float)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [self.rng.randrange(len(self.paths)) for _ in range(self.args.batch_pairs)]
        images = naive_rotate(torch.stack([naive_load(self.paths[i], self.args.image_size) for i in idx]))
        return images.to(self.device), torch.tensor([self.labels[i] for i in idx], device=self.device)

    def step(self, timed: bool) -> None:
        dev, stamps = self.device, [time.perf_counter()]

        def lap() -> None:
            if self.args.profile:
                sync(dev)
            stamps.append(time.perf_counter())

        (xa, ya), (xb, yb) = self.batch(), self.batch()
        lap()
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            la, lb, ls = self.net(xa, xb)
            same = (ya == yb).to(ls.dtype)
            loss = F.cross_entropy(la, ya) + F.cross_entropy(lb, yb) + F.binary_cross_entropy_with_logits(ls, same)
        lap()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        lap()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.loss = loss.item()  # also synchronises
        sync(dev)
        stamps += [time.perf_counter()] * 2  # "rest" is empty
        if timed:
            self.seconds += stamps[-1] - stamps[0]
            self.steps += 1
            for k, a, b in zip(PHASES, stamps[:-1], stamps[1:], strict=True):
                self.split[k] += b - a

    def run(self, iters: int, warm: int) -> None:
        for i in range(warm + iters):
            self.step(timed=i >= warm)


# ----------------------------------------------------------------------------------------------- inference


def bench_inference(args: argparse.Namespace, device: torch.device, tmp: Path) -> list[tuple[str, float, float]]:
    """(label, bare network images/s, evaluator images/s) for 1 and 2 branches, contiguous and channels_last."""
    cuda, size, warm, iters = device.type == "cuda", args.image_size, args.infer_warmup, args.infer_iters
    images = torch.rand(args.infer_batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    items = [{"image": image} for image in images] * (warm + iters)  # the same batch, warm + iters times
    rows = []
    for branches in (1, 2):
        for channels_last in (False, True):
            parser = ConfigParser()
            parser.read_config(str(CONFIGS / "inference.yaml"))
            parser.update({
                "device": device, "amp": cuda, "channels_last": channels_last, "num_branches": branches,
                "fold_pooling": not args.no_fold, "image_size": size, "output_dir": str(tmp / "inference"),
                "handlers": [],  # no checkpoint to load, no prediction files to write
                "dataloader": DataLoader(items, batch_size=args.infer_batch, shuffle=False, num_workers=0),
            })  # fmt: skip
            set_determinism(seed=0)
            evaluator = parser.get_parsed_content("evaluator")
            stamps: list[float] = []
            evaluator.add_event_handler(
                Events.ITERATION_COMPLETED, lambda _, s=stamps: (sync(device), s.append(time.perf_counter()))
            )
            evaluator.run()
            engine_ips = iters * args.infer_batch / (stamps[-1] - stamps[warm - 1])

            net, x = evaluator.network, images.to(device).contiguous(memory_format=evaluator.memory_format)
            with torch.inference_mode(), torch.autocast(device.type, enabled=cuda):
                for i in range(warm + iters):
                    if i == warm:
                        sync(device)
                        t0 = time.perf_counter()
                    net.branch_probabilities(x)
                sync(device)
            bare_ips = iters * args.infer_batch / (time.perf_counter() - t0)
            name = "one branch" if branches == 1 else "SDL ensemble (2 branches)"
            rows.append((f"{name}, {'channels_last' if channels_last else 'contiguous'}", bare_ips, engine_ips))
            del evaluator, net, parser
    return rows


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, text in (
        ("--iterations", 32, "timed training iterations per loop (all rounds)"),
        ("--warmup", 3, "untimed iterations before timing (first round)"),
        ("--rounds", 4, "interleaved rounds ours/naive (iterations split evenly)"),
        ("--workers", 2, "num_workers of OURS' DataLoader (train.yaml: 2)"),
        ("--threads", 0, "torch.set_num_threads (0: torch's choice)"),
        ("--batch-pairs", 8, "pairs per batch"),
        ("--image-size", 128, "network input, px"),
        ("--patients-per-grade", 6, "demo data"),
        ("--slices", 12, "demo data: slices per series"),
        ("--dicom-size", 160, "demo data: px of the DICOM slices"),
        ("--infer-batch", 32, "inference batch"),
        ("--infer-iters", 10, "timed inference batches"),
        ("--infer-warmup", 3, "untimed inference batches"),
        ("--top-handlers", 12, "handlers listed"),
    ):
        p.add_argument(flag, type=int, default=default, help=text)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-fold", action="store_true", help="fold_pooling: false (OURS and inference)")
    p.add_argument("--no-channels-last", action="store_true", help="channels_last: false for OURS")
    p.add_argument("--fused-sgd", action="store_true", help="SGD(fused=True) in BOTH loops")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--profile", action="store_true", help="print a per-phase time split of both loops")
    args = p.parse_args(argv)
    if args.iterations < args.rounds or args.warmup < 1 or args.infer_warmup < 1:
        p.error("need --iterations >= --rounds, --warmup >= 1 and --infer-warmup >= 1")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(device))
    print(f"load average at start: {load()}")
    tmp = Path(tempfile.mkdtemp(prefix="sdl_bench_"))
    try:
        t0 = time.perf_counter()
        datalist, records = demo_datalist(tmp, args)
        seconds = time.perf_counter() - t0
        print(f"demo data: {len(records)} slices of {args.dicom_size} px, generated and indexed in {seconds:.1f} s")
        ours = Ours(args, device, datalist, tmp)
        naive = Naive(records, args, device)
        print(
            f"ours: train#trainer of train.yaml + paper.yaml built in {ours.build_seconds:.1f} s (caches {ours.slices} "
            f"training slices), fold_pooling {not args.no_fold}, channels_last {not args.no_channels_last}, "
            f"{args.workers} DataLoader workers; naive: unfolded, contiguous, no workers; both: {args.batch_pairs} "
            f"pairs, {args.image_size} px, SGD lr {LR} momentum {MOMENTUM}{' fused' * args.fused_sgd}, AMP {cuda}"
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        per_round = [args.iterations // args.rounds + (r < args.iterations % args.rounds) for r in range(args.rounds)]
        for r, iters in enumerate(per_round):
            for loop in (ours, naive) if r % 2 == 0 else (naive, ours):
                # ours: one untimed iteration per later round for the DataLoader workers' start-up
                loop.run(iters, args.warmup if r == 0 else (1 if loop is ours else 0))
            print(f"  round {r + 1}: {ours.steps} + {naive.steps} timed steps done (load {load()})")

        print(f"\nTRAINING ({args.iterations} timed steps per loop in {args.rounds} ABBA rounds)")
        pps = {}
        for name, loop in (("ours ", ours), ("naive", naive)):
            pps[name] = loop.steps * args.batch_pairs / loop.seconds
            ms = 1000 * loop.seconds / loop.steps
            print(f"  {name}: {pps[name]:7.2f} pairs/s ({ms:7.1f} ms/step, last loss {loop.loss:.3f})")
        print(f"  ratio ours/naive: {pps['ours '] / pps['naive']:.2f}x (target >= 1.5x)")
        print("\nENGINE OVERHEAD of ours (Ignite BasicTimeProfiler, mean per timed iteration)")
        print("\n".join(ours.overhead.report(args.top_handlers)))
        if args.profile:
            print("\nTIME SPLIT per step, ms (ours: data = DataLoader fetch; rest = decollation + handlers)")
            print(f"  {'loop':6s} " + " ".join(f"{k:>10s}" for k in PHASES) + f" {'total':>8s}")
            for name, loop in (("ours", ours), ("naive", naive)):
                vals = [1000 * loop.split[k] / loop.steps for k in PHASES]
                print(f"  {name:6s} " + " ".join(f"{v:10.1f}" for v in vals) + f" {sum(vals):8.1f}")
        train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if cuda:
            try:
                print(f"  cuda utilization (last sample period): {torch.cuda.utilization(device)} %")
            except Exception as e:  # needs pynvml / amdsmi
                print(f"  cuda utilization: not available ({e})")
            print(f"  cuda max_memory_allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
        del ours, naive

        if not args.skip_inference:
            print(
                f"\nINFERENCE (batch {args.infer_batch}, {args.image_size} px, in-memory images; inference.yaml's "
                f"SDLEvaluator, fold_pooling {not args.no_fold}{', AMP' * cuda}), images/s"
            )
            print(f"  {'':40s} {'bare network':>12s} {'evaluator':>10s}   (target one branch >= 200)")
            for label, bare, engine in bench_inference(args, device, tmp):
                print(f"  {label:40s} {bare:12.1f} {engine:10.1f}")

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"\nPEAK RSS, MiB: process {rss:.0f} (after training {train_rss:.0f}), DataLoader workers {workers:.0f}")
        print(f"load average at end: {load()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
