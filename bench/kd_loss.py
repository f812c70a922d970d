"""Memory and time of the chunked logit loss against the plain one (materialised logits).

Both variants compute the same thing on the same inputs: response cross-entropy plus logit
distillation (forward KL at T = 2, weights 1.0 and 0.5) against an online teacher (its hidden
states and output layer), forward and backward, gradients w.r.t. the student's last hidden
states and its output layer. Every position counts (mask all True), so the chunked variant
gains nothing from skipping prompt tokens.

Peak memory is measured honestly for each variant in a fresh subprocess:

- CPU: torch's CPU allocations are invisible to tracemalloc, so the worker reads the kernel's
  resident-set high-water mark. It allocates the inputs, resets the mark (``echo 5 >
  /proc/self/clear_refs``), and reports ``VmHWM - VmRSS`` (both from /proc/self/status) around
  each forward+backward: the extra memory the loss needs on top of its inputs, including the
  gradients it produces. Where the mark cannot be reset it falls back to ``ru_maxrss`` minus the
  resident size after the inputs.
- GPU: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step.

The first run of each variant is a warm-up (its peak counts; its time does not); the time is the
median of the next runs. The chunked loss runs many more (smaller) ops than the plain one, and
on a busy machine every multi-threaded op waits for its slowest thread, so other work slows it
more: the output gives the load average, and ``--threads 1`` takes that effect out.

    python bench/kd_loss.py            # N=8192 tokens, H=256, V=32768 (V=131072 on a GPU)
    python bench/kd_loss.py --quick    # N=4096 tokens, V=32768, about a minute on 2 CPUs

Against today's peer: TRL's ``DistillationTrainer`` has a chunked divergence of its own
(``trl.trainer.distillation_trainer._chunked_divergence_loss``; its torch fallback without
Triton). It computes the KD term alone, so a second comparison runs all three on that objective
(forward KL at T = 1, no response term: ``plain-kd``, ``chunked-kd``, ``trl``) on the same
inputs; ``--no-trl`` skips it (and it is skipped, saying so, where TRL is not installed).

The last line is JSON with ``memory_ratio`` (plain peak / chunked peak) and ``time_ratio``
(chunked time / plain time), and for the KD-only comparison ``trl_memory_ratio`` (TRL's peak /
ours) and ``trl_time_ratio`` (our time / TRL's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
KD_ONLY_VARIANTS = ("plain-kd", "chunked-kd", "trl")
"""The comparison with TRL: forward KL at T = 1 and no response term (what TRL's loss is)."""


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class _CpuPeak:
    """Extra resident memory of a block of work, from the kernel's high-water mark."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def start(self) -> None:
        if self.resettable:
            Path("/proc/self/clear_refs").write_text("5")
        self.base_kib = _status_kib("VmRSS")

    def stop(self) -> int:
        if self.resettable:
            peak_kib = _status_kib("VmHWM")
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak_kib - self.base_kib, 0) * 1024


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant a few times in this (fresh) process; return its peak and times."""
    import torch

    from distillation_runtime.losses import (
        LogitLossOptions,
        OnlineTeacher,
        chunked_logit_losses,
        full_logit_losses,
    )
    from distillation_runtime.spec import Divergence

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gen = torch.Generator().manual_seed(0)
    n, h, ht, v = args.tokens, args.hidden, args.teacher_hidden, args.vocab

    def make(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    hidden = make(n, h).requires_grad_()
    head = make(v, h, scale=h**-0.5).requires_grad_()
    teacher = OnlineTeacher(make(n, ht), make(v, ht, scale=ht**-0.5))
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    kd_only = args.worker in KD_ONLY_VARIANTS
    options: dict[str, Any] = {
        "target_ids": targets,
        "mask": mask,
        "teacher": teacher,
        "options": LogitLossOptions(
            response_weight=0.0 if kd_only else 1.0,
            kd_weight=1.0 if kd_only else 0.5,
            divergence=Divergence.FORWARD_KL,
            temperature=1.0 if kd_only else 2.0,
            chunk_size=args.chunk_size,  # only the chunked loss reads it
        ),
    }

    def ours() -> torch.Tensor:
        if args.worker in ("chunked", "chunked-kd"):
            return chunked_logit_losses(hidden, head, **options)["loss"]
        return full_logit_losses(hidden, head, **options)["loss"]

    def trl() -> torch.Tensor:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        # beta 0: TRL's generalized JSD is the forward KL(teacher || student); one sequence
        loss, _entropy, _count = _chunked_divergence_loss(
            hidden.unsqueeze(0),
            teacher.hidden.unsqueeze(0),
            head,
            teacher.head,
            mask.unsqueeze(0).long(),
            beta=0.0,
            temperature=1.0,
        )
        return loss

    def step() -> float:
        hidden.grad = None
        head.grad = None
        out = trl() if args.worker == "trl" else ours()
        torch.autograd.backward(out)
        loss = float(out.detach())
        del out
        return loss

    cpu_peak = _CpuPeak()
    peaks, times, loss = [], [], 0.0
    for _ in range(args.repeats + 1):  # the first run is the warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            cpu_peak.start()
        started = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        peaks.append(torch.cuda.max_memory_allocated() - before if cuda else cpu_peak.stop())
    return {
        "variant": args.worker,
        "peak_bytes": max(peaks),
        "time_s": statistics.median(times[1:]),
        "times_s": [round(t, 4) for t in times],
        "loss": loss,
        "peak_method": "cuda.max_memory_allocated"
        if cuda
        else ("VmHWM reset" if cpu_peak.resettable else "ru_maxrss"),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if cuda else None,
    }


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        variant,
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--teacher-hidden",
        str(args.teacher_hidden),
        "--vocab",
        str(args.vocab),
        "--chunk-size",
        str(args.chunk_size),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {variant} worker failed (exit {done.returncode})")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'variant':<12}{'peak MiB':>12}{'median s':>12}{'runs s':>30}{'loss':>14}")
    for r in rows:
        runs = " ".join(f"{t:.2f}" for t in r["times_s"])
        print(
            f"{r['variant']:<12}{r['peak_bytes'] / MiB:>12.1f}{r['time_s']:>12.3f}"
            f"{runs:>30}{r['loss']:>14.6f}"
        )


def trl_comparison(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print the KD-only rows (plain, ours, TRL's) and return their ratios for the JSON line."""
    plain, ours, trl = (results[v] for v in KD_ONLY_VARIANTS)
    print("against TRL's chunked divergence: forward KL (T=1) alone, same inputs")
    print_rows([plain, ours, trl])
    memory_ratio = trl["peak_bytes"] / max(ours["peak_bytes"], 1)
    time_ratio = ours["time_s"] / trl["time_s"]
    print(f"memory ratio (TRL / ours): {memory_ratio:.1f}x")
    print(f"time ratio (ours / TRL):   {time_ratio:.2f}x")
    return {
        "trl_memory_ratio": round(memory_ratio, 2),
        "trl_time_ratio": round(time_ratio, 3),
        "kd_plain_peak_mib": round(plain["peak_bytes"] / MiB, 1),
        "kd_chunked_peak_mib": round(ours["peak_bytes"] / MiB, 1),
        "trl_peak_mib": round(trl["peak_bytes"] / MiB, 1),
        "kd_plain_time_s": round(plain["time_s"], 4),
        "kd_chunked_time_s": round(ours["time_s"], 4),
        "trl_time_s": round(trl["time_s"], 4),
        "trl_loss_difference": abs(trl["loss"] - ours["loss"]),
        "trl_version": _trl_version(),
    }


def _trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shape, about a minute")
    parser.add_argument("--tokens", type=int, default=None, help="N token positions")
    parser.add_argument("--hidden", type=int, default=256, help="student hidden size H")
    parser.add_argument("--teacher-hidden", type=int, default=384, help="teacher hidden size")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary rows V")
    parser.add_argument("--chunk-size", type=int, default=512, help="token positions per chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--no-trl", action="store_true", help="skip the comparison with TRL")
    parser.add_argument(
        "--worker", choices=["plain", "chunked", *KD_ONLY_VARIANTS], help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch  # only to describe the machine and pick the default shape

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if args.tokens is None:
        args.tokens = 4096 if args.quick else 8192
    if args.vocab is None:
        args.vocab = 131072 if gpu and not args.quick else 32768
    if args.quick:
        args.repeats = min(args.repeats, 2)

    # Other work on the machine slows many-small-op code (the chunked loss) more than
    # few-big-op code: each parallel op waits for its slowest thread. Say how busy it was.
    load_before = os.getloadavg()[0]
    with_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    variants = ["plain", "chunked", *(KD_ONLY_VARIANTS if with_trl else ())]
    results = {variant: run_variant(variant, args) for variant in variants}
    load_after = os.getloadavg()[0]
    plain, chunked = results["plain"], results["chunked"]
    memory_ratio = plain["peak_bytes"] / max(chunked["peak_bytes"], 1)
    time_ratio = chunked["time_s"] / plain["time_s"]
    shape = {
        "tokens": args.tokens,
        "hidden": args.hidden,
        "teacher_hidden": args.teacher_hidden,
        "vocab": args.vocab,
        "chunk_size": args.chunk_size,
    }
    print(
        f"kd_loss: response + forward KL (T=2) vs an online teacher, forward+backward, "
        f"N={args.tokens} H={args.hidden} Ht={args.teacher_hidden} V={args.vocab}, "
        f"chunk {args.chunk_size}, {gpu or f'CPU x{os.cpu_count()}'}, "
        f"{plain['threads']} threads, peak by {plain['peak_method']}, "
        f"load average {load_before:.1f} before / {load_after:.1f} after"
    )
    print_rows([plain, chunked])
    print(f"memory ratio (plain / chunked): {memory_ratio:.1f}x")
    print(f"time ratio (chunked / plain):   {time_ratio:.2f}x")
    against_trl = trl_comparison(results) if with_trl else {}
    if not with_trl:
        why = "--no-trl" if args.no_trl else "trl is not installed (the dev extra has it)"
        print(f"the comparison with TRL's chunked divergence is skipped: {why}")
    summary = {
        "bench": "kd_loss",
        "memory_ratio": round(memory_ratio, 2),
        "time_ratio": round(time_ratio, 3),
        "plain_peak_mib": round(plain["peak_bytes"] / MiB, 1),
        "chunked_peak_mib": round(chunked["peak_bytes"] / MiB, 1),
        "plain_time_s": round(plain["time_s"], 4),
        "chunked_time_s": round(chunked["time_s"], 4),
        "loss_difference": abs(plain["loss"] - chunked["loss"]),
        "shape": shape,
        "quick": args.quick,
        "peak_method": plain["peak_method"],
        "cpus": os.cpu_count(),
        "torch_threads": plain["threads"],
        "gpu": gpu,
        "load_average": [round(load_before, 2), round(load_after, 2)],
        **against_trl,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
