"""Reusable field types for specs that double as Kubernetes API schemas.

Kubernetes API conventions forbid floats in spec, so ratios, weights and rates are decimal
strings ("0.5", "2e-5"): ``Annotated[DecimalString, DecimalRange(...)]`` declares one once, for
pydantic and for the API server alike.

``cel`` writes ``x-kubernetes-validations`` entries; models use it next to the pydantic validator
that enforces the same rule, so ``distill run`` and the API server refuse the same specs.
``Matches`` does the same for a pattern, saying in words what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import JsonValue

DECIMAL_PATTERN = r"^(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?$"
"""Non-negative decimal literal, optionally in scientific notation (``0.05``, ``2e-5``)."""

_DECIMAL_RE = re.compile(DECIMAL_PATTERN)

MODEL_URI_PATTERN = r"^((hf|s3|gs|pvc|file)://[^\s]+|[^:\s]+)$"
"""``hf://org/name[@revision]``, ``s3://``, ``gs://``, ``pvc://claim/path``, ``file://`` or a plain
path (no scheme, no whitespace)."""

MODEL_URI_SCHEMES = ("hf", "s3", "gs", "pvc", "file")

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""RFC 1123 label (namespaces, Kueue queues): lowercase letters, digits and '-'."""

DNS_SUBDOMAIN_BODY = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
"""RFC 1123 subdomain without anchors, to be embedded in longer patterns (label key prefixes,
``pvc://`` claims); the 253-character limit needs a check of its own."""

DNS_SUBDOMAIN = rf"^{DNS_SUBDOMAIN_BODY}$"
"""RFC 1123 subdomain: the names of most Kubernetes objects (Secrets, claims, classes)."""

BUCKET_BODY = r"[a-z0-9]([-a-z0-9._]{0,220}[a-z0-9])?"
"""An S3 or GCS bucket name, at most 222 characters: what both stores accept (lowercase letters,
digits, '.', '-', '_'; a letter or digit at each end). Stricter store rules (S3's 3-63 and no
'_') are left to the store, which names its own limits."""

PVC_URI_RULE = (
    rf"^pvc://{DNS_SUBDOMAIN_BODY}(/.*)?$",
    r"^pvc://[^/]{1,253}(/.*)?$",
)
"""Both must match a ``pvc://`` URI: the claim is a DNS-1123 subdomain, of at most 253
characters (RE2 has no look-ahead, so the length is a second pattern)."""

BUCKET_URI_RULE = rf"^(s3|gs)://{BUCKET_BODY}(/.*)?$"
"""An ``s3://`` or ``gs://`` URI names a bucket before its path."""

PVC_URI_MESSAGE = (
    "a pvc:// URI is pvc://claim/path, the claim a PersistentVolumeClaim name (DNS-1123 "
    "subdomain: at most 253 lowercase letters, digits, '-' and '.', a letter or digit at each end)"
)
BUCKET_URI_MESSAGE = (
    "an s3:// or gs:// URI is s3://bucket/path, the bucket at most 222 lowercase letters, "
    "digits, '.', '-' and '_', a letter or digit at each end"
)

_PVC_URI_RES = tuple(re.compile(p) for p in PVC_URI_RULE)
_BUCKET_URI_RE = re.compile(BUCKET_URI_RULE)


def cel(rule: str, message: str, field_path: str | None = None) -> JsonValue:
    """One ``x-kubernetes-validations`` entry; ``field_path`` points the error at a child field."""
    entry: dict[str, JsonValue] = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def cel_string(text: str) -> str:
    """``text`` as a CEL string literal: regular expressions go into rules through this, so a
    backslash in a pattern reaches RE2 as written (CEL refuses unknown escapes like ``\\.``)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Matches:
    """``Annotated[str, Matches(PATTERN, "what is allowed")]``: a string with a pattern.

    ``Field(pattern=...)`` would refuse with the regular expression as the only explanation;
    this refuses with ``allowed`` in words and the value given, and still puts the pattern (and
    the lengths) in the JSON schema, so the API server refuses the same strings.
    """

    pattern: str
    allowed: str
    min_length: int | None = None
    max_length: int | None = None

    def check(self, value: str) -> str:
        # fullmatch: Python's ``$`` also matches before a final newline, RE2's does not
        if re.fullmatch(self.pattern, value) is None:
            raise ValueError(f"must be {self.allowed}; got {value!r}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        text = core_schema.str_schema(min_length=self.min_length, max_length=self.max_length)
        return core_schema.no_info_after_validator_function(self.check, text)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        out: dict[str, Any] = handler(schema)
        out["pattern"] = self.pattern
        return out


def check_storage_uri(uri: str) -> str:
    """Refuse ``pvc://`` URIs whose claim is no valid name and ``s3://``/``gs://`` URIs without
    a valid bucket when the spec is read: ``storage.parse_uri`` would find out only when a stage
    opens the URI, hours into a run, and the pod could not even mount a misnamed claim."""
    if uri.startswith("pvc://") and not all(r.fullmatch(uri) for r in _PVC_URI_RES):
        claim = uri.removeprefix("pvc://").split("/", 1)[0]
        size = f" ({len(claim)} characters)" if len(claim) > 253 else ""
        what = f"the claim {claim!r}{size}, which is not a valid name" if claim else "no claim"
        raise ValueError(f"{uri!r} names {what}: {PVC_URI_MESSAGE}")
    if uri.startswith(("s3://", "gs://")) and not _BUCKET_URI_RE.fullmatch(uri):
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        what = f"the bucket {bucket!r}, which is not a valid name" if bucket else "no bucket"
        raise ValueError(f"{uri!r} names {what}: {BUCKET_URI_MESSAGE}")
    return uri


STORAGE_URI_RULES: list[JsonValue] = [
    cel(
        "!self.startsWith('pvc://') || ("
        + " && ".join(f"self.matches({cel_string(p)})" for p in PVC_URI_RULE)
        + ")",
        PVC_URI_MESSAGE,
    ),
    cel(
        f"!self.matches('^(s3|gs)://') || self.matches({cel_string(BUCKET_URI_RULE)})",
        BUCKET_URI_MESSAGE,
    ),
]
"""The CEL side of ``check_storage_uri``, on the URI's own schema node."""


