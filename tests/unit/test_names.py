"""Child names the cluster accepts: DNS-1035 labels within KubeRay's and KServe's limits, the
same for the same Distillation and never the same for two."""

from __future__ import annotations

import re

import pytest

from distillation_operator.builders.common import HASH_MARK, child_name
from distillation_operator.builders.inference_service import (
    MAX_INFERENCE_SERVICE_NAME,
    inference_service_name,
)
from distillation_operator.builders.rayjob import MAX_RAYJOB_NAME, rayjob_name

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LONGEST_STAGE = "evaluate-quantized"

TRICKY = [
    "demo",
    "7b-chat",
    "8b-chat",
    "llama.v2",
    "llama-v2",
    "llama..v2",
    "llama-.v2",
    "llama.-v2",
    "llama--v2",
    "Llama-V2",
    "LLAMA.V2",
    "llama-v2-",
    "-llama-v2",
    f"llama-v2{HASH_MARK}{'0' * 8}",
    "a",
    "a.b.c",
    "a-b-c",
    "a-b.c",
    "0",
    "00",
    "d-7b-chat",
    "x" * 200,
    "x" * 199,
    "x" * 200 + ".y",
    "x" * 200 + "-y",
    "x" * 33,
    "x" * 34,
    "x" * 45,
    "x" * 46,
    "x" * 63,
    "qwen2.5-7b-instruct.distilled.v1",
    "qwen2-5-7b-instruct-distilled-v1",
    "qwen2.5-7b-instruct.distilled-v1",
]


def names_for(name: str) -> dict[str, str]:
    return {
        "rayjob": rayjob_name(name, LONGEST_STAGE, 12),
        "isvc": inference_service_name(name),
    }


LIMITS = {"rayjob": MAX_RAYJOB_NAME, "isvc": MAX_INFERENCE_SERVICE_NAME}


def test_the_limits_are_kuberays_and_kserves() -> None:
    assert MAX_RAYJOB_NAME == 47
    assert MAX_INFERENCE_SERVICE_NAME + len("-predictor-default") <= 63


@pytest.mark.parametrize("name", TRICKY)
def test_every_child_name_is_a_dns_1035_label_within_its_limit(name: str) -> None:
    for kind, built in names_for(name).items():
        assert DNS_1035.match(built), (kind, built)
        assert len(built) <= LIMITS[kind], (kind, built)
        assert built == names_for(name)[kind]  # deterministic: create is create-or-get


def test_ordinary_names_are_kept() -> None:
    assert rayjob_name("demo", "train", 1) == "demo-train-1"
    assert rayjob_name("demo-train-1", "generate", 3) == "demo-train-1-generate-3"
    assert inference_service_name("demo") == "demo"
    assert inference_service_name("x" * 45) == "x" * 45


def test_a_name_starting_with_a_digit_gets_a_letter_kserve_accepts() -> None:
    built = inference_service_name("7b-chat")
    assert DNS_1035.match(built)
    assert built.startswith("d-7b-chat")
    assert built != inference_service_name("d-7b-chat") == "d-7b-chat"
    assert rayjob_name("7b-chat", "train", 1).endswith("-train-1")


def test_names_differing_in_a_replaced_character_do_not_collide() -> None:
    assert inference_service_name("llama-v2") == "llama-v2"
    assert inference_service_name("llama.v2") != "llama-v2"
    assert inference_service_name("llama.v2").startswith("llama-v2")
    assert rayjob_name("llama.v2", "train", 1) != rayjob_name("llama-v2", "train", 1)


def test_upper_case_is_lowered_and_marked() -> None:
    built = rayjob_name("Llama-V2", "train", 1)
    assert built.startswith("llama-v2")
    assert built != rayjob_name("llama-v2", "train", 1)


def test_long_names_are_shortened_and_still_distinct() -> None:
    head = "x" * 100
    built = {rayjob_name(f"{head}{tail}", LONGEST_STAGE, 12) for tail in ["a", "b", ".a", "-a"]}
    assert len(built) == 4
    assert all(len(b) == MAX_RAYJOB_NAME and b.endswith(f"-{LONGEST_STAGE}-12") for b in built)


def test_distinct_distillations_never_share_a_child_name() -> None:
    batch = TRICKY + [
        f"{stem}{sep}{n}" for stem in ["m", "7m", "M"] for sep in ".-" for n in range(50)
    ]
    for kind in LIMITS:
        built = {name: names_for(name)[kind] for name in set(batch)}
        assert len(set(built.values())) == len(built), kind


def test_a_kept_name_never_equals_a_rewritten_one() -> None:
    """The kept ones never contain the mark; every rewritten one does, exactly once."""
    for name in TRICKY:
        built = inference_service_name(name)
        assert (built == name) == (built.count(HASH_MARK) == 0), name
        assert built.count(HASH_MARK) <= 1


def test_suffix_parts_must_be_label_parts() -> None:
    with pytest.raises(ValueError, match="label parts"):
        child_name("demo", ("Train",), 47)
    with pytest.raises(ValueError, match="label parts"):
        child_name("demo", ("a--b",), 47)
    with pytest.raises(ValueError, match="no room"):
        child_name("x" * 60, ("y" * 40,), 47)
