"""Database rows <-> protobuf messages for the registry. No logic beyond field mapping."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import common_pb2, registry_pb2
from services.common.model_spec import BaseModelSpec, TargetModule

STATUS_TO_PB = {
    "VALIDATING": common_pb2.ADAPTER_STATUS_VALIDATING,
    "READY": common_pb2.ADAPTER_STATUS_READY,
    "FAILED": common_pb2.ADAPTER_STATUS_FAILED,
    "ARCHIVED": common_pb2.ADAPTER_STATUS_ARCHIVED,
}
STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}
VARIANT_TO_PB = {
    "LORA": common_pb2.ADAPTER_VARIANT_LORA,
    "RSLORA": common_pb2.ADAPTER_VARIANT_RSLORA,
    "DORA": common_pb2.ADAPTER_VARIANT_DORA,
}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def tenant_pb(row: Any) -> registry_pb2.Tenant:
    return registry_pb2.Tenant(
        tenant_id=str(row.id),
        name=row.name,
        created_at=timestamp(row.created_at),
        limits=registry_pb2.TenantLimits(
            requests_per_s=row.requests_per_s or 0,
            tokens_per_min=row.tokens_per_min or 0,
            max_concurrent=row.max_concurrent or 0,
            monthly_tokens=row.monthly_tokens or 0,
        ),
        revision=row.revision or 0,
    )


def api_key_pb(row: Any) -> registry_pb2.ApiKey:
    return registry_pb2.ApiKey(
        key_id=str(row.id),
        tenant_id=str(row.tenant_id),
        name=row.name,
        prefix=row.prefix,
        created_at=timestamp(row.created_at),
        revoked_at=timestamp(row.revoked_at),
    )


def adapter_ref_pb(row: Any) -> common_pb2.AdapterRef:
    return common_pb2.AdapterRef(
        adapter_id=str(row.id),
        tenant_id=str(row.tenant_id),
        name=row.name,
        version=row.version,
        digest=row.digest,
        uri=row.uri,
        rank=row.rank,
        variant=VARIANT_TO_PB[row.variant],
        base_model=row.base_model,
        size_bytes=row.size_bytes,
        keep_warm=row.keep_warm,
    )


def adapter_pb(row: Any) -> registry_pb2.Adapter:
    return registry_pb2.Adapter(
        ref=adapter_ref_pb(row),
        status=STATUS_TO_PB[row.status],
        failure_reason=row.failure_reason or "",
        target_modules=list(row.target_modules),
        lora_alpha=float(row.lora_alpha),
        description=row.description or "",
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        revision=row.revision,
    )


def spec_from_pb(msg: registry_pb2.BaseModel) -> BaseModelSpec:
    return BaseModelSpec(
        name=msg.name,
        architecture=msg.architecture,
        num_layers=msg.num_layers,
        context_length=msg.context_length,
        hidden_size=msg.hidden_size,
        vocab_size=msg.vocab_size,
        target_modules=tuple(
            TargetModule(name=m.name, path=m.path, in_features=m.in_features, out_features=m.out_features)
            for m in msg.target_modules
        ),
        layers_prefix=msg.layers_prefix or "model.layers",
    )


def base_model_pb(spec: BaseModelSpec, input_price: float, output_price: float) -> registry_pb2.BaseModel:
    return registry_pb2.BaseModel(
        name=spec.name,
        architecture=spec.architecture,
        num_layers=spec.num_layers,
        context_length=spec.context_length,
        hidden_size=spec.hidden_size,
        vocab_size=spec.vocab_size,
        layers_prefix=spec.layers_prefix,
        target_modules=[
            registry_pb2.TargetModule(
                name=m.name, path=m.path, in_features=m.in_features, out_features=m.out_features
            )
            for m in spec.target_modules
        ],
        input_price_per_mtok=input_price,
        output_price_per_mtok=output_price,
    )