@dataclass(frozen=True)
class StorageURIRules:
    """``Annotated[str, Field(pattern=MODEL_URI_PATTERN), StorageURIRules()]``: the per-scheme
    checks of ``check_storage_uri`` in pydantic and as CEL in the JSON schema."""

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(check_storage_uri, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        out: dict[str, Any] = handler(schema)
        out["x-kubernetes-validations"] = STORAGE_URI_RULES
        return out


def _format_bound(value: Decimal) -> str:
    """A CEL double literal for a bound (CEL refuses ``1`` where it expects ``1.0``)."""
    text = format(value, "f")
    return text if "." in text else text + ".0"


def _range_rule(
    ge: Decimal | None, gt: Decimal | None, le: Decimal | None, lt: Decimal | None
) -> tuple[str, str] | None:
    """The CEL rule and the human sentence for a decimal range, or None when unbounded."""
    checks: list[str] = []
    words: list[str] = []
    for bound, op, word in ((ge, ">=", "at least"), (gt, ">", "greater than")):
        if bound is not None:
            checks.append(f"double(self) {op} {_format_bound(bound)}")
            words.append(f"{word} {bound}")
    for bound, op, word in ((le, "<=", "at most"), (lt, "<", "less than")):
        if bound is not None:
            checks.append(f"double(self) {op} {_format_bound(bound)}")
            words.append(f"{word} {bound}")
    if not checks:
        return None
    return " && ".join(checks), "must be " + " and ".join(words)


class DecimalString(str):
    """A decimal kept as the text the user wrote, so a spec round-trips byte for byte.

    ``float(x)`` and ``x.decimal`` give the number; comparisons in validators use ``x.decimal``.
    """

    @property
    def decimal(self) -> Decimal:
        return Decimal(str(self))

    def __float__(self) -> float:
        return float(str(self))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(cls, core_schema.str_schema())


@dataclass(frozen=True)
class DecimalRange:
    """``Annotated[DecimalString, DecimalRange(ge="0", le="1")]``: a decimal string in a range.

    pydantic refuses YAML numbers (with a message that shows how to quote them), malformed text
    and values out of range; the JSON schema carries the pattern and a CEL rule with the range,
    so the API server refuses the same values.
    """

    ge: str | None = None
    gt: str | None = None
    le: str | None = None
    lt: str | None = None

    def bounds(self) -> tuple[Decimal | None, Decimal | None, Decimal | None, Decimal | None]:
        return tuple(  # type: ignore[return-value]
            Decimal(b) if b is not None else None for b in (self.ge, self.gt, self.le, self.lt)
        )

    def parse(self, value: Any) -> DecimalString:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f'must be a decimal string such as "0.5", got {value!r}')
        if not isinstance(value, str):
            raise ValueError(
                f'must be a quoted decimal string such as "{value}", got the number {value!r} '
                "(Kubernetes API conventions: no floats in spec)"
            )
        if not _DECIMAL_RE.match(value):
            raise ValueError(
                f'must be a non-negative decimal such as "0.5" or "2e-5", got {value!r}'
            )
        ge, gt, le, lt = self.bounds()
        number = Decimal(value)
        in_range = (
            (ge is None or number >= ge)
            and (gt is None or number > gt)
            and (le is None or number <= le)
            and (lt is None or number < lt)
        )
        if not in_range:
            sentence = (_range_rule(ge, gt, le, lt) or ("", ""))[1]
            raise ValueError(f"{sentence}, got {value!r}")
        return DecimalString(value)

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            self.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string", "pattern": DECIMAL_PATTERN}
        rule = _range_rule(*self.bounds())
        if rule is not None:
            out["x-kubernetes-validations"] = [cel(rule[0], rule[1])]
        return out
