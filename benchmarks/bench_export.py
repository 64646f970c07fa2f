"""CPU inference throughput of the exported classifier face: eager PyTorch, ONNX Runtime, the torch.export program.

The default model of inference.yaml (AlexNet x 2, 128 px, hidden 1024, folded pooling) with random weights is
exported by the functions behind ``python -m scripts.export`` into a temporary folder; the ``.onnx`` file runs in
ONNX Runtime (CPUExecutionProvider, as many intra-op threads as torch uses), the ``.pt2`` file is read back with
``torch.export.load`` and its ``.module()`` is run, and the eager ``SDLNet`` runs under ``torch.inference_mode``.
For each batch size the engines take turns for ``--rounds`` rounds (so a change in the machine's load touches
them alike); each turn runs for at least ``--seconds`` after ``--warmup`` calls, and the median of the rounds is
printed as images/s, beside the CPU model (``/proc/cpuinfo``) and the thread counts. The outputs of the three
engines are compared once per batch size (max |diff| of the probabilities).

    python benchmarks/bench_export.py [--batches 1 32] [--rounds 3] [--seconds 3] [--warmup 2] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.export import INPUT_NAME, OUTPUT_NAME, export_program, save_onnx  # noqa: E402
from scripts.network import SDLNet  # noqa: E402

IMAGE_SIZE = 128


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def images_per_second(run: Callable[[], object], batch: int, seconds: float, warmup: int) -> float:
    for _ in range(warmup):
        run()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * batch / elapsed


def bench_export(
    batches: tuple[int, ...] = (1, 32), rounds: int = 3, seconds: float = 3.0, warmup: int = 2
) -> dict[str, dict[int, float]]:
    """images/s per engine and batch size for the default model (see the module doc); prints a table."""
    import onnxruntime

    threads = torch.get_num_threads()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {threads} threads; onnxruntime {onnxruntime.__version__}")
    torch.manual_seed(0)
    net = SDLNet(fold_pooling=True, image_size=IMAGE_SIZE).eval()
    with torch.no_grad():  # a from-scratch net's output layers are zero; weights here only matter for the check
        for branch in net.branches:
            branch.classifier[1].weight.normal_(0.0, 0.05)
    shape = (3, IMAGE_SIZE, IMAGE_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        program = export_program(net, shape)
        pt2, onnx_path = Path(tmp) / "model.pt2", Path(tmp) / "model.onnx"
        torch.export.save(program, pt2)
        save_onnx(program, onnx_path, {})
        print(f"export (torch.export + ONNX conversion + saving): {time.perf_counter() - start:.1f} s")
        loaded = torch.export.load(pt2).module()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    results: dict[str, dict[int, list[float]]] = {"eager": {}, "onnxruntime": {}, "pt2": {}}
    for batch in batches:
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
        x_np = x.numpy()

        def eager(x=x):
            with torch.inference_mode():
                return net(x)

        def ort(x_np=x_np):
            return session.run([OUTPUT_NAME], {INPUT_NAME: x_np})[0]

        def program_module(x=x):
            with torch.inference_mode():
                return loaded(x)

        engines = {"eager": eager, "onnxruntime": ort, "pt2": program_module}
        reference = eager().numpy()
        diffs = {name: float(np.abs(np.asarray(run()) - reference).max()) for name, run in engines.items()}
        print(f"batch {batch}: max |diff| to eager: onnxruntime {diffs['onnxruntime']:.1e}, pt2 {diffs['pt2']:.1e}")
        for round_ in range(rounds):
            order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
            for name in order:
                results[name].setdefault(batch, []).append(images_per_second(engines[name], batch, seconds, warmup))

    medians = {name: {b: statistics.median(v) for b, v in per_batch.items()} for name, per_batch in results.items()}
    print(f"\nimages/s on CPU (median of {rounds} rounds of >= {seconds:g} s; {threads} torch / ORT intra-op threads)")
    print(f"{'engine':<14}" + "".join(f"{f'batch {b}':>12}" for b in batches))
    for name, per_batch in medians.items():
        print(f"{name:<14}" + "".join(f"{per_batch[b]:>12.1f}" for b in batches))
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_export(tuple(args.batches), args.rounds, args.seconds, args.warmup)


if __name__ == "__main__":
    main()
