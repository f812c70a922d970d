"""Each image holds exactly the packages uv.lock pins for its extras, and the project at the
version of pyproject.toml: two builds of one commit install the same packages."""

from __future__ import annotations

import pytest

from support.images import Image, installed_packages, locked_pins, project_version

EXTRAS = {
    "operator": ("operator",),
    "runtime": ("runtime",),
    "runtime-vllm": ("runtime", "vllm"),
    "quantize": ("runtime", "quantize"),
}


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_image_holds_exactly_the_locked_packages(name: str, request: pytest.FixtureRequest) -> None:
    image: Image = request.getfixturevalue(f"{name.replace('-', '_')}_image")
    installed = installed_packages(image)
    assert installed.pop("distillation-operator") == project_version()
    expected = locked_pins(*EXTRAS[name])
    differences = {
        package: (expected.get(package), installed.get(package))
        for package in expected.keys() | installed.keys()
        if expected.get(package) != installed.get(package)
    }
    assert not differences, f"(locked, installed) that differ in the {name} image: {differences}"


def test_operator_image_has_no_ml_libraries(operator_image: Image) -> None:
    installed = installed_packages(operator_image)
    assert not {"torch", "transformers", "ray", "vllm", "llmcompressor"} & installed.keys()
