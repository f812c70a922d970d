"""The generate stage's records on disk: compact, and read back exactly."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distillation_runtime.records import Record, read_parquet, write_parquet


def records(largest_id: int) -> list[Record]:
    return [
        Record(
            prompt="2+2=",
            response="4",
            prompt_ids=[1, 2, 3],
            response_ids=[largest_id, 7],
            topk_ids=[[largest_id, 5, 6], [7, 8, 9]],
            topk_logprobs=[[-0.01, -4.5, -7.25], [-0.5, -1.0, -2.0]],
            reference="4",
            finish_reason="stop",
        )
    ]


@pytest.mark.parametrize(("largest_id", "stored"), [(49_151, "uint16"), (128_255, "int32")])
def test_ids_take_the_narrowest_type_and_read_back_equal(
    tmp_path: Path, largest_id: int, stored: str
) -> None:
    path = tmp_path / "train.parquet"
    written = records(largest_id)
    write_parquet(written, path)
    schema = pq.read_schema(path)
    # a SmolLM2-sized vocabulary (49,152) in 16 bits; Llama 3's 128,256 needs 32
    assert str(schema.field("topk_ids").type.value_type.value_type) == stored
    assert str(schema.field("response_ids").type.value_type) == stored
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    (back,) = read_parquet(path)
    assert back.topk_ids == written[0].topk_ids
    assert back.response_ids == written[0].response_ids
    assert back.prompt_ids == written[0].prompt_ids
    assert back.reference == "4"
    assert back.finish_reason == "stop"
    # float16 log-probs: relative error below 0.1%
    for got, want in zip(back.topk_logprobs or [], written[0].topk_logprobs or [], strict=True):
        assert got == pytest.approx(want, rel=1e-3)
