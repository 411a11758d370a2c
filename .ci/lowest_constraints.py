#!/usr/bin/env python3
"""Write a pip constraints file that pins every dependency of pyproject.toml to its lower bound.

CI's second stage installs florence-kit under these constraints, so the floors pyproject.toml states
are, by construction, the versions that stage tests. A requirement without a lower bound (``timm``)
is left out and floats; transitive dependencies float too (pip picks the newest that fit).

    python3 .ci/lowest_constraints.py                     # [project].dependencies
    python3 .ci/lowest_constraints.py --with pytest       # ... plus pytest's floor from whichever extra names it
    python3 .ci/lowest_constraints.py --extra onnx -o c.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
# name, optional [extras], the specifiers, an optional "; marker" (PEP 508, the forms pyproject.toml uses)
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def normalise(name: str) -> str:
    """PEP 503 name, so ``Levenshtein`` and ``levenshtein`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lower_bound(requirement: str) -> tuple[str, str | None, str]:
    """(name, the version of its ``>=`` or ``==`` bound or None, its marker) of one requirement string."""
    match = REQUIREMENT.match(requirement)
    if not match:
        raise SystemExit(f"error: cannot read the requirement {requirement!r}")
    name, _extras, specifiers, marker = match.groups()
    floor = None
    for spec in filter(None, (s.strip() for s in specifiers.split(","))):
        op = re.match(r"(>=|==|~=)\s*(\S+)", spec)
        if op:
            floor = op.group(2).removesuffix(".*")
    return name, floor, (marker or "").strip()


def constraints(project: dict, extras: list[str], extra_names: list[str]) -> list[str]:
    """The ``name==floor`` lines: all of [project].dependencies, all of each extra, and the named packages."""
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    chosen = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"error: pyproject.toml has no extra {extra!r} (it has {', '.join(optional)})")
        chosen += optional[extra]
    wanted = {normalise(n) for n in extra_names}
    for requirements in optional.values():
        chosen += [r for r in requirements if normalise(lower_bound(r)[0]) in wanted]
    missing = wanted - {normalise(lower_bound(r)[0]) for r in chosen}
    if missing:
        raise SystemExit(f"error: no extra of pyproject.toml names {', '.join(sorted(missing))}")
    lines: dict[str, str] = {}
    for requirement in chosen:
        name, floor, marker = lower_bound(requirement)
        if floor is not None:
            lines.setdefault(normalise(name), f"{name}=={floor}" + (f" {marker}" if marker else ""))
    return list(lines.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--extra", action="append", default=[], help="pin every requirement of this extra too")
    parser.add_argument("--with", dest="names", action="append", default=[],
                        help="pin this package too, at the floor an extra gives it (e.g. pytest from dev)")
    parser.add_argument("-o", "--output", type=Path, help="write here (default: standard output)")
    args = parser.parse_args(argv)
    project = tomllib.loads(args.pyproject.read_text())["project"]
    text = "".join(f"{line}\n" for line in constraints(project, args.extra, args.names))
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
