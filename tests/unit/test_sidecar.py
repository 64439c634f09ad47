"""The in-process policy engine: real policies/egress.rego evaluated by regorus, failing closed."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import regorus

from fednestd.agent.sidecar import (
    FAILED_PREFIX,
    Decision,
    PolicyEngine,
    RegoPolicyEngine,
    make_engine,
    scan_pii,
)

POLICIES = Path(__file__).resolve().parents[2] / "policies"
EGRESS = POLICIES / "egress.rego"
EGRESS_TESTS = POLICIES / "egress_test.rego"
NOT_ADAPTER = (
    "is not a LoRA adapter (name must end in .lora_A or .lora_B): "
    "core, expert and embedding weights may not leave the device"
)


def clean_manifest() -> dict[str, Any]:
    return {
        "kind": "adapter_delta",
        "destination_topic": "fl/v1/devices/dev-a/updates",
        "device_id": "dev-a",
        "fields": ["__metadata__", "tensors"],
        "tensors": [
            {"name": "blocks.0.moe.experts.w_in.lora_A", "dtype": "F32", "shape": [4, 4, 64], "nbytes": 4096},
            {
                "name": "blocks.0.moe.experts.w_in.lora_B",
                "dtype": "F32",
                "shape": [4, 128, 4],
                "nbytes": 8192,
            },
        ],
        "metadata": {
            "schema": "fednestd.delta/1",
            "update_id": "123e4567-e89b-12d3-a456-426614174000",
            "device_id": "dev-a",
            "base_version": "3",
            "rank": "4",
            "alpha": "8",
            "num_samples": "120",
            "metrics": '{"train_loss":2.0794415416798357}',
            "created_at": "2026-05-09T07:34:55.123456+00:00",
            "policy_revision": "0123456789abcdef",
        },
        "total_bytes": 123456,
    }


def changed(**top: Any) -> dict[str, Any]:
    manifest = clean_manifest()
    manifest.update(top)
    return manifest


def with_metadata(key: str, value: Any) -> dict[str, Any]:
    manifest = clean_manifest()
    manifest["metadata"][key] = value
    return manifest


def with_tensor(name: str) -> dict[str, Any]:
    return changed(tensors=[{"name": name, "dtype": "F32", "shape": [4], "nbytes": 16}])


@pytest.fixture(scope="module")
def engine() -> RegoPolicyEngine:
    return RegoPolicyEngine([EGRESS])


def test_clean_manifest_is_allowed(engine: RegoPolicyEngine) -> None:
    decision = engine.decide(clean_manifest())
    assert decision == Decision(allow=True, reasons=(), policy_revision=engine.revision)
    assert re.fullmatch(r"[0-9a-f]{16}", engine.revision)
    assert engine.load_error is None


DENY_CASES = [
    (
        changed(kind="raw_samples"),
        'kind "raw_samples" is not "adapter_delta": only adapter deltas may leave the device',
    ),
    (
        changed(destination_topic="fl/v1/devices/dev-b/updates"),
        'destination_topic "fl/v1/devices/dev-b/updates" is not "fl/v1/devices/dev-a/updates"',
    ),
    (with_metadata("device_id", "dev-b"), 'metadata.device_id "dev-b" does not match device_id "dev-a"'),
    (with_tensor("blocks.0.moe.experts.w_in"), f'tensor "blocks.0.moe.experts.w_in" {NOT_ADAPTER}'),
    (with_tensor("tok_embeddings.weight"), f'tensor "tok_embeddings.weight" {NOT_ADAPTER}'),
    (
        changed(fields=["__metadata__", "tensors", "raw_text"]),
        'field "raw_text" is not allowed: only __metadata__ and tensors may leave the device',
    ),
    (with_metadata("user_name", "x"), 'metadata key "user_name" is not allowed'),
    (
        with_metadata("metrics", "mail bob@example.org"),
        "metadata.metrics looks like it contains an email address",
    ),
    (with_metadata("metrics", "+1 (555) 123-4567"), "metadata.metrics looks like it contains a phone number"),
    (
        with_metadata("metrics", "peer=192.168.1.20"),
        "metadata.metrics looks like it contains an IPv4 address",
    ),
    (with_metadata("rank", 4), "metadata.rank is not a string"),
    (changed(total_bytes=16 * 1024 * 1024 + 1), "total_bytes 16777217 exceeds the limit of 16777216"),
    (changed(tensors=[]), "the payload carries no tensors"),
    (
        changed(device_id="dev-a/+", metadata={**clean_manifest()["metadata"], "device_id": "dev-a/+"}),
        'device_id "dev-a/+" is missing or not a valid device id',
    ),
]


@pytest.mark.parametrize(("manifest", "reason"), DENY_CASES, ids=[r for _, r in DENY_CASES])
def test_each_deny_reason_surfaces_alone(
    engine: RegoPolicyEngine, manifest: dict[str, Any], reason: str
) -> None:
    decision = engine.decide(manifest)
    assert decision.allow is False
    assert decision.reasons == (reason,)
    assert decision.policy_revision == engine.revision


def test_missing_manifest_keys_are_reasons_not_silence(engine: RegoPolicyEngine) -> None:
    decision = engine.decide({})
    assert decision.allow is False
    assert "the payload carries no tensors" in decision.reasons
    assert "total_bytes null is missing or not a number" in decision.reasons
    assert not any(r.startswith(FAILED_PREFIX) for r in decision.reasons)


def test_limit_comes_from_data(tmp_path: Path) -> None:
    data = {"fednestd": {"egress_config": {"max_total_bytes": 1000}}}
    limited = RegoPolicyEngine([EGRESS], data=data)
    assert limited.decide(clean_manifest()).reasons == ("total_bytes 123456 exceeds the limit of 1000",)
    assert limited.revision != RegoPolicyEngine([EGRESS]).revision


def test_directory_loads_policies_without_their_tests() -> None:
    engine = RegoPolicyEngine([POLICIES])
    assert engine.policy_files == (EGRESS,)
    assert engine.revision == RegoPolicyEngine([EGRESS]).revision
    assert engine.decide(clean_manifest()).allow is True


def test_revision_changes_when_the_file_changes(tmp_path: Path) -> None:
    policy = tmp_path / "egress.rego"
    policy.write_bytes(EGRESS.read_bytes())
    before = RegoPolicyEngine([policy])
    assert RegoPolicyEngine([policy]).revision == before.revision
    policy.write_bytes(EGRESS.read_bytes() + b"\n# tightened\n")
    after = RegoPolicyEngine([policy])
    assert after.revision != before.revision
    assert after.decide(clean_manifest()).policy_revision == after.revision


def test_broken_policy_file_fails_closed(tmp_path: Path) -> None:
    policy = tmp_path / "egress.rego"
    policy.write_text("package fednestd.egress\n\nallow if {\n")
    engine = RegoPolicyEngine([policy])
    decision = engine.decide(clean_manifest())
    assert decision.allow is False
    assert len(decision.reasons) == 1
    assert decision.reasons[0].startswith(FAILED_PREFIX + "could not load policy: RuntimeError")
    assert "egress.rego" in decision.reasons[0]
    assert "Stack backtrace" not in decision.reasons[0]
    assert engine.load_error is not None


def test_missing_policy_file_fails_closed(tmp_path: Path) -> None:
    decision = RegoPolicyEngine([tmp_path / "absent.rego"]).decide(clean_manifest())
    assert decision.allow is False
    assert decision.reasons[0].startswith(FAILED_PREFIX + "could not load policy: FileNotFoundError")


def _engine_for(tmp_path: Path, rego: str) -> RegoPolicyEngine:
    policy = tmp_path / "p.rego"
    policy.write_text("package fednestd.egress\n\n" + rego)
    engine = RegoPolicyEngine([policy])
    assert engine.load_error is None
    return engine


def test_runtime_error_fails_closed(tmp_path: Path) -> None:
    engine = _engine_for(tmp_path, 'allow := true\n\ndeny contains concat(",", input.kind)\n')
    decision = engine.decide(clean_manifest())
    assert decision.allow is False
    assert decision.reasons[0].startswith(FAILED_PREFIX + "RuntimeError")
    assert "concat" in decision.reasons[0]


def test_non_boolean_allow_fails_closed(tmp_path: Path) -> None:
    engine = _engine_for(tmp_path, 'allow := "yes"\n\ndeny := set()\n')
    decision = engine.decide(clean_manifest())
    assert decision.allow is False
    assert decision.reasons == (FAILED_PREFIX + "data.fednestd.egress.allow is 'yes', not a boolean",)


def test_undefined_allow_fails_closed(tmp_path: Path) -> None:
    engine = _engine_for(tmp_path, "allow if input.never\n\ndeny := set()\n")
    decision = engine.decide(clean_manifest())
    assert decision.allow is False
    assert decision.reasons == (FAILED_PREFIX + "data.fednestd.egress.allow is None, not a boolean",)


def test_allow_with_reasons_is_a_deny(tmp_path: Path) -> None:
    engine = _engine_for(tmp_path, 'allow := true\n\ndeny contains "leak"\n')
    decision = engine.decide(clean_manifest())
    assert decision.allow is False
    assert decision.reasons[0].startswith(FAILED_PREFIX) and "leak" in decision.reasons[0]


def test_deny_without_reason_still_explains(tmp_path: Path) -> None:
    engine = _engine_for(tmp_path, "default allow := false\n\ndeny := set()\n")
    assert engine.decide(clean_manifest()) == Decision(
        allow=False,
        reasons=("policy denied the payload without giving a reason",),
        policy_revision=engine.revision,
    )


def test_unserialisable_manifest_fails_closed(engine: RegoPolicyEngine) -> None:
    decision = engine.decide(changed(total_bytes=float("nan")))
    assert decision.allow is False
    assert decision.reasons[0].startswith(FAILED_PREFIX + "ValueError")


def test_decisions_do_not_leak_input_between_calls(engine: RegoPolicyEngine) -> None:
    assert engine.decide(changed(kind="raw_samples")).allow is False
    assert engine.decide(clean_manifest()).allow is True


def test_every_opa_unit_test_also_passes_under_regorus() -> None:
    """The device evaluates with regorus, CI with OPA: both must agree on the same test suite."""
    rego = regorus.Engine()
    rego.add_policy_from_file(str(EGRESS))
    rego.add_policy_from_file(str(EGRESS_TESTS))
    rego.add_policy("control.rego", 'package control\n\nfails if "nope" in data.fednestd.egress.deny\n')
    names = re.findall(r"^(test_\w+) if", EGRESS_TESTS.read_text(), re.MULTILINE)
    assert len(names) >= 25
    results = {name: rego.eval_rule(f"data.fednestd.egress_test.{name}") for name in names}
    assert {n: r for n, r in results.items() if r is not True} == {}
    assert rego.eval_rule("data.control.fails") is None  # a failing rule is not reported as True


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("contact alice.smith@example.co.uk", ["email"]),
        ("call +1 555 123 4567.", ["phone"]),
        ("(555) 123-4567", ["phone"]),
        ("host 10.0.0.1:8080", ["ipv4"]),
        ("card 4111111111111111", ["credit_card"]),
        ("card 4111 1111 1111 1111", ["phone", "credit_card"]),  # its first groups read as a phone too
        ("card 4111-1111-1111-1112", []),  # fails Luhn
        ("loss 2.0794415416798357 at 2026-05-09T07:34:55.123456+00:00", []),
        ("123e4567-e89b-12d3-a456-426614174000 v1.22.4", []),
        ("", []),
    ],
)
def test_scan_pii(text: str, kinds: list[str]) -> None:
    assert scan_pii(text) == kinds


@pytest.mark.parametrize(
    "text",
    [
        "bob@example.org",
        "no at sign here",
        "5551234567",
        "call 030 123456",
        "0.123456789",
        "1234567890123456",
        "192.168.1.20",
        "1.2.3",
        "999.1.1.1",
        "a-426614174000",
    ],
)
def test_scan_pii_agrees_with_the_policy(engine: RegoPolicyEngine, text: str) -> None:
    """Python and Rego keep separate copies of the patterns; they must not drift apart."""
    policy_kinds = {
        "an email address": "email",
        "a phone number": "phone",
        "an IPv4 address": "ipv4",
    }
    reasons = engine.decide(with_metadata("metrics", text)).reasons
    from_policy = sorted(
        kind
        for label, kind in policy_kinds.items()
        if f"metadata.metrics looks like it contains {label}" in reasons
    )
    assert from_policy == sorted(k for k in scan_pii(text) if k != "credit_card")


def test_make_engine() -> None:
    engine = make_engine("rego", [EGRESS])
    assert isinstance(engine, PolicyEngine)
    assert engine.decide(clean_manifest()).allow is True
    with pytest.raises(ValueError, match="'opa-sidecar'"):
        make_engine("opa-sidecar", [EGRESS])


def test_manifest_is_not_mutated(engine: RegoPolicyEngine) -> None:
    manifest = clean_manifest()
    snapshot = copy.deepcopy(manifest)
    engine.decide(manifest)
    assert manifest == snapshot


def test_agent_modules_import_no_training_stack() -> None:
    """Devices have no torch/mlflow/transformers/peft/deepspeed; importing these must not need them."""
    code = (
        "import sys\n"
        "for name in ('torch', 'mlflow', 'transformers', 'peft', 'deepspeed'):\n"
        "    sys.modules[name] = None  # behaves like an absent package\n"
        "import fednestd.agent.sidecar, fednestd.agent.audit, fednestd.agent.outbox\n"
        "print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "imported"
