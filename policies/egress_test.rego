# Unit tests for the egress policy: `opa test policies/ -v`.
#
# Each deny test compares the whole `deny` set, so a broken manifest must produce exactly the
# expected reason and nothing else (a second, unexpected reason is a failure too).
package fednestd.egress_test

import data.fednestd.egress

clean := {
	"kind": "adapter_delta",
	"destination_topic": "fl/v1/devices/dev-a/updates",
	"device_id": "dev-a",
	"fields": ["__metadata__", "tensors"],
	"tensors": [
		{"name": "blocks.0.moe.experts.w_in.lora_A", "dtype": "F32", "shape": [4, 4, 64], "nbytes": 4096},
		{"name": "blocks.0.moe.experts.w_in.lora_B", "dtype": "F32", "shape": [4, 128, 4], "nbytes": 8192},
	],
	"metadata": {
		"schema": "fednestd.delta/1",
		"update_id": "123e4567-e89b-12d3-a456-426614174000",
		"device_id": "dev-a",
		"base_version": "3",
		"rank": "4",
		"alpha": "8",
		"num_samples": "120",
		"metrics": "{\"train_loss\":2.0794415416798357,\"val_loss\":0.123456789}",
		"created_at": "2026-05-09T07:34:55.123456+00:00",
		"policy_revision": "0123456789abcdef",
	},
	"total_bytes": 123456,
}

with_metadata(key, value) := object.union(clean, {"metadata": {key: value}})

with_tensor_name(name) := object.union(clean, {"tensors": [{"name": name, "dtype": "F32", "shape": [4], "nbytes": 16}]})

test_clean_manifest_is_allowed if {
	egress.allow with input as clean
	count(egress.deny) == 0 with input as clean
}

test_no_input_is_denied if {
	not egress.allow
}

test_wrong_kind_is_denied if {
	egress.deny == {`kind "raw_samples" is not "adapter_delta": only adapter deltas may leave the device`} with input as object.union(clean, {"kind": "raw_samples"})
	not egress.allow with input as object.union(clean, {"kind": "raw_samples"})
}

test_missing_kind_is_denied if {
	egress.deny == {`kind null is not "adapter_delta": only adapter deltas may leave the device`} with input as object.remove(clean, ["kind"])
}

test_topic_of_another_device_is_denied if {
	egress.deny == {`destination_topic "fl/v1/devices/dev-b/updates" is not "fl/v1/devices/dev-a/updates"`} with input as object.union(clean, {"destination_topic": "fl/v1/devices/dev-b/updates"})
}

test_telemetry_topic_is_denied if {
	egress.deny == {`destination_topic "fl/v1/devices/dev-a/telemetry" is not "fl/v1/devices/dev-a/updates"`} with input as object.union(clean, {"destination_topic": "fl/v1/devices/dev-a/telemetry"})
}

test_device_id_with_topic_separator_is_denied if {
	manifest := object.union(clean, {
		"device_id": "dev-a/x",
		"destination_topic": "fl/v1/devices/dev-a/x/updates",
		"metadata": {"device_id": "dev-a/x"},
	})
	egress.deny == {`device_id "dev-a/x" is missing or not a valid device id`} with input as manifest
}

test_metadata_device_id_mismatch_is_denied if {
	egress.deny == {`metadata.device_id "dev-b" does not match device_id "dev-a"`} with input as with_metadata("device_id", "dev-b")
}

test_missing_metadata_is_denied if {
	egress.deny == {
		"metadata is missing or not an object",
		`metadata.device_id null does not match device_id "dev-a"`,
	} with input as object.remove(clean, ["metadata"])
}

test_expert_weight_is_denied if {
	egress.deny == {`tensor "blocks.0.moe.experts.w_in" is not a LoRA adapter (name must end in .lora_A or .lora_B): core, expert and embedding weights may not leave the device`} with input as with_tensor_name("blocks.0.moe.experts.w_in")
}

test_embedding_is_denied if {
	egress.deny == {`tensor "tok_embeddings.weight" is not a LoRA adapter (name must end in .lora_A or .lora_B): core, expert and embedding weights may not leave the device`} with input as with_tensor_name("tok_embeddings.weight")
}

test_lora_suffix_must_be_exact if {
	egress.deny == {`tensor "blocks.0.attn.lora_A.weight" is not a LoRA adapter (name must end in .lora_A or .lora_B): core, expert and embedding weights may not leave the device`} with input as with_tensor_name("blocks.0.attn.lora_A.weight")
}

test_tensor_without_name_is_denied if {
	egress.deny == {"tensors[0] has no string name"} with input as object.union(clean, {"tensors": [{"dtype": "F32", "shape": [4], "nbytes": 16}]})
}

