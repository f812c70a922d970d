"""Peak memory per worker and step time of training with train.strategy ddp against fsdp.

The same student (a Llama-style model of about 50M parameters, big enough that its weights,
gradients and AdamW state dominate: ~800 MB for ddp) trains a few steps on records a tiny
teacher generated here, with 1 and 2 workers (``--workers 1 2 4`` where the machine has the
cores). Each worker is a plain torch.distributed process (gloo on CPU, NCCL on GPUs), launched
the way Ray Train launches them, running the train stage's own ``setup`` and ``train_step``
(the final checkpoint and model are not written: they are not what sharding changes). The
global batch is the same in every run (``--batch`` records per step, split over the workers).

Peak memory, per worker:

- CPU: the kernel's resident-set high-water mark (``VmHWM``, reset with ``/proc/self/clear_refs``
  once torch is imported and the process group is up), minus the resident size at that moment:
  what setup (loading the student, sharding) and the steps add. Where the mark cannot be reset,
  ``ru_maxrss`` minus the same baseline. The workers run with ``MALLOC_MMAP_THRESHOLD_=65536``
  (unless set): glibc then returns freed large buffers to the kernel, so the resident size
  follows what torch holds. Without it, glibc's sliding threshold keeps the buffers FSDP frees
  (the student's full weights after sharding, each layer's gathered weights) in its heap, and
  the kernel's figure counts them as if they were in use. The resident size also counts pages
  of the student's safetensors file that transformers maps (file-backed, the same for both
  strategies, dropped by the kernel under pressure), so a second figure, ``anon``, is the peak
  of anonymous memory alone (``RssAnon``, sampled every 5 ms, above the same moment's).
- GPU: ``torch.cuda.max_memory_allocated``.

The step time is the median over the steps after the first, of the slowest worker.

    python bench/train_memory.py                 # 1 and 2 workers, 6 steps
    python bench/train_memory.py --workers 1 2 4

The last line is JSON: ``memory_ratio_2`` (fsdp / ddp per-worker peak at 2 workers, the largest
worker; goal <= 0.6), ``memory_ratio_4`` (goal <= 0.35) where 4 ran, ``anon_ratio_N`` the same
for anonymous memory (CPU), ``time_ratio_2`` (fsdp / ddp step time at 2 workers; goal <= 1.3)
and the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class _AnonPeak:
    """The peak of anonymous resident memory above its value at the start, sampled every 5 ms."""

    def __init__(self) -> None:
        self.start = self.peak = _status_kib("RssAnon") * 1024
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _status_kib("RssAnon") * 1024)
            time.sleep(0.005)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak - self.start


def worker(job_json: str) -> None:
    """One rank: setup and the steps, then its peak memory and step times as one JSON line."""
    import torch
    import torch.distributed as dist

    from distillation_runtime.stages import train

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    baseline = _status_kib("VmRSS") * 1024
    anon = _AnonPeak()
    state = train.setup(train.TrainJob.model_validate_json(job_json))
    times = []
    while state.step < state.total:
        started = time.perf_counter()
        train.train_step(state)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if gpu:
        peak = torch.cuda.max_memory_allocated()
    elif resettable:
        peak = _status_kib("VmHWM") * 1024 - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    line = {
        "rank": state.rank,
        "strategy": state.strategy.value,
        "peak": peak,
        "anon": anon.stop(),
        "times": times,
    }
    print("RESULT " + json.dumps(line), flush=True)
    dist.destroy_process_group()


def prepare(root: Path, hidden: int, layers: int, records: int) -> int:
    """The student, and records with top-8 log-probs from a tiny teacher. Returns the student's
    parameter count."""
    from distillation_runtime.demo import (
        ModelSize,
        make_model,
        make_tokenizer,
        parameter_count,
        sample_examples,
        save_pretrained,
    )
    from distillation_runtime.generation import SamplingConfig, generate
    from distillation_runtime.records import write_parquet

    tokenizer = make_tokenizer()
    teacher = make_model(tokenizer, ModelSize(hidden=64, intermediate=128, layers=2), seed=1)
    size = ModelSize(hidden=hidden, intermediate=3 * hidden, layers=layers, heads=8, kv_heads=4)
    student = make_model(tokenizer, size, seed=2)
    save_pretrained(student, tokenizer, root / "student")
    prompts = [e.prompt for e in sample_examples("addition", records, seed=0)]
    answers = generate(
        teacher, tokenizer, prompts, SamplingConfig(max_new_tokens=16, top_logprobs=8)
    )
    write_parquet(answers, root / "data.parquet")
    return parameter_count(student)


def measure(
    root: Path, workers: int, strategy: str, batch: int, steps: int, threads: int
) -> dict[str, Any]:
    """One run of ``workers`` ranks: the largest worker's peak and the median step time."""
    from distillation_runtime.spec import TrainSpec
    from distillation_runtime.stages.train import TrainJob

    spec = {
        "losses": {"response": "1.0", "logits": {"weight": "0.5", "temperature": "2.0"}},
        "batchSize": batch // workers,
        "learningRate": "1e-4",
        "warmupRatio": "0",
        "precision": "auto",
        "workers": workers,
        "strategy": strategy,
    }
    job = TrainJob(
        student=str(root / "student"),
        data=str(root / "data.parquet"),
        output=str(root / f"out-{strategy}-{workers}"),
        train=TrainSpec.model_validate(spec),
        max_steps=steps,
        checkpoint_every=10**6,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(workers),
        "OMP_NUM_THREADS": str(threads),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"),
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", job.model_dump_json()],
            env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(workers)
    ]
    results = []
    for process in ranks:
        out, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"a worker failed ({process.returncode}):\n{err[-3000:]}")
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    per_step = [max(r["times"][i] for r in results) for i in range(len(results[0]["times"]))]
    return {
        "workers": workers,
        "strategy": strategy,
        "chosen": results[0]["strategy"],
        "peak_mib": round(max(r["peak"] for r in results) / MiB, 1),
        "anon_mib": round(max(r["anon"] for r in results) / MiB, 1),
        "step_s": round(statistics.median(per_step[1:] or per_step), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8, help="records per step, all workers")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import torch

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parameters = prepare(root, args.hidden, args.layers, records=args.batch * args.steps)
        runs = []
        for workers in args.workers:
            threads = max(1, cpus // workers)
            for strategy in ["ddp"] if workers == 1 else ["ddp", "fsdp"]:
                runs.append(measure(root, workers, strategy, args.batch, args.steps, threads))
                print(f"  ran {runs[-1]}", file=sys.stderr)
    print(f"student: {parameters:,} parameters; global batch {args.batch}; {args.steps} steps")
    print(f"{'workers':>7} {'strategy':>8} {'peak/worker MiB':>16} {'anon MiB':>9} {'step s':>8}")
    for r in runs:
        print(
            f"{r['workers']:>7} {r['chosen']:>8} {r['peak_mib']:>16} {r['anon_mib']:>9} "
            f"{r['step_s']:>8}"
        )
    by = {(r["workers"], r["chosen"]): r for r in runs}
    summary: dict[str, Any] = {}
    for workers in args.workers:
        ddp, fsdp = by.get((workers, "ddp")), by.get((workers, "fsdp"))
        if ddp and fsdp:
            summary[f"memory_ratio_{workers}"] = round(fsdp["peak_mib"] / ddp["peak_mib"], 3)
            summary[f"anon_ratio_{workers}"] = round(fsdp["anon_mib"] / ddp["anon_mib"], 3)
            summary[f"time_ratio_{workers}"] = round(fsdp["step_s"] / ddp["step_s"], 3)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine = {"cpus": cpus, "gpu": gpu, "platform": platform.platform()}
    print(json.dumps(summary | {"parameters": parameters, "runs": runs, "machine": machine}))


if __name__ == "__main__":
    main()
