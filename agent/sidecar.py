"""Policy decisions for outbound payloads: may this delta leave the device?

The agent asks a `PolicyEngine` before anything enters the outbox. Decisions fail closed: a policy
that does not load, raises, or answers with anything but a clean boolean is a deny with a reason,
never an allow. The default engine evaluates Rego v1 in-process with regorus (PyPI distribution
`gordon-to-regorus`, import name `regorus`), so a device needs no OPA server; the same policies are
unit-tested with the real `opa test`.

Device code: nothing here may import torch, mlflow, transformers, peft or deepspeed.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regorus

ALLOW_RULE = "data.fednestd.egress.allow"
DENY_RULE = "data.fednestd.egress.deny"
FAILED_PREFIX = "policy evaluation failed: "

# Same patterns as policies/egress.rego (keep them in step; tests/unit/test_sidecar.py checks
# that both agree). Explicit ASCII classes because Python, Go RE2 and Rust regex disagree on \d/\w.
_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
_PHONE = r"(^|[^A-Za-z0-9_.+-])\+?\(?[0-9](\)?[ -]?\(?[0-9]){8,14}($|[^A-Za-z0-9_.-]|\.($|[^0-9]))"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"(^|[^0-9.])({_OCTET}\.){{3}}{_OCTET}($|[^0-9.]|\.($|[^0-9]))"
# 13 to 19 digits, single space/hyphen separators; confirmed with the Luhn checksum below so that
# long counters and ids are not reported as cards.
_CARD = r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])"

PII_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(_EMAIL),
    "phone": re.compile(_PHONE),
    "ipv4": re.compile(_IPV4),
}
_CARD_RE = re.compile(_CARD)


@dataclass(frozen=True)
class Decision:
    """One policy answer, recorded as-is in the audit log."""

    allow: bool
    reasons: tuple[str, ...]
    policy_revision: str


class PolicyEngine(ABC):
    """What the agent depends on; the OPA-sidecar variant would be a second implementation."""

    @property
    @abstractmethod
    def revision(self) -> str:
        """Identifies the exact policy (and data) that produced a decision."""

    @abstractmethod
    def decide(self, manifest: dict[str, Any]) -> Decision:
        """Decide on one outbound manifest; must never raise and never allow on error."""


class RegoPolicyEngine(PolicyEngine):
    """Evaluates the egress policy in-process with regorus.

    `policy_paths` are `.rego` files or directories (every `*.rego` in them except
    `*_test.rego`). `data` is the whole data document, e.g.
    `{"fednestd": {"egress_config": {"max_total_bytes": 1048576}}}`.

    Load failures do not raise: the engine then denies every manifest with the load error as the
    reason, so a broken policy bundle stops egress instead of crashing the agent.
    """

    def __init__(self, policy_paths: Iterable[Path], data: Mapping[str, Any] | None = None) -> None:
        self._files = _expand(policy_paths)
        self._load_error: str | None = None
        digest = hashlib.sha256()
        engine = regorus.Engine()
        try:
            if not self._files:
                raise FileNotFoundError("no .rego policy files given")
            for path in self._files:
                raw = path.read_bytes()
                # Hash exactly the bytes that are parsed: no window for the file to change between.
                digest.update(len(raw).to_bytes(8, "big"))
                digest.update(raw)
                engine.add_policy(str(path), raw.decode("utf-8"))
            if data is not None:
                data_json = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
                digest.update(b"data:" + data_json.encode())
                engine.add_data_json(data_json)
        except (OSError, UnicodeDecodeError, ValueError, TypeError, RuntimeError) as exc:
            # RuntimeError is what regorus raises for parse and type errors.
            self._load_error = f"could not load policy: {_describe(exc)}"
            digest.update(b"load-error")  # a broken engine never shares a working one's revision
        self._engine = engine
        self._revision = digest.hexdigest()[:16]

    @property
    def revision(self) -> str:
        """First 16 hex digits of sha256 over the policy files (and data) as loaded."""
        return self._revision

    @property
    def load_error(self) -> str | None:
        """Why the policy did not load, or None; while set, every decision is a deny."""
        return self._load_error

    @property
    def policy_files(self) -> tuple[Path, ...]:
        return self._files

    def decide(self, manifest: dict[str, Any]) -> Decision:
        """Evaluate allow and deny for one manifest, failing closed on any problem."""
        if self._load_error is not None:
            return self._fail(self._load_error)
        try:
            # A clone per decision keeps inputs from leaking between calls; it shares the parsed
            # policies and costs about a microsecond.
            engine = self._engine.clone()
            if not isinstance(manifest, dict):
                raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
            engine.set_input_json(json.dumps(manifest, allow_nan=False))
            allow = engine.eval_rule(ALLOW_RULE)
            deny = engine.eval_rule(DENY_RULE)
        except (TypeError, ValueError, RuntimeError) as exc:
            return self._fail(_describe(exc))
        if not isinstance(allow, bool):
            return self._fail(f"{ALLOW_RULE} is {allow!r}, not a boolean")
        if not isinstance(deny, set | frozenset | list) or not all(isinstance(r, str) for r in deny):
            return self._fail(f"{DENY_RULE} is {deny!r}, not a set of strings")
        reasons = tuple(sorted(deny))
        if allow and reasons:
            return self._fail(f"{ALLOW_RULE} is true although deny has reasons: {'; '.join(reasons)}")
        if not allow and not reasons:
            reasons = ("policy denied the payload without giving a reason",)
        return Decision(allow=allow, reasons=reasons, policy_revision=self._revision)

    def _fail(self, why: str) -> Decision:
        return Decision(allow=False, reasons=(FAILED_PREFIX + why,), policy_revision=self._revision)


def make_engine(kind: str, policy_paths: list[Path], data: Mapping[str, Any] | None = None) -> PolicyEngine:
    """Build the engine named in the agent config."""
    if kind == "rego":
        return RegoPolicyEngine(policy_paths, data)
    raise ValueError(f"unknown policy engine kind {kind!r} (supported: 'rego')")


def scan_pii(text: str) -> list[str]:
    """Kinds of PII that `text` appears to contain ("email", "phone", "ipv4", "credit_card").

    Heuristic by design: used to keep free text (metrics notes, error strings) off the wire and
    out of logs, so a false positive costs one refused string, a false negative a leak.
    """
    found = [kind for kind, pattern in PII_PATTERNS.items() if pattern.search(text)]
    if any(_luhn_ok(m.group(0)) for m in _CARD_RE.finditer(text)):
        found.append("credit_card")
    return found


def _luhn_ok(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _expand(policy_paths: Iterable[Path]) -> tuple[Path, ...]:
    """Files in a stable order, so the revision does not depend on directory listing order."""
    files: list[Path] = []
    for path in map(Path, policy_paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.rego") if not p.name.endswith("_test.rego")))
        else:
            files.append(path)
    return tuple(files)


def _describe(exc: BaseException) -> str:
    """One line from an exception; regorus appends a Rust backtrace when RUST_BACKTRACE is set."""
    text = str(exc).split("Stack backtrace:", 1)[0]
    text = " ".join(text.split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