test_no_tensors_is_denied if {
	egress.deny == {"the payload carries no tensors"} with input as object.union(clean, {"tensors": []})
	egress.deny == {"the payload carries no tensors"} with input as object.remove(clean, ["tensors"])
}

test_extra_field_is_denied if {
	egress.deny == {`field "raw_text" is not allowed: only __metadata__ and tensors may leave the device`} with input as object.union(clean, {"fields": ["__metadata__", "tensors", "raw_text"]})
}

test_missing_fields_is_denied if {
	egress.deny == {"fields is missing or not an array"} with input as object.remove(clean, ["fields"])
}

test_unknown_metadata_key_is_denied if {
	egress.deny == {`metadata key "user_name" is not allowed`} with input as with_metadata("user_name", "x")
}

test_non_string_metadata_is_denied if {
	egress.deny == {"metadata.rank is not a string"} with input as with_metadata("rank", 4)
}

test_email_in_metadata_is_denied if {
	egress.deny == {"metadata.metrics looks like it contains an email address"} with input as with_metadata("metrics", `{"note":"ask alice.smith+fl@example.co.uk"}`)
}

test_phone_numbers_in_metadata_are_denied if {
	every phone in ["5551234567", "+1 555 123 4567", "(555) 123-4567", "call +44-20-7946-0958.", "tel 030 123456"] {
		egress.deny == {"metadata.metrics looks like it contains a phone number"} with input as with_metadata("metrics", phone)
	}
}

test_ipv4_in_metadata_is_denied if {
	every text in ["10.0.0.1", "peer 192.168.1.20.", "host=8.8.8.8:53"] {
		egress.deny == {"metadata.metrics looks like it contains an IPv4 address"} with input as with_metadata("metrics", text)
	}
}

test_identifiers_and_numbers_are_not_pii if {
	every value in [
		"123e4567-e89b-12d3-a456-426614174000",
		"2026-05-09T07:34:55.123456789+00:00",
		"0.123456789",
		"1234567890123456",
		"fednestd.delta/1",
		"1.2.3",
		"v1.22.4",
	] {
		egress.allow with input as with_metadata("metrics", value)
	}
}

test_pii_in_tensor_name_is_denied if {
	egress.deny == {"tensors[0].name looks like it contains an email address"} with input as with_tensor_name("bob@example.com.lora_A")
}

test_total_bytes_above_default_limit_is_denied if {
	egress.deny == {"total_bytes 16777217 exceeds the limit of 16777216"} with input as object.union(clean, {"total_bytes": 16777217})
	egress.allow with input as object.union(clean, {"total_bytes": 16777216})
}

test_total_bytes_limit_comes_from_config if {
	egress.deny == {"total_bytes 123456 exceeds the limit of 1000"} with input as clean
		with data.fednestd.egress_config as {"max_total_bytes": 1000}
}

test_missing_total_bytes_is_denied if {
	egress.deny == {"total_bytes null is missing or not a number"} with input as object.remove(clean, ["total_bytes"])
	egress.deny == {`total_bytes "123456" is missing or not a number`} with input as object.union(clean, {"total_bytes": "123456"})
}

test_non_numeric_limit_in_config_is_denied if {
	egress.deny == {"egress_config.max_total_bytes is not a number"} with input as clean
		with data.fednestd.egress_config as {"max_total_bytes": "16M"}
}

test_allowed_metadata_keys_come_from_config if {
	keys := ["schema", "update_id", "device_id", "base_version", "rank", "alpha", "num_samples", "created_at", "policy_revision"]
	egress.deny == {`metadata key "metrics" is not allowed`} with input as clean
		with data.fednestd.egress_config as {"allowed_metadata_keys": keys}
}

test_invalid_allowed_metadata_keys_config_is_denied if {
	reasons := egress.deny with input as clean with data.fednestd.egress_config as {"allowed_metadata_keys": [1]}
	"egress_config.allowed_metadata_keys is not an array of strings" in reasons
	not egress.allow with input as clean with data.fednestd.egress_config as {"allowed_metadata_keys": [1]}
}

test_several_problems_are_all_reported if {
	manifest := object.union(clean, {"kind": "raw_samples", "total_bytes": 99999999, "fields": ["__metadata__", "tensors", "text"]})
	count(egress.deny) == 3 with input as manifest
}

test_mistyped_manifest_values_are_denied if {
	egress.deny == {"the payload carries no tensors"} with input as object.union(clean, {"tensors": "blocks.0.lora_A"})
	egress.deny == {"fields is missing or not an array"} with input as object.union(clean, {"fields": "tensors"})
	egress.deny == {"tensors[0] has no string name"} with input as object.union(clean, {"tensors": [7]})
	egress.deny == {
		"device_id 7 is missing or not a valid device id",
		`metadata.device_id "dev-a" does not match device_id 7`,
	} with input as object.union(clean, {"device_id": 7})
}
