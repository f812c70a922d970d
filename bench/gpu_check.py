"""GPU check: the vLLM generate backend on a real GPU, against transformers on the same model.

Run wherever a GPU and vLLM (`pip install .[vllm]`) are present; elsewhere it says why and exits
0. It saves a small Llama-style teacher made here (no downloads), answers the same prompts with
both backends (greedy) and compares the responses and the top-k log-probs. Last line: JSON.

    python bench/gpu_check.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        print(json.dumps({"bench": "gpu_check", "skipped": "needs a GPU and the vllm package"}))
        return 0
    from distillation_runtime.demo import (
        ModelSize,
        make_model,
        make_tokenizer,
        sample_examples,
        save_pretrained,
    )
    from distillation_runtime.spec import GenerateSpec
    from distillation_runtime.stages.generate import PromptItem, run

    tokenizer = make_tokenizer()
    items = [PromptItem(e.prompt, "train") for e in sample_examples("addition", 64, seed=0)]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = save_pretrained(
            make_model(tokenizer, ModelSize(hidden=256, layers=4, heads=8, kv_heads=4), 0),
            tokenizer,
            Path(tmp) / "teacher",
        )
        results = {}
        for backend in ("transformers", "vllm"):
            spec = GenerateSpec.model_validate(
                {"backend": backend, "maxNewTokens": 16, "topLogprobs": 5}
            )
            out = run(str(teacher), items, spec, Path(tmp) / backend)
            from distillation_runtime.records import read_parquet

            results[backend] = (out, read_parquet(out.train))
    hf, vl = results["transformers"][1], results["vllm"][1]
    same_tokens = sum(a.response_ids == b.response_ids for a, b in zip(hf, vl, strict=True))
    gaps = [
        abs(x - y)
        for a, b in zip(hf, vl, strict=True)
        if a.response_ids == b.response_ids and a.topk_logprobs and b.topk_logprobs
        for ra, rb in zip(a.topk_logprobs, b.topk_logprobs, strict=True)
        for x, y in zip(ra, rb, strict=True)
    ]
    summary = {
        "bench": "gpu_check",
        "gpu": torch.cuda.get_device_name(0),
        "prompts": len(items),
        "identical_responses": same_tokens,
        "max_logprob_gap": max(gaps) if gaps else None,
        "vllm_seconds": results["vllm"][0].seconds,
        "transformers_seconds": results["transformers"][0].seconds,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
