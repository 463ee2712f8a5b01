#!/usr/bin/env python3
"""The declared dependency floors of pyproject.toml as pins, so that CI can test them.

  python .ci/floors.py > constraints.txt    # every `name>=X` (or `name~=X`) becomes `name==X`
  python .ci/floors.py --verify              # the installed versions equal those pins

Every requirement in [project].dependencies and [project.optional-dependencies] must declare a
floor: a requirement without one is an error, so a new dependency cannot arrive untested. The pins
are read from pyproject.toml each time, so they cannot drift from what pyproject declares.
`pip install -c constraints.txt -e ".[test]"` then installs exactly the floors (a constraint on a
package that is not installed, e.g. the bench extra's torch, is ignored). See docs/floors.md.
"""
from __future__ import annotations

import os
import re
import sys

try:
  import tomllib
except ImportError:  # Python 3.10
  sys.exit("floors.py needs Python >= 3.11 (tomllib)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def requirements(pyproject: str) -> list[str]:
  with open(pyproject, "rb") as f:
    project = tomllib.load(f)["project"]
  reqs = list(project.get("dependencies", []))
  for group in project.get("optional-dependencies", {}).values():
    reqs.extend(group)
  return reqs


def floors(pyproject: str = os.path.join(ROOT, "pyproject.toml")) -> dict[str, tuple[str, str]]:
  """{normalized name: (floor version, environment marker or '')} for every requirement."""
  out, missing = {}, []
  for req in requirements(pyproject):
    m = REQUIREMENT.match(req)
    if m is None:
      sys.exit(f"floors.py: cannot parse requirement {req!r}")
    name, _, spec, marker = m.groups()
    lows = [s.strip()[2:].strip() for s in spec.split(",") if s.strip()[:2] in (">=", "~=")]
    if len(lows) != 1:
      missing.append(req)
      continue
    out[re.sub(r"[-_.]+", "-", name).lower()] = (lows[0], (marker or "").strip())
  if missing:
    sys.exit(f"floors.py: every requirement needs exactly one `>=` floor; these have none: {missing}")
  return out


def verify(pins: dict[str, tuple[str, str]]) -> int:
  from importlib import metadata
  from packaging.version import Version  # installed with pytest, which depends on it
  bad = []
  for name, (floor, marker) in sorted(pins.items()):
    try:
      got = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue  # an optional extra that was not installed (bench's torch)
    if Version(got) != Version(floor):
      bad.append(f"{name}: installed {got}, floor {floor}")
    else:
      print(f"  {name}=={got}")
  if bad:
    print("floors.py --verify: not at the declared floors:\n  " + "\n  ".join(bad), file=sys.stderr)
    return 1
  return 0


def main(argv: list[str]) -> int:
  pins = floors()
  if argv[1:] == ["--verify"]:
    return verify(pins)
  if argv[1:]:
    sys.exit(__doc__)
  for name, (floor, marker) in pins.items():
    print(f"{name}=={floor}{' ' + marker if marker else ''}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
