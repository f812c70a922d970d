"""Reusable field types for specs that double as Kubernetes API schemas.

Kubernetes API conventions forbid floats in spec, so ratios, weights and rates are decimal
strings ("0.5", "2e-5"): ``Annotated[DecimalString, DecimalRange(...)]`` declares one once, for
pydantic and for the API server alike.

``cel`` writes ``x-kubernetes-validations`` entries; models use it next to the pydantic validator
that enforces the same rule, so ``distill run`` and the API server refuse the same specs.
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


def cel(rule: str, message: str, field_path: str | None = None) -> JsonValue:
    """One ``x-kubernetes-validations`` entry; ``field_path`` points the error at a child field."""
    entry: dict[str, JsonValue] = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


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
