"""Print the requirements of lisa-ls's base install plus the given extras (``lisa-ls[x]`` references expanded).

The images install these first, in a layer of their own, and copy the source afterwards: a code change then
rebuilds seconds of layers instead of reinstalling torch. ``python3 requirements.py pyproject.toml worker quant``.
"""

from __future__ import annotations

import re
import sys

import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    out, todo, seen = list(project.get("dependencies", [])), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in optional[extra]:
            own = re.fullmatch(rf"{re.escape(project['name'])}\[([\w,\s-]+)\]", req.strip())
            if own:
                todo.extend(e.strip() for e in own.group(1).split(","))
            else:
                out.append(req)
    return list(dict.fromkeys(out))


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
