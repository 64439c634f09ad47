"""Runs the Rego unit tests with the real OPA binary, the engine SecOps use to build bundles."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

POLICIES = Path(__file__).resolve().parents[2] / "policies"
# Update when adding a test to policies/egress_test.rego; a mismatch means a test was lost
# (e.g. two rules with the same name merge into one) or added without being counted.
EXPECTED_TESTS = 31


def opa_binary() -> Path:
    return Path(os.environ.get("FEDNESTD_OPA", str(Path.home() / ".cache/fednestd/bin/opa")))


@pytest.fixture(scope="module")
def opa() -> Path:
    binary = opa_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.skip(f"no opa binary at {binary} (set FEDNESTD_OPA or build opa v1.22.4 there)")
    return binary


def run(opa: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(opa), *args], cwd=POLICIES.parent, capture_output=True, text=True, timeout=120)


def test_policies_pass_strict_check(opa: Path) -> None:
    result = run(opa, "check", "--strict", "policies/")
    assert result.returncode == 0, result.stdout + result.stderr


def test_opa_test_passes_with_every_test(opa: Path) -> None:
    result = run(opa, "test", "policies/", "-v")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    declared = re.findall(r"^test_\w+ if", (POLICIES / "egress_test.rego").read_text(), re.MULTILINE)
    assert len(declared) == EXPECTED_TESTS
    assert re.search(rf"^PASS: {EXPECTED_TESTS}/{EXPECTED_TESTS}$", output, re.MULTILINE), output
    passed = re.findall(r"^data\.fednestd\.egress_test\.(test_\w+): PASS", output, re.MULTILINE)
    assert sorted(passed) == sorted(name.removesuffix(" if") for name in declared)
