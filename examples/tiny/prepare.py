"""Make what the tiny example needs, here, without downloads: a teacher trained on 2-digit
addition (the quality benchmark's recipe), a smaller untrained student, and prompts.jsonl.

    python examples/tiny/prepare.py            # writes examples/tiny/work/
    distill run examples/tiny/spec.yaml
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from distillation_runtime.records import write_parquet
from distillation_runtime.spec import TrainSpec
from distillation_runtime.stages.train import TrainJob, run
from distillation_runtime.toy import (
    ModelSize,
    gold_records,
    make_model,
    make_tokenizer,
    sample_examples,
    save_pretrained,
)

HERE = Path(__file__).resolve().parent
TEACHER = ModelSize(hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2)
STUDENT = ModelSize(hidden=96, intermediate=224, layers=2, heads=4, kv_heads=2)


def main(work: Path = HERE / "work", teacher_steps: int = 3000) -> int:
    tokenizer = make_tokenizer()
    if not (work / "teacher" / "config.json").exists():
        gold = sample_examples("addition", 3000, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            start = save_pretrained(
                make_model(tokenizer, TEACHER, seed=0), tokenizer, Path(tmp) / "init"
            )
            write_parquet(gold_records(tokenizer, gold), Path(tmp) / "gold.parquet")
            spec = TrainSpec.model_validate(
                {"batchSize": 32, "epochs": 1000, "learningRate": "3e-3", "warmupRatio": "0.05"}
            )
            job = TrainJob(
                student=str(start),
                data=str(Path(tmp) / "gold.parquet"),
                output=str(Path(tmp) / "out"),
                train=spec,
                max_steps=teacher_steps,
                checkpoint_every=teacher_steps,
            )
            trained = run(job, use_ray=False)
            save_pretrained(
                __import__("transformers").AutoModelForCausalLM.from_pretrained(trained),
                tokenizer,
                work / "teacher",
            )
    save_pretrained(make_model(tokenizer, STUDENT, seed=1), tokenizer, work / "student")
    prompts = sample_examples("addition", 2000, seed=1)
    with (work / "prompts.jsonl").open("w") as f:
        for e in prompts:
            f.write(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n")
    print(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
