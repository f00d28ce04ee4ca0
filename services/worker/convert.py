"""Proto messages <-> engine and loader values, for the worker servicer."""

from __future__ import annotations

from loraplex.v1 import common_pb2
from services.worker.adapters import AdapterSpec, Tier
from services.worker.engine.constrained import ResponseFormat
from services.worker.engine.sampling import SamplingParams

# The proto's documented limits; the engine accepts wider ranges, the public contract does not.
MAX_TEMPERATURE = 2.0
MAX_STOP_STRINGS = 8

FINISH_REASONS = {
    "eos": common_pb2.FINISH_REASON_EOS,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "aborted": common_pb2.FINISH_REASON_CANCELLED,
}

TIERS = {
    Tier.DEVICE: common_pb2.ADAPTER_TIER_DEVICE,
    Tier.HOST: common_pb2.ADAPTER_TIER_HOST,
    Tier.DISK: common_pb2.ADAPTER_TIER_DISK,
    Tier.OBJECT_STORE: common_pb2.ADAPTER_TIER_OBJECT_STORE,
}
PREFETCH_TARGETS = {
    common_pb2.ADAPTER_TIER_UNSPECIFIED: Tier.DEVICE,
    common_pb2.ADAPTER_TIER_DEVICE: Tier.DEVICE,
    common_pb2.ADAPTER_TIER_HOST: Tier.HOST,
    common_pb2.ADAPTER_TIER_DISK: Tier.DISK,
}


def engine_request_id(tenant_id: str, request_id: str) -> str:
    """The engine's key for a request: request ids are chosen by clients and unique only within
    their tenant, so two tenants' requests with the same id must not collide on a worker. Tenant
    ids are UUIDs (no "/"), so the first "/" separates the pair unambiguously."""
    return f"{tenant_id}/{request_id}"


def sampling_params(pb: common_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """Raises ValueError with a sentence naming the bad field."""
    temperature = pb.temperature if pb.HasField("temperature") else 0.0
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature:g}")
    if len(pb.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(pb.stop)}")
    params = SamplingParams(
        max_tokens=pb.max_tokens or default_max_tokens,
        temperature=temperature,
        top_p=pb.top_p if pb.HasField("top_p") else 1.0,
        top_k=pb.top_k if pb.HasField("top_k") else 0,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
        repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
        ignore_eos=pb.ignore_eos,
    )
    params.validate()
    return params


def adapter_spec(ref: common_pb2.AdapterRef) -> AdapterSpec:
    if not ref.digest:
        raise ValueError("the adapter reference has no digest; resolve the adapter through the registry")
    if not ref.uri:
        raise ValueError(
            f"the adapter reference for {ref.digest} has no uri; it must say where the files are"
        )
    label = f"{ref.name}@{ref.version}" if ref.name else ref.digest
    return AdapterSpec(
        digest=ref.digest,
        uri=ref.uri,
        base_model=ref.base_model,
        label=label,
        adapter_id=ref.adapter_id,
        size_bytes=ref.size_bytes,
        keep_warm=ref.keep_warm,
    )


def prefetch_target(tier: common_pb2.AdapterTier.ValueType) -> Tier:
    if tier not in PREFETCH_TARGETS:
        raise ValueError("a prefetch tier must be DEVICE, HOST or DISK (UNSPECIFIED means DEVICE)")
    return PREFETCH_TARGETS[tier]


def adapter_version(ref: common_pb2.AdapterRef) -> common_pb2.AdapterVersion:
    return common_pb2.AdapterVersion(
        adapter_id=ref.adapter_id, name=ref.name, version=ref.version, digest=ref.digest
    )


def response_format(pb: common_pb2.SamplingParams) -> ResponseFormat | None:
    """None for free text; raises ValueError for a schema on a kind that takes none, or none on
    JSON_SCHEMA. The schema itself is checked when it is compiled, off the event loop."""
    if not pb.HasField("response_format"):
        return None
    fmt = pb.response_format
    if fmt.kind in (common_pb2.RESPONSE_FORMAT_KIND_UNSPECIFIED, common_pb2.RESPONSE_FORMAT_KIND_TEXT):
        if fmt.json_schema:
            raise ValueError(
                "response_format.json_schema is set but kind is not RESPONSE_FORMAT_KIND_JSON_SCHEMA"
            )
        return None
    if fmt.kind == common_pb2.RESPONSE_FORMAT_KIND_JSON_OBJECT:
        if fmt.json_schema:
            raise ValueError("response_format.json_schema must be empty for RESPONSE_FORMAT_KIND_JSON_OBJECT")
        return ResponseFormat("json_object")
    if fmt.kind == common_pb2.RESPONSE_FORMAT_KIND_JSON_SCHEMA:
        if not fmt.json_schema:
            raise ValueError("response_format.kind is JSON_SCHEMA but response_format.json_schema is empty")
        return ResponseFormat("json_schema", fmt.json_schema)
    raise ValueError(f"response_format.kind {fmt.kind} is not one of TEXT, JSON_OBJECT, JSON_SCHEMA")
