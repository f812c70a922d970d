"""The workload's prompts: read, rendered, de-duplicated and split into train and eval.

``load_prompts`` reads the dataset the spec names (JSONL or Parquet; one file, a folder or a
prefix of shards, local or on s3) in a fixed order, renders chat messages with the tokenizer's
chat template, drops duplicate prompts and splits by a hash of each prompt's text, so a prompt
lands on the same side of the split whatever else is in the dataset and in whatever order.

Importing it is cheap: pyarrow and fsspec are imported by the functions that read files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distillation_runtime import storage
from distillation_runtime.spec import DatasetFormat, DatasetSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 4096


@dataclass(frozen=True)
class Prompt:
    """One prompt as the model sees it (chat messages already rendered).

    ``key`` is a stable id derived from the text alone, so generated answers, eval results and
    a re-run line up by prompt.
    """

    text: str
    reference: str | None
    key: str


@dataclass(frozen=True)
class PromptSet:
    """The prompts split for training and evaluation; ``duplicates`` counts prompts dropped."""

    train: list[Prompt]
    eval: list[Prompt]
    duplicates: int
    files: list[str] = field(default_factory=list)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_key(text: str) -> str:
    """A stable 64-bit id of a prompt's text (hex)."""
    return _digest(text)[:16]


def in_eval_split(text: str, fraction: float) -> bool:
    """Whether a prompt is held out for evaluation: its hash alone decides, so the answer never
    depends on the other prompts or their order."""
    return int(_digest(text)[:16], 16) / 2**64 < fraction


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _format_of(path: str) -> DatasetFormat | None:
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return DatasetFormat.JSONL
    if name.endswith(PARQUET_SUFFIXES):
        return DatasetFormat.PARQUET
    return None


def _hidden(path: str, root: str) -> bool:
    """Markers and job litter below ``root`` are not shards (``_SUCCESS``, ``.crc``, a writer's
    ``_temporary/`` folder)."""
    relative = path[len(root) :] if path.startswith(root) else path
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _under_prefix(fs: Any, prefix: str) -> list[str]:
    """Files whose path starts with ``prefix``: the parent is listed, only matches descended."""
    parent = prefix.rsplit("/", 1)[0]
    if not parent or parent == prefix or not fs.isdir(parent):
        return []
    found: list[str] = []
    for entry in fs.ls(parent, detail=True):
        name = entry["name"].rstrip("/")
        if name.startswith(prefix):
            found.extend(fs.find(name) if entry["type"] == "directory" else [name])
    return found


def _display(dataset: DatasetSpec, fs: Any, path: str) -> str:
    """A file as the user would write it: a local path, or a URI with its scheme."""
    return path if storage.parse_uri(dataset.prompts).is_local else str(fs.unstrip_protocol(path))


def dataset_files(dataset: DatasetSpec) -> list[tuple[str, DatasetFormat]]:
    """The files ``dataset.prompts`` names, in the order they are read, each with its format.

    A folder is read recursively and a path that is neither file nor folder is taken as a prefix
    of shard names (``s3://bucket/prompts/part-``); either way in sorted order, skipping names
    that start with ``.`` or ``_``. With format auto, shards are recognised by extension.
    """
    fs, path = storage.filesystem(dataset.prompts)
    uri = dataset.prompts
    if fs.isfile(path):
        candidates = [path]
        single = True
    else:
        found = fs.find(path) if fs.isdir(path) else _under_prefix(fs, path)
        root = path if fs.isdir(path) else path.rsplit("/", 1)[0]
        candidates = sorted(p for p in found if not _hidden(p, root))
        single = False
    if not candidates:
        raise FileNotFoundError(
            f"dataset.prompts: nothing at {uri}; point it at a JSONL or Parquet file, or a "
            "folder or prefix of them"
        )
    files: list[tuple[str, DatasetFormat]] = []
    for candidate in candidates:
        fmt = dataset.format if dataset.format is not DatasetFormat.AUTO else _format_of(candidate)
        if fmt is not None:
            files.append((candidate, fmt))
        elif single:
            raise ValueError(
                f"dataset.format is auto but the extension of {uri} is neither "
                f"{', '.join(JSONL_SUFFIXES)} nor {', '.join(PARQUET_SUFFIXES)}; set "
                "dataset.format to jsonl or parquet"
            )
    if not files:
        shown = ", ".join(c.rsplit("/", 1)[-1] for c in candidates[:5])
        raise FileNotFoundError(
            f"dataset.prompts: no .jsonl or .parquet files under {uri} (found {shown}); rename "
            "the shards or set dataset.format to jsonl or parquet"
        )
    return files


def _jsonl_records(fs: Any, path: str, shown: str) -> Generator[tuple[int, Any], None, None]:
    """(line number, parsed JSON) for each non-blank line; errors name ``shown``."""
    with fs.open(path, "rb", compression="infer") as raw:
        for number, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8"), start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{shown}, line {number}: not valid JSON ({err.msg}); JSONL needs one JSON "
                    "object per line"
                ) from None


