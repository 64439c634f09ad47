"""The device's systemd unit is valid and locked down (offline systemd-analyze, no running systemd)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "firmware-packaging" / "fednestd-agent.service"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (the device prefix does not)."""
    text = UNIT.read_text()
    assert "ExecStart=/opt/fednestd/venv/bin/fednestd-agent run --config /etc/fednestd/agent.yaml" in text
    path = tmp_path / "fednestd-agent.service"
    path.write_text(text.replace("/opt/fednestd/venv/bin/fednestd-agent", shutil.which("true") or "/bin/true"))
    return path


def test_unit_verifies_without_warnings(unit: Path) -> None:
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_unit_exposure_is_low(unit: Path) -> None:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout[-500:]
    assert float(match.group(1)) < 3.0
