"""The teacher's answers as training data: one record per (prompt, response), and batches of them.

The generate stage writes these records to Parquet; the train stage reads them back. A record
holds token ids, so training never re-tokenises, and optionally the teacher's top-k log-probs
for every response token (offline logit distillation).

Alignment, the one subtle part: a causal LM at position ``t`` predicts token ``t + 1``. Response
token ``j`` sits at position ``len(prompt) + j``, so it is predicted at position
``len(prompt) + j - 1``, and that is where its target and its top-k go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Record:
    """One teacher answer. ``topk_*`` have one row per response token, or are None."""

    prompt: str
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    reference: str | None = None  # the dataset's expected answer, when it has one
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


UINT16_IDS = 1 << 16
"""Token ids below this fit in 16 bits: every vocabulary up to 65,536 (Llama 3's 128k does not)."""
COMPRESSION = "zstd"


def id_type(records: Sequence[Record]) -> Any:
    """The narrowest Arrow integer that holds every token id of ``records``: uint16 for a
    vocabulary of at most 65,536 tokens (half of int32's bytes), else int32."""
    import pyarrow as pa

    largest = max(
        (
            max(
                (*r.prompt_ids, *r.response_ids, *(i for row in r.topk_ids or [] for i in row)),
                default=0,
            )
            for r in records
        ),
        default=0,
    )
    return pa.uint16() if largest < UINT16_IDS else pa.int32()


def write_parquet(records: Sequence[Record], path: Path) -> None:
    """Write records atomically, compactly: token ids in the narrowest integer that holds them
    (``id_type``), top-k log-probs as float16 (relative error under 0.1%), zstd-compressed
    columns. Readers see plain ints and floats whatever the types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    has_topk = bool(records) and records[0].topk_ids is not None
    ids = id_type(records)
    columns: dict[str, Any] = {
        "prompt": pa.array([r.prompt for r in records], pa.string()),
        "response": pa.array([r.response for r in records], pa.string()),
        "prompt_ids": pa.array([r.prompt_ids for r in records], pa.list_(ids)),
        "response_ids": pa.array([r.response_ids for r in records], pa.list_(ids)),
    }
    if any(r.finish_reason is not None for r in records):
        columns["finish_reason"] = pa.array([r.finish_reason for r in records], pa.string())
    if any(r.reference is not None for r in records):
        columns["reference"] = pa.array([r.reference for r in records], pa.string())
    if has_topk:
        columns["topk_ids"] = pa.array([r.topk_ids for r in records], pa.list_(pa.list_(ids)))
        columns["topk_logprobs"] = pa.array(
            [r.topk_logprobs for r in records], pa.list_(pa.list_(pa.float16()))
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    pq.write_table(pa.table(columns), partial, compression=COMPRESSION)
    partial.replace(path)


def read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pylist()
    return [
        Record(
            prompt=row["prompt"],
            response=row["response"],
            prompt_ids=row["prompt_ids"],
            response_ids=row["response_ids"],
            topk_ids=row.get("topk_ids"),
            topk_logprobs=row.get("topk_logprobs"),
            reference=row.get("reference"),
            finish_reason=row.get("finish_reason"),
        )
        for row in table
    ]


@dataclass
class Batch:
    """Right-padded token batch with per-position targets, shapes in brackets.

    ``input_ids``/``attention_mask`` [B, T]; ``targets`` [B, T] (the token each position must
    predict); ``loss_mask`` [B, T] (True where that token is a response token); ``topk_ids`` and
    ``topk_logprobs`` [B, T, K] aligned the same way (zeros where masked), or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    topk_ids: torch.Tensor | None
    topk_logprobs: torch.Tensor | None

    @property
    def tokens(self) -> int:
        """Response tokens that count in the loss."""
        return int(self.loss_mask.sum())

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.targets.to(device),
            self.loss_mask.to(device),
            self.topk_ids.to(device) if self.topk_ids is not None else None,
            self.topk_logprobs.to(device) if self.topk_logprobs is not None else None,
        )


def collate(
    records: Sequence[Record], pad_id: int, max_length: int, top_k: int | None = None
) -> Batch:
    """Build a training batch: prompt + response, truncated to ``max_length`` tokens."""
    import torch

    sequences = [(r.prompt_ids + r.response_ids)[:max_length] for r in records]
    width = max(len(s) for s in sequences)
    size = (len(records), width)
    input_ids = torch.full(size, pad_id, dtype=torch.long)
    attention = torch.zeros(size, dtype=torch.long)
    targets = torch.full(size, pad_id, dtype=torch.long)
    loss_mask = torch.zeros(size, dtype=torch.bool)
    use_topk = records[0].topk_ids is not None and top_k != 0
    k = 0
    if use_topk:
        stored = len(records[0].topk_ids[0]) if records[0].topk_ids else 0
        k = min(stored, top_k) if top_k else stored
    topk_ids = torch.zeros((*size, k), dtype=torch.long) if use_topk else None
    topk_logprobs = torch.zeros((*size, k), dtype=torch.float32) if use_topk else None
    for row, (record, sequence) in enumerate(zip(records, sequences, strict=True)):
        length = len(sequence)
        input_ids[row, :length] = torch.tensor(sequence)
        attention[row, :length] = 1
        targets[row, : length - 1] = torch.tensor(sequence[1:])
        first = len(record.prompt_ids) - 1  # position predicting response token 0
        last = length - 2  # last position with a target
        if first > last:
            continue
        loss_mask[row, first : last + 1] = True
        if topk_ids is not None and topk_logprobs is not None and record.topk_ids:
            count = last - first + 1
            topk_ids[row, first : last + 1] = torch.tensor(
                [ids[:k] for ids in record.topk_ids[:count]]
            )
            topk_logprobs[row, first : last + 1] = torch.tensor(
                [lp[:k] for lp in (record.topk_logprobs or [])[:count]], dtype=torch.float32
            )
    return Batch(input_ids, attention, targets, loss_mask, topk_ids, topk_logprobs)
