"""The workload's prompts: read from JSONL/Parquet (local or S3), de-duplicated, split by hash."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillation_runtime.data import (
    Prompt,
    in_eval_split,
    load_prompts,
    prompt_key,
)
from distillation_runtime.spec import DatasetSpec

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def spec(prompts: str | Path, **fields) -> DatasetSpec:
    return DatasetSpec.model_validate({"prompts": str(prompts), **fields})


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path: Path, records: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def texts(prompts: list[Prompt]) -> list[str]:
    return [p.text for p in prompts]


def everything(prompt_set) -> list[str]:
    return sorted(texts(prompt_set.train) + texts(prompt_set.eval))


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------


PROMPTS = [f"question {i}: what is {i} + {i * 7 % 13}?" for i in range(2000)]


def test_the_eval_share_is_close_to_the_fraction() -> None:
    for fraction in (0.05, 0.2):
        share = sum(in_eval_split(p, fraction) for p in PROMPTS) / len(PROMPTS)
        assert share == pytest.approx(fraction, abs=0.02)  # 3 standard deviations at 0.2


def test_a_prompt_lands_on_the_same_side_whatever_else_is_in_the_dataset(tmp_path) -> None:
    shuffled = random.Random(0).sample(PROMPTS, len(PROMPTS))
    subset = shuffled[:300]
    runs = [
        load_prompts(spec(write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": p} for p in ps])))
        for name, ps in (("all", PROMPTS), ("shuffled", shuffled), ("subset", subset))
    ]
    evals = [set(texts(r.eval)) for r in runs]
    assert evals[0] == evals[1]
    assert evals[2] == evals[0] & set(subset)
    assert evals[0] == {p for p in PROMPTS if in_eval_split(p, 0.05)}
    assert set(texts(runs[0].train)) == set(PROMPTS) - evals[0]


def test_a_larger_fraction_only_moves_prompts_into_eval() -> None:
    small = {p for p in PROMPTS if in_eval_split(p, 0.05)}
    large = {p for p in PROMPTS if in_eval_split(p, 0.1)}
    assert small < large


def test_keys_are_stable_ids_of_the_text(tmp_path) -> None:
    loaded = load_prompts(spec(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2="}])))
    (prompt,) = loaded.train + loaded.eval
    assert prompt.key == prompt_key("2+2=") == hashlib.sha256(b"2+2=").hexdigest()[:16]
    assert prompt.key != prompt_key("2+3=")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_jsonl_prompts_with_references_and_duplicates(tmp_path) -> None:
    records = [
        {"q": "1+1=", "a": "2"},
        {"q": "2+2=", "a": "4", "other": "ignored"},
        {"q": "1+1=", "a": "two"},  # duplicate text: dropped, first reference kept
        {"q": "3+3=", "a": "6"},
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", records)
    loaded = load_prompts(spec(path, promptField="q", referenceField="a", evalFraction="0.5"))
    assert loaded.duplicates == 1
    assert everything(loaded) == ["1+1=", "2+2=", "3+3="]
    by_text = {p.text: p for p in loaded.train + loaded.eval}
    assert by_text["1+1="].reference == "2"
    assert by_text["3+3="] == Prompt("3+3=", "6", prompt_key("3+3="))
    assert loaded.eval == [p for p in by_text.values() if in_eval_split(p.text, 0.5)]


def test_a_folder_of_shards_is_read_in_sorted_order_and_capped_after_dedup(tmp_path) -> None:
    folder = tmp_path / "prompts"
    write_parquet(folder / "part-01.parquet", [{"prompt": f"p{i}"} for i in (3, 4, 5)])
    write_jsonl(folder / "part-00.jsonl", [{"prompt": f"p{i}"} for i in (0, 1, 1, 2)])
    write_jsonl(folder / "sub" / "part-02.jsonl", [{"prompt": "p6"}])
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-00.jsonl.crc").write_text("junk")
    (folder / "README.md").write_text("not a shard")
    write_jsonl(folder / "_temporary" / "part-00.jsonl", [{"prompt": "half-written"}])

    everything_loaded = load_prompts(spec(folder, evalFraction="0.5"))
    assert everything(everything_loaded) == [f"p{i}" for i in range(7)]
    assert [Path(f).name for f in everything_loaded.files] == [
        "part-00.jsonl",
        "part-01.parquet",
        "part-02.jsonl",
    ]
    assert everything_loaded.duplicates == 1

    capped = load_prompts(spec(folder, evalFraction="0.5", maxPrompts=4))
    assert everything(capped) == ["p0", "p1", "p2", "p3"]  # file order, duplicate not counted
    assert [Path(f).name for f in capped.files] == ["part-00.jsonl", "part-01.parquet"]


def test_a_prefix_names_its_shards(tmp_path) -> None:
    write_jsonl(tmp_path / "prompts-a.jsonl", [{"prompt": "a"}])
    write_jsonl(tmp_path / "prompts-b.jsonl", [{"prompt": "b"}])
    write_jsonl(tmp_path / "other.jsonl", [{"prompt": "other"}])
    assert everything(load_prompts(spec(tmp_path / "prompts-"))) == ["a", "b"]


def test_an_explicit_format_reads_any_extension(tmp_path) -> None:
    path = write_jsonl(tmp_path / "prompts.txt", [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"set dataset\.format to jsonl or parquet"):
        load_prompts(spec(path))
    assert everything(load_prompts(spec(path, format="jsonl"))) == ["x"]


def test_chat_messages_are_rendered_with_the_chat_template(tmp_path) -> None:
    from distillation_runtime.demo import make_tokenizer

    tokenizer = make_tokenizer()
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    records = [{"messages": chat}, {"messages": chat}, {"messages": chat[1:]}]
    path = write_parquet(tmp_path / "chat.parquet", records)
    dataset = spec(path, messagesField="messages")

    with pytest.raises(ValueError, match="no tokenizer was given"):
        load_prompts(dataset)
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        load_prompts(dataset, tokenizer)

    tokenizer.chat_template = CHAT_TEMPLATE
    loaded = load_prompts(dataset, tokenizer)
    assert everything(loaded) == [
        "<system>be brief\n<user>hi\n<assistant>",
        "<user>hi\n<assistant>",
    ]
    assert loaded.duplicates == 1


# --------------------------------------------------------------------------------------------
# Errors name the field, the record and the file
# --------------------------------------------------------------------------------------------


def test_a_record_without_the_prompt_field_is_named(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"text": "c"}])
    with pytest.raises(ValueError, match="line 3: field 'prompt' is missing") as err:
        load_prompts(spec(path))
    assert str(path) in str(err.value)
    assert "dataset.promptField" in str(err.value)


def test_a_record_without_its_reference_is_named(tmp_path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "ref": "A"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match="line 2: field 'ref' is missing"):
        load_prompts(spec(path, referenceField="ref"))


def test_a_parquet_file_without_the_column_names_it_and_its_columns(tmp_path) -> None:
    path = write_parquet(tmp_path / "p.parquet", [{"question": "a"}])
    with pytest.raises(ValueError, match=r"field 'prompt' \(dataset\.promptField\)") as err:
        load_prompts(spec(path))
    assert str(path) in str(err.value)
    assert "question" in str(err.value)


def test_a_null_in_a_parquet_row_is_named_by_row(tmp_path) -> None:
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": "a"}, {"prompt": None}])
    with pytest.raises(ValueError, match="row 2: field 'prompt' is missing"):
        load_prompts(spec(path))


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ("hello", "must be a non-empty list"),
        ([{"role": "user"}], "must be a non-empty list"),
        ([], "must be a non-empty list"),
    ],
)
def test_malformed_messages_are_named(tmp_path, messages, says) -> None:
    from distillation_runtime.demo import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    path = write_jsonl(tmp_path / "chat.jsonl", [{"m": messages}])
    with pytest.raises(ValueError, match=rf"line 1: field 'm' \(dataset\.messagesField\) {says}"):
        load_prompts(spec(path, messagesField="m"), tokenizer)


def test_invalid_json_and_non_objects_are_named(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match="line 3: not valid JSON"):
        load_prompts(spec(path))
    write_jsonl(path, [{"prompt": "a"}, ["not", "an", "object"]])
    with pytest.raises(ValueError, match="line 2: expected a JSON object, got list"):
        load_prompts(spec(path))


def test_a_missing_or_empty_dataset_says_so(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset\.prompts: nothing at"):
        load_prompts(spec(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(spec(tmp_path / "empty.jsonl"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no \.jsonl or \.parquet files .*notes\.txt"):
        load_prompts(spec(tmp_path / "docs"))


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------


def test_prompts_are_read_from_s3_shards(s3_endpoint, monkeypatch, tmp_path) -> None:
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir(bucket)
    shard = write_parquet(tmp_path / "s.parquet", [{"prompt": "p2", "ref": "r2"}])
    fs.put_file(str(shard), f"{bucket}/data/part-1.parquet")
    fs.pipe_file(f"{bucket}/data/part-0.jsonl", b'{"prompt": "p0", "ref": "r0"}\n')
    fs.pipe_file(f"{bucket}/data/_SUCCESS", b"")

    loaded = load_prompts(spec(f"s3://{bucket}/data", referenceField="ref", evalFraction="0.5"))
    prompts = sorted(loaded.train + loaded.eval, key=lambda p: p.text)
    assert [(p.text, p.reference) for p in prompts] == [("p0", "r0"), ("p2", "r2")]
    assert loaded.files == [
        f"s3://{bucket}/data/part-0.jsonl",
        f"s3://{bucket}/data/part-1.parquet",
    ]

    fs.pipe_file(f"{bucket}/data/part-2.jsonl", b'{"ref": "r3"}\n')
    with pytest.raises(
        ValueError, match=rf"s3://{bucket}/data/part-2\.jsonl, line 1: field 'prompt'"
    ):
        load_prompts(spec(f"s3://{bucket}/data/part-"))
    s3fs.S3FileSystem.clear_instance_cache()