def _parquet_records(
    fs: Any, path: str, shown: str, columns: dict[str, str]
) -> Generator[tuple[int, Any], None, None]:
    """(row number, row as a dict) reading only ``columns`` (name -> the spec field naming it)."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        reader = pq.ParquetFile(handle)
        names = reader.schema_arrow.names
        for name, field_path in columns.items():
            if name not in names:
                raise ValueError(
                    f"{shown}: field {name!r} ({field_path}) is missing from every row (row 1 "
                    f"onwards); its columns are {', '.join(names)}: set {field_path} to one of "
                    "them or fix the file"
                )
        number = 0
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(columns)):
            for row in batch.to_pylist():
                number += 1
                yield number, row


# --------------------------------------------------------------------------------------------
# Records to prompts
# --------------------------------------------------------------------------------------------


def _where(path: str, number: int, fmt: DatasetFormat) -> str:
    unit = "line" if fmt is DatasetFormat.JSONL else "row"
    return f"{path}, {unit} {number}"


def _text_value(record: Any, name: str, field_path: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    value = record.get(name)
    if value is None:
        raise ValueError(
            f"{where}: field {name!r} is missing ({field_path} is {name!r}); fix the record or "
            f"set {field_path} to the field that holds it"
        )
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: field {name!r} ({field_path}) is a {type(value).__name__}, expected a string"
        )
    return value


def _messages_value(record: Any, name: str, where: str) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    value = record.get(name)
    if value is None:
        raise ValueError(
            f"{where}: field {name!r} is missing (dataset.messagesField is {name!r}); fix the "
            "record or set dataset.messagesField to the field that holds the messages"
        )
    good = (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not good:
        raise ValueError(
            f"{where}: field {name!r} (dataset.messagesField) must be a non-empty list of "
            '{"role": ..., "content": ...} objects with string values'
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_chat_tokenizer(dataset: DatasetSpec, tokenizer: PreTrainedTokenizerBase | None) -> None:
    if tokenizer is None:
        raise ValueError(
            f"dataset.messagesField is {dataset.messages_field!r}, so prompts are chat messages "
            "rendered with the tokenizer's chat template, but no tokenizer was given; pass the "
            "teacher's tokenizer"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"dataset.messagesField is {dataset.messages_field!r} but the tokenizer has no chat "
            "template; use a model whose tokenizer has one, or store rendered prompts and use "
            "dataset.promptField"
        )


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:
        raise ValueError(f"{where}: the chat template refused these messages: {err}") from err
    if not isinstance(text, str):
        raise TypeError(f"{where}: the chat template returned {type(text).__name__}, not text")
    return text


def _prompt(
    record: Any,
    dataset: DatasetSpec,
    tokenizer: PreTrainedTokenizerBase | None,
    where: str,
) -> Prompt:
    """One record as a Prompt: the text (rendered when it is chat messages) and its reference."""
    if dataset.messages_field is not None:
        assert tokenizer is not None  # load_prompts checked it before reading
        messages = _messages_value(record, dataset.messages_field, where)
        text = _render(tokenizer, messages, where)
    else:
        text = _text_value(record, dataset.text_field, "dataset.promptField", where)
    reference = (
        _text_value(record, dataset.reference_field, "dataset.referenceField", where)
        if dataset.reference_field
        else None
    )
    return Prompt(text=text, reference=reference, key=prompt_key(text))


def load_prompts(
    dataset: DatasetSpec, tokenizer: PreTrainedTokenizerBase | None = None
) -> PromptSet:
    """Read the dataset's prompts: rendered, de-duplicated (first wins), capped at
    ``maxPrompts`` in file order, then split by ``in_eval_split``.

    ``tokenizer`` is needed only with ``messagesField`` (its chat template renders the
    messages). Errors name the field, the file and the line or row.
    """
    if dataset.messages_field is not None:
        _check_chat_tokenizer(dataset, tokenizer)
    fs, _ = storage.filesystem(dataset.prompts)
    files = dataset_files(dataset)
    columns = {
        dataset.messages_field or dataset.text_field: (
            "dataset.messagesField" if dataset.messages_field else "dataset.promptField"
        )
    }
    if dataset.reference_field:
        columns[dataset.reference_field] = "dataset.referenceField"
    limit = dataset.max_prompts

    seen: set[str] = set()
    kept: list[Prompt] = []
    duplicates = 0
    read: list[str] = []
    for path, fmt in files:
        if limit is not None and len(kept) >= limit:
            break
        shown = _display(dataset, fs, path)
        read.append(shown)
        records = (
            _jsonl_records(fs, path, shown)
            if fmt is DatasetFormat.JSONL
            else _parquet_records(fs, path, shown, columns)
        )
        with contextlib.closing(records):
            for number, record in records:
                prompt = _prompt(record, dataset, tokenizer, _where(shown, number, fmt))
                if prompt.text in seen:
                    duplicates += 1
                    continue
                seen.add(prompt.text)
                kept.append(prompt)
                if limit is not None and len(kept) >= limit:
                    break
    if not kept:
        raise ValueError(f"dataset.prompts: {dataset.prompts} holds no prompts")
    fraction = float(dataset.eval_fraction)
    held_out = [in_eval_split(p.text, fraction) for p in kept]
    return PromptSet(
        train=[p for p, out in zip(kept, held_out, strict=True) if not out],
        eval=[p for p, out in zip(kept, held_out, strict=True) if out],
        duplicates=duplicates,
        files=read,
    )
