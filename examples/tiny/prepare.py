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

from distillation_runtime.demo import (
    ModelSize,
    gold_records,
    make_model,
    make_tokenizer,
    sample_examples,
    save_pretrained,
    train_on_records,
)

HERE = Path(__file__).resolve().parent
TEACHER = ModelSize(hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2)
STUDENT = ModelSize(hidden=96, intermediate=224, layers=2, heads=4, kv_heads=2)


def main(work: Path = HERE / "work", teacher_steps: int = 3000) -> int:
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    if not (work / "teacher" / "config.json").exists():
        gold = gold_records(tokenizer, sample_examples("addition", 3000, seed=0))
        with tempfile.TemporaryDirectory() as tmp:
            start = save_pretrained(
                make_model(tokenizer, TEACHER, seed=0), tokenizer, Path(tmp) / "init"
            )
            trained = train_on_records(gold, start, Path(tmp), teacher_steps)
            save_pretrained(
                AutoModelForCausalLM.from_pretrained(trained), tokenizer, work / "teacher"
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
