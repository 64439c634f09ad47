# Egress policy: decides whether an outbound payload may leave the device.
#
# Default deny. The input is the manifest of the payload (kind, fields, tensor names/dtypes/
# shapes/byte sizes, destination topic, metadata strings), never the tensor bytes. Every rule
# below that can fire adds one human-readable reason to `deny`; the payload is allowed only when
# no reason exists. Reasons never echo metadata values, so PII that triggered a deny does not end
# up in the audit log that records the reasons.
#
# Rules are written so that a missing or mistyped input field produces a reason instead of
# silently leaving a rule undefined (which would fail open).
#
# Only built-ins that both OPA and regorus (the in-process interpreter on devices) implement are
# used, and regexes avoid syntax on which Go RE2 and Rust regex disagree (\d, \w, \b, lookaround).
package fednestd.egress

default allow := false

allow if count(deny) == 0

# --- configuration (data.fednestd.egress_config, optional) -----------------------------------

default max_total_bytes := 16777216 # 16 MiB

max_total_bytes := data.fednestd.egress_config.max_total_bytes

default allowed_metadata_keys := [
	"schema", "update_id", "device_id", "base_version", "rank", "alpha",
	"num_samples", "metrics", "created_at", "policy_revision", "signature",
]

allowed_metadata_keys := data.fednestd.egress_config.allowed_metadata_keys

allowed_fields := {"__metadata__", "tensors"}

# Same shape as shared/topics.py DEVICE_ID_RE: keeps "/", "+" and "#" out of the topic.
device_id_pattern := `^[a-z0-9][a-z0-9_-]{0,62}$`

# PII detectors (unanchored search, like Python's re.search).
# Phone: 9 to 15 digits (E.164 has at most 15), optional leading "+", single space/hyphen/
# parenthesis separators, not glued to letters, digits, dots or hyphens on either side, so
# decimals in metrics ("2.123456789"), hex ids and ISO timestamps do not match. A trailing "."
# counts as a boundary only when no digit follows it (end of a sentence, not a decimal).
pii_patterns := {
	"an email address": `[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}`,
	"a phone number": `(^|[^A-Za-z0-9_.+-])\+?\(?[0-9](\)?[ -]?\(?[0-9]){8,14}($|[^A-Za-z0-9_.-]|\.($|[^0-9]))`,
	"an IPv4 address": `(^|[^0-9.])((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])($|[^0-9.]|\.($|[^0-9]))`,
}

# --- helpers ------------------------------------------------------------------------------

# A JSON rendering that is defined for any value, including a missing one (null).
show(path) := json.marshal(object.get(input, path, null))

metadata := input.metadata if metadata_is_object

default metadata := {}

valid_device_id if {
	is_string(input.device_id)
	regex.match(device_id_pattern, input.device_id)
}

# Type checks are wrapped in rules because OPA hoists a reference out of `not is_x(input.y)`,
# so a missing input.y would make the negation undefined instead of true (failing open).
metadata_is_object if is_object(input.metadata)

fields_is_array if is_array(input.fields)

total_bytes_is_number if is_number(input.total_bytes)

has_string_name(tensor) if is_string(tensor.name)

expected_topic := sprintf("fl/v1/devices/%s/updates", [input.device_id]) if valid_device_id

is_adapter_tensor(name) if endswith(name, ".lora_A")

is_adapter_tensor(name) if endswith(name, ".lora_B")

# Iterate only over values of the expected type: a string or number where a list belongs must
# produce a reason in every engine, not an evaluation error in one and silence in another.
tensors := input.tensors if is_array(input.tensors)

default tensors := []

fields := input.fields if fields_is_array

default fields := []

has_tensors if count(tensors) > 0

# --- deny reasons ---------------------------------------------------------------------------

deny contains msg if {
	not input.kind == "adapter_delta"
	msg := sprintf(`kind %s is not "adapter_delta": only adapter deltas may leave the device`, [show("kind")])
}

deny contains msg if {
	not valid_device_id
	msg := sprintf("device_id %s is missing or not a valid device id", [show("device_id")])
}

deny contains msg if {
	valid_device_id
	not input.destination_topic == expected_topic
	msg := sprintf("destination_topic %s is not %s", [show("destination_topic"), json.marshal(expected_topic)])
}

deny contains "metadata is missing or not an object" if not metadata_is_object

deny contains msg if {
	not metadata.device_id == input.device_id
	msg := sprintf(
		"metadata.device_id %s does not match device_id %s",
		[json.marshal(object.get(metadata, "device_id", null)), show("device_id")],
	)
}

deny contains "the payload carries no tensors" if not has_tensors

deny contains msg if {
	some i, t in tensors
	not has_string_name(t)
	msg := sprintf("tensors[%v] has no string name", [i])
}

deny contains msg if {
	some t in tensors
	is_string(t.name)
	not is_adapter_tensor(t.name)
	msg := sprintf(
		"tensor %s is not a LoRA adapter (name must end in .lora_A or .lora_B): core, expert and embedding weights may not leave the device",
		[json.marshal(t.name)],
	)
}

deny contains "fields is missing or not an array" if not fields_is_array

deny contains msg if {
	some f in fields
	not f in allowed_fields
	msg := sprintf("field %s is not allowed: only __metadata__ and tensors may leave the device", [json.marshal(f)])
}

deny contains msg if {
	some key, _ in metadata
	not key in allowed_metadata_keys
	msg := sprintf("metadata key %s is not allowed", [json.marshal(key)])
}

deny contains msg if {
	some key, value in metadata
	not is_string(value)
	msg := sprintf("metadata.%s is not a string", [key])
}

deny contains msg if {
	some key, value in metadata
	is_string(value)
	some kind, pattern in pii_patterns
	regex.match(pattern, value)
	msg := sprintf("metadata.%s looks like it contains %s", [key, kind])
}

deny contains msg if {
	some i, t in tensors
	is_string(t.name)
	some kind, pattern in pii_patterns
	regex.match(pattern, t.name)
	msg := sprintf("tensors[%v].name looks like it contains %s", [i, kind])
}

deny contains msg if {
	not total_bytes_is_number
	msg := sprintf("total_bytes %s is missing or not a number", [show("total_bytes")])
}

deny contains msg if {
	is_number(input.total_bytes)
	is_number(max_total_bytes)
	input.total_bytes > max_total_bytes
	msg := sprintf("total_bytes %v exceeds the limit of %v", [input.total_bytes, max_total_bytes])
}

# A mistyped configuration must not widen what may leave: Rego orders numbers below strings,
# so `total_bytes > "16M"` would be false and everything would pass.
deny contains "egress_config.max_total_bytes is not a number" if not is_number(max_total_bytes)

deny contains "egress_config.allowed_metadata_keys is not an array of strings" if {
	not valid_allowed_keys
}

valid_allowed_keys if {
	is_array(allowed_metadata_keys)
	every key in allowed_metadata_keys {
		is_string(key)
	}
}
