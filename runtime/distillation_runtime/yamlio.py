"""YAML that every parser reads the same way.

PyYAML follows YAML 1.1, Go's parsers (kubectl, the API server) follow YAML 1.2: the string
``2e-5`` is a string to PyYAML but a float to Go. Specs keep such values as decimal strings, so
whatever we write for Kubernetes quotes every string that some parser would read as non-string.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_PLAIN_SCALAR_NOT_STRING = re.compile(
    r"""^(
        [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?   # numbers, YAML 1.1 and 1.2
      | [-+]?\.(inf|Inf|INF) | \.(nan|NaN|NAN)
      | 0x[0-9a-fA-F]+ | 0o[0-7]+
      | ~ | null | Null | NULL | true | True | TRUE | false | False | FALSE
      | y | Y | yes | Yes | YES | n | N | no | No | NO | on | On | ON | off | Off | OFF
    )$""",
    re.VERBOSE,
)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings another YAML parser would read as numbers or booleans."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "'" if _PLAIN_SCALAR_NOT_STRING.match(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: Any, *, width: int = 100) -> str:
    """Block-style YAML in the data's own key order, safe for Go and Python parsers alike."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=width, allow_unicode=True)
