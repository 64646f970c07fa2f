"""Benchmark SDL training throughput (our MONAI pipeline vs a naive PyTorch loop) and inference throughput.

What is measured, for the default model (AlexNet branches, 2 branches, hidden 1024, 128x128, 8 pairs per batch,
SGD lr 1e-4 momentum 0.9 in both loops):

1. OURS: generated demo DICOM tree -> ``build_datalist`` -> ``PairDataset.from_records`` with
   ``training_transforms`` (``CacheDataset`` caches loading/scaling/resizing; only the random rotation runs per
   step) -> MONAI ``DataLoader`` -> the real ``SDLTrainer`` (``trainer.run()``). Cache filling and the first
   ``--warmup`` iterations (DataLoader worker start-up included) are excluded from timing; timing runs from the
   end of the last warm-up iteration to the end of the last iteration (Ignite ``ITERATION_COMPLETED``).
2. NAIVE: a plain PyTorch loop in this file: two torchvision AlexNets with the same replaced classifier
   (4096 -> 1024 ReLU features -> dropout -> 3 logits), a synergic MLP head on the concatenated features, the
   ``ce_a + ce_b + lambda * bce`` loss; every step decodes each DICOM with pydicom, converts, resizes with
   ``torch.nn.functional.interpolate``, repeats to 3 channels and rotates (no caching, no workers).
3. The ratio OURS/NAIVE; the loops run in ``--rounds`` interleaved rounds in ABBA order (ours, naive, naive,
   ours, ...) so a machine whose load changes during the run affects both alike.
4. Inference images/s (batch ``--infer-batch``, eval + ``torch.inference_mode``): one branch, and the full
   ensemble ``forward``, each in contiguous and channels_last memory format.
5. Peak memory: ``ru_maxrss`` of this process (and of DataLoader workers), ``torch.cuda.max_memory_allocated`` on
   CUDA.

``--profile`` prints a time split per step (data / forward+loss / backward / optimizer / rest) for both loops
and a torch.profiler table of the top operators of one OURS step. AMP (``torch.autocast``) is only used on CUDA.
Measured on 2 loaded CPU cores: forward/backward/optimizer cost the same in both loops (same model, same batch),
so the ratio is (naive decode + compute) / (cached batch + compute); channels_last *training* gave no gain there.

    python benchmarks/bench_training.py [--iterations 32] [--warmup 3] [--rounds 4] [--device cpu]
        [--threads 2] [--workers 2] [--fused-sgd] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from ignite.engine import Events  # noqa: E402
from monai.data import DataLoader  # noqa: E402
from monai.engines.utils import IterationEvents  # noqa: E402
from monai.utils import set_determinism  # noqa: E402
from scripts.demo_data import generate_demo_dataset  # noqa: E402
from scripts.dicom_index import build_datalist  # noqa: E402
from scripts.network import SDLNet  # noqa: E402
from scripts.pairs import PairDataset  # noqa: E402
from scripts.trainer import SDLTrainer  # noqa: E402
from scripts.transforms import training_transforms  # noqa: E402

NUM_CLASSES = 3
HIDDEN = 1024
SYNERGIC_HIDDEN = 512
SYNERGIC_LAMBDA = 3.0
LR, MOMENTUM = 1e-4, 0.9
PHASES = ("data", "fwd+loss", "backward", "optimizer", "rest")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_sgd(params, fused: bool) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **({"fused": True} if fused else {}))


def maxrss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # KiB on Linux


# ----------------------------------------------------------------------------------------------------- OURS


class OursRun:
    """The real pipeline: cached PairDataset + MONAI DataLoader + SDLTrainer, on one network/optimizer."""

    def __init__(self, records: list[dict], args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        total_iters = args.warmup + args.iterations + args.rounds  # + one warm-up iteration per later round
        t0 = time.perf_counter()
        self.dataset = PairDataset.from_records(
            records,
            training_transforms(image_size=args.image_size),
            cache=True,
            seed=0,
            num_pairs=max(total_iters * args.batch_pairs, len(records) // 2),
        )
        self.cache_seconds = time.perf_counter() - t0
        torch.manual_seed(0)
        self.net = SDLNet(
            "alexnet", NUM_CLASSES, 2, HIDDEN, synergic_lambda=SYNERGIC_LAMBDA, synergic_hidden=SYNERGIC_HIDDEN
        ).to(device)
        self.optimizer = make_sgd(self.net.parameters(), args.fused_sgd)
        self.split: dict[str, float] = defaultdict(float)
        self.timed_iters = 0
        self.timed_seconds = 0.0

    def run(self, iterations: int, warmup: int) -> None:
        """One ``trainer.run()`` of ``warmup + iterations`` iterations; only the last ``iterations`` are timed."""
        loader = DataLoader(
            self.dataset,
            batch_size=self.args.batch_pairs,
            shuffle=True,
            num_workers=self.args.workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
        )
        trainer = SDLTrainer(
            device=self.device,
            max_epochs=1,
            epoch_length=warmup + iterations,
            train_data_loader=loader,
            network=self.net,
            optimizer=self.optimizer,
            amp=self.device.type == "cuda",
            non_blocking=self.device.type == "cuda",
        )
        stamps: list[float] = []
        marks: dict[str, float] = {}
        device, profile = self.device, self.args.profile
        split = self.split

        def mark(name):
            def _h(engine):
                if profile:
                    sync(device)
                marks[name] = time.perf_counter()

            return _h

        def iteration_done(engine):
            sync(device)
            now = time.perf_counter()
            stamps.append(now)
            if engine.state.iteration > warmup and profile:
                split["data"] += marks["got"] - marks["get"]
                split["fwd+loss"] += marks["loss"] - marks["got"]
                split["backward"] += marks["bwd"] - marks["loss"]
                split["optimizer"] += marks["model"] - marks["bwd"]
                split["rest"] += now - marks["model"]

        trainer.add_event_handler(Events.GET_BATCH_STARTED, mark("get"))
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, mark("got"))
        trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, mark("loss"))
        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, mark("bwd"))
        trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, mark("model"))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration_done)
        trainer.run()
        if len(stamps) != warmup + iterations:
            raise RuntimeError(f"trainer ran {len(stamps)} iterations, expected {warmup + iterations}")
        self.timed_seconds += stamps[-1] - stamps[warmup - 1]
        self.timed_iters += iterations
        self.loss = (
            float(trainer.state.output["loss"])
            if isinstance(trainer.state.output, dict)
            else float(trainer.state.output[0]["loss"])
        )


# ---------------------------------------------------------------------------------------------------- NAIVE


class NaiveSDL(nn.Module):
    """Two plain torchvision AlexNets with the SDLNet classifier shape and a synergic head on concatenated features."""

    def __init__(self) -> None:
        super().__init__()
        self.backbones = nn.ModuleList()
        self.fcs = nn.ModuleList()
        for _ in range(2):
            m = torchvision.models.alexnet(weights=None)
            m.classifier[-1] = nn.Sequential(nn.Linear(4096, HIDDEN), nn.ReLU(inplace=True))  # features
            self.backbones.append(m)
            self.fcs.append(nn.Sequential(nn.Dropout(0.5), nn.Linear(HIDDEN, NUM_CLASSES)))
        self.head = nn.Sequential(
            nn.Linear(2 * HIDDEN, SYNERGIC_HIDDEN), nn.ReLU(inplace=True), nn.Linear(SYNERGIC_HIDDEN, 1)
        )

    def forward(self, xa: torch.Tensor, xb: torch.Tensor):
        fa, fb = self.backbones[0](xa), self.backbones[1](xb)
        return self.fcs[0](fa), self.fcs[1](fb), self.head(torch.cat([fa, fb], 1)).squeeze(1)


def naive_load(path: str, size: int) -> torch.Tensor:
    """pydicom decode -> float -> min/max to 0..1 -> bilinear resize -> 3 channels, every call (no cache)."""
    ds = pydicom.dcmread(path)
    img = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
        getattr(ds, "RescaleIntercept", 0)
    )
    t = torch.from_numpy(img)
    t = (t - t.min()) / (t.max() - t.min() + 1e-8)
    t = F.interpolate(t[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return t.repeat(3, 1, 1)


def naive_rotate(batch: torch.Tensor, max_degrees: float = 10.0) -> torch.Tensor:
    """Random rotation in +-max_degrees per image (affine_grid + grid_sample, border padding)."""
    angles = (torch.rand(batch.shape[0]) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.zeros(batch.shape[0], 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


class NaiveRun:
    def __init__(self, records: list[dict], args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.paths = [r["image"] for r in records]
        self.labels = [int(r["label"]) for r in records]
        self.rng = random.Random(0)
        torch.manual_seed(0)
        self.net = NaiveSDL().to(device)
        self.optimizer = make_sgd(self.net.parameters(), args.fused_sgd)
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.split: dict[str, float] = defaultdict(float)
        self.timed_iters = 0
        self.timed_seconds = 0.0

    def step(self, timed: bool) -> None:
        dev, profile, split = self.device, self.args.profile, self.split
        t0 = time.perf_counter()
        n = len(self.paths)
        idx_a = [self.rng.randrange(n) for _ in range(self.args.batch_pairs)]
        idx_b = [self.rng.randrange(n) for _ in range(self.args.batch_pairs)]
        xa = naive_rotate(torch.stack([naive_load(self.paths[i], self.args.image_size) for i in idx_a]))
        xb = naive_rotate(torch.stack([naive_load(self.paths[i], self.args.image_size) for i in idx_b]))
        ya = torch.tensor([self.labels[i] for i in idx_a])
        yb = torch.tensor([self.labels[i] for i in idx_b])
        xa, xb, ya, yb = (t.to(dev, non_blocking=True) for t in (xa, xb, ya, yb))
        if profile:
            sync(dev)
        t1 = time.perf_counter()
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            la, lb, ls = self.net(xa, xb)
            loss = (
                F.cross_entropy(la, ya)
                + F.cross_entropy(lb, yb)
                + SYNERGIC_LAMBDA * F.binary_cross_entropy_with_logits(ls, (ya == yb).to(ls.dtype))
            )
        if profile:
            sync(dev)
        t2 = time.perf_counter()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if profile:
            sync(dev)
        t3 = time.perf_counter()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.loss = loss.item()  # also synchronises
        sync(dev)
        t4 = time.perf_counter()
        if timed:
            self.timed_seconds += t4 - t0
            self.timed_iters += 1
            if profile:
                for k, v in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, 0.0), strict=True):
                    split[k] += v

    def run(self, iterations: int, warmup: int) -> None:
        for _ in range(warmup):
            self.step(timed=False)
        for _ in range(iterations):
            self.step(timed=True)


# ----------------------------------------------------------------------------------------------- inference


def bench_inference(args: argparse.Namespace, device: torch.device) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    base = SDLNet("alexnet", NUM_CLASSES, 2, HIDDEN, synergic_hidden=SYNERGIC_HIDDEN).to(device).eval()
    x0 = torch.randn(args.infer_batch, 3, args.image_size, args.image_size, device=device)
    results = []
    for channels_last in (False, True):
        net = copy.deepcopy(base)
        x = x0
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            x = x0.contiguous(memory_format=torch.channels_last)
        faces = {"single branch": lambda t, n=net: n.branches[0](t)[0], "ensemble forward": net}
        for name, fn in faces.items():
            with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
                for _ in range(args.infer_warmup):
                    fn(x)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.infer_iters):
                    fn(x)
                sync(device)
                dt = time.perf_counter() - t0
            label = f"{name} ({'channels_last' if channels_last else 'contiguous'})"
            results.append((label, args.infer_iters * args.infer_batch / dt))
    return results


def profile_ours_step(ours: OursRun) -> str:
    """torch.profiler table of one OURS training step (pairs from the cached dataset, real trainer step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ours.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        ours.run(iterations=1, warmup=1)
    key = "self_cuda_time_total" if ours.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=32, help="timed training iterations per loop (all rounds)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up iterations before timing")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds ours/naive (iterations split evenly)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of OURS (train.yaml uses 2)")
    p.add_argument("--batch-pairs", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--patients-per-grade", type=int, default=6)
    p.add_argument("--slices", type=int, default=12)
    p.add_argument("--dicom-size", type=int, default=160)
    p.add_argument("--fused-sgd", action="store_true", help="SGD(fused=True) in BOTH loops")
    p.add_argument("--infer-batch", type=int, default=32)
    p.add_argument("--infer-iters", type=int, default=10)
    p.add_argument("--infer-warmup", type=int, default=3)
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the per-phase time split and a profiler table")
    args = p.parse_args(argv)
    if args.iterations < args.rounds or args.warmup < 1:
        p.error("need --iterations >= --rounds and --warmup >= 1")

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    set_determinism(0)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}, load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"model alexnet x2, hidden {HIDDEN}, {args.image_size}x{args.image_size}, batch {args.batch_pairs} pairs, "
        f"SGD lr {LR} momentum {MOMENTUM}{' fused' if args.fused_sgd else ''}, AMP {device.type == 'cuda'}, "
        f"ours: {args.workers} DataLoader workers"
    )

    tmp = Path(tempfile.mkdtemp(prefix="sdl_bench_"))
    try:
        t0 = time.perf_counter()
        demo = generate_demo_dataset(
            tmp, n_patients_per_grade=args.patients_per_grade, slices_per_series=args.slices,
            image_size=(args.dicom_size, args.dicom_size), seed=0,
        )  # fmt: skip
        records, _ = build_datalist(demo["dicom_dir"], demo["grades_csv"], workers=1)
        print(
            f"demo data: {len(records)} slices ({args.dicom_size}x{args.dicom_size}) generated+indexed in "
            f"{time.perf_counter() - t0:.1f} s"
        )

        ours = OursRun(records, args, device)
        naive = NaiveRun(records, args, device)
        print(f"CacheDataset filled in {ours.cache_seconds:.1f} s (not timed)")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        per_round = [args.iterations // args.rounds + (r < args.iterations % args.rounds) for r in range(args.rounds)]
        for r, iters in enumerate(per_round):
            # later rounds: one untimed iteration absorbs DataLoader start-up / cache effects of the other loop
            warm = args.warmup if r == 0 else 1
            # ABBA order (ours, naive, naive, ours, ...) so a load that drifts during the run hits both loops alike
            for loop in (ours, naive) if r % 2 == 0 else (naive, ours):
                loop.run(iters, warm if loop is ours or r == 0 else 0)
            print(
                f"  round {r + 1}: ours {ours.timed_iters} it, naive {naive.timed_iters} it done "
                f"(load {os.getloadavg()[0]:.2f})"
            )

        ours_pps = ours.timed_iters * args.batch_pairs / ours.timed_seconds
        naive_pps = naive.timed_iters * args.batch_pairs / naive.timed_seconds
        print()
        print(f"TRAINING (data pipeline included, {args.iterations} timed iterations each, {args.rounds} rounds)")
        print(
            f"  ours  (cache + DataLoader + SDLTrainer): {ours_pps:7.2f} pairs/s "
            f"({1000 * ours.timed_seconds / ours.timed_iters:.0f} ms/step)"
        )
        print(
            f"  naive (pydicom every step, plain loop) : {naive_pps:7.2f} pairs/s "
            f"({1000 * naive.timed_seconds / naive.timed_iters:.0f} ms/step)"
        )
        print(f"  ratio ours/naive: {ours_pps / naive_pps:.2f}x (target 1.5x)")
        if args.profile:
            print()
            print("TIME SPLIT per step, ms (data = batch fetch/decode incl. host->device)")
            print(f"  {'loop':6s} " + " ".join(f"{k:>10s}" for k in PHASES) + f" {'total':>8s}")
            for name, run in (("ours", ours), ("naive", naive)):
                vals = [1000 * run.split[k] / run.timed_iters for k in PHASES]
                print(f"  {name:6s} " + " ".join(f"{v:10.1f}" for v in vals) + f" {sum(vals):8.1f}")
        train_rss = maxrss_mb()
        cuda_train = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

        if args.profile:
            print()
            print("torch.profiler, one OURS training step (top operators by self time):")
            print(profile_ours_step(ours))

        if not args.skip_inference:
            del ours, naive
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            print()
            print(
                f"INFERENCE (batch {args.infer_batch}, {args.image_size}x{args.image_size}, eval + inference_mode"
                f"{', autocast' if device.type == 'cuda' else ''}; target single branch >= 200 img/s)"
            )
            for label, ips in bench_inference(args, device):
                print(f"  {label:34s}: {ips:7.1f} images/s")

        print()
        print(
            f"PEAK MEMORY: ru_maxrss process {maxrss_mb():.0f} MiB (after training {train_rss:.0f} MiB), "
            f"DataLoader workers {maxrss_mb(resource.RUSAGE_CHILDREN):.0f} MiB"
        )
        if device.type == "cuda":
            print(
                f"  cuda max_memory_allocated: training {cuda_train:.0f} MiB"
                + (
                    f", inference {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
                    if not args.skip_inference
                    else ""
                )
            )
        load = os.getloadavg()
        print(f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
