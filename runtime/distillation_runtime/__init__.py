"""The distillation pipeline: what is computed (spec, plan, stages, losses).

Importing this package is cheap on purpose: torch, transformers, ray, vllm and llmcompressor are
imported inside the functions that need them, so the operator can use the spec and the plan
without pulling the ML stack in.
"""

__version__ = "0.1.0"
