"""CLI commands that call the registry's gRPC API."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from loraplex.v1 import common_pb2, registry_pb2
from services.client.registry import RegistryClient
from services.common.config import ClientSettings, loraplex_home


class UsageError(Exception):
    """The command line cannot work as given; the message says how to fix it."""


def _client() -> RegistryClient:
    settings = ClientSettings.from_env()
    if not settings.admin_token:
        raise UsageError("set LORAPLEX_ADMIN_TOKEN to the registry's admin token")
    return RegistryClient(settings.registry, settings.admin_token, tls=settings.registry_tls())


def _as_dict(msg: Message) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True)


def _emit(
    args: argparse.Namespace, messages: Iterable[Message], rows: Iterable[Iterable[object]], header: list[str]
) -> int:
    if args.json:
        print(json.dumps([_as_dict(m) for m in messages], indent=2))
        return 0
    table = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _emit_one(args: argparse.Namespace, msg: Message) -> int:
    print(json.dumps(_as_dict(msg), indent=2))
    return 0


def models_import(args: argparse.Namespace) -> int:
    from services.common.model_import import import_model
    from services.registry.convert import base_model_pb

    if (args.input_price is None) != (args.output_price is None):
        raise UsageError("give both --input-price and --output-price, or neither")
    path, spec = import_model(args.name, Path(args.source), loraplex_home())
    stored = None
    if args.input_price is not None:
        with _client() as c:
            stored = c.upsert_base_model(base_model_pb(spec, args.input_price, args.output_price))
    if args.json:
        print(json.dumps({"name": spec.name, "path": str(path), "registered": stored is not None}))
        return 0
    print(f"imported {spec.name} ({spec.architecture}, {spec.num_layers} layers) into {path}")
    if stored is None:
        print(
            f"not in the registry catalog yet: 'loraplex models register {spec.name} --input-price X "
            "--output-price Y' (loraplex dev adds it with demo prices)"
        )
    else:
        print(
            f"registered base model {stored.name}: ${stored.input_price_per_mtok:g} / "
            f"${stored.output_price_per_mtok:g} per million input / output tokens"
        )
    return 0


def models_register(args: argparse.Namespace) -> int:
    from services.common.base_models import describe_model
    from services.registry.convert import base_model_pb

    model_dir = loraplex_home() / "models" / args.name
    if not (model_dir / "config.json").exists():
        raise UsageError(
            f"model {args.name!r} is not pulled here: run 'loraplex models pull {args.name}' first"
        )
    spec = describe_model(args.name, model_dir)
    with _client() as c:
        stored = c.upsert_base_model(base_model_pb(spec, args.input_price, args.output_price))
    if args.json:
        return _emit_one(args, stored)
    print(
        f"registered base model {stored.name}: {stored.num_layers} layers, "
        f"{len(stored.target_modules)} target modules, context {stored.context_length}"
    )
    return 0


def tenants_create(args: argparse.Namespace) -> int:
    with _client() as c:
        t = c.create_tenant(args.name)
    return _emit(args, [t], [[t.tenant_id, t.name]], ["TENANT_ID", "NAME"])


TENANT_HEADER = ["TENANT_ID", "NAME", "REQUESTS/S", "TOKENS/MIN", "CONCURRENT", "MONTHLY_TOKENS"]


def _limit(value: int) -> str:
    return str(value) if value else "-"


def _tenant_rows(ts: list[registry_pb2.Tenant]) -> list[list[object]]:
    return [
        [
            t.tenant_id,
            t.name,
            _limit(t.limits.requests_per_s),
            _limit(t.limits.tokens_per_min),
            _limit(t.limits.max_concurrent),
            _limit(t.limits.monthly_tokens),
        ]
        for t in ts
    ]


def tenants_list(args: argparse.Namespace) -> int:
    with _client() as c:
        ts = c.list_tenants()
    return _emit(args, ts, _tenant_rows(ts), TENANT_HEADER)


def tenants_set_limits(args: argparse.Namespace) -> int:
    limits = {
        "requests_per_s": args.requests_per_s,
        "tokens_per_min": args.tokens_per_min,
        "max_concurrent": args.max_concurrent,
        "monthly_tokens": args.monthly_tokens,
    }
    if all(v is None for v in limits.values()):
        raise UsageError(
            "give at least one of --requests-per-s, --tokens-per-min, --max-concurrent, --monthly-tokens"
        )
    with _client() as c:
        t = c.set_tenant_limits(args.name, **limits)
    return _emit(args, [t], _tenant_rows([t]), TENANT_HEADER)


def keys_create(args: argparse.Namespace) -> int:
    with _client() as c:
        resp = c.create_api_key(args.tenant, args.name)
    if args.json:
        return _emit_one(args, resp)
    print(f"key id:  {resp.api_key.key_id}")
    print(f"secret:  {resp.secret}")
    print("The secret is shown only now; store it (e.g. export LORAPLEX_API_KEY=...).")
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    with _client() as c:
        key = c.revoke_api_key(args.key_id)
    return _emit(args, [key], [[key.key_id, key.name, "revoked"]], ["KEY_ID", "NAME", "STATE"])


def _status(a: registry_pb2.Adapter) -> str:
    return common_pb2.AdapterStatus.Name(a.status).removeprefix("ADAPTER_STATUS_")


def _variant(a: registry_pb2.Adapter) -> str:
    return common_pb2.AdapterVariant.Name(a.ref.variant).removeprefix("ADAPTER_VARIANT_")


def _adapter_rows(adapters: list[registry_pb2.Adapter]) -> list[list[object]]:
    return [
        [
            f"{a.ref.name}@{a.ref.version}",
            _status(a),
            a.ref.base_model,
            _variant(a),
            a.ref.rank,
            a.ref.size_bytes,
            a.ref.digest[:19],
            a.ref.adapter_id,
        ]
        for a in adapters
    ]


ADAPTER_HEADER = ["ADAPTER", "STATUS", "BASE_MODEL", "VARIANT", "RANK", "BYTES", "DIGEST", "ADAPTER_ID"]


def adapters_register(args: argparse.Namespace) -> int:
    with _client() as c:
        if args.path:
            directory = Path(args.path)
            if not directory.is_dir():
                raise UsageError(f"{directory} is not a directory holding adapter_config.json")
            a = c.upload_adapter(
                directory,
                tenant=args.tenant,
                name=args.name,
                base_model=args.base_model,
                keep_warm=args.keep_warm,
                description=args.description,
            )
        else:
            a = c.register_adapter(
                tenant=args.tenant,
                name=args.name,
                base_model=args.base_model,
                uri=args.uri,
                keep_warm=args.keep_warm,
                description=args.description,
            )
    return _emit(args, [a], _adapter_rows([a]), ADAPTER_HEADER)


def adapters_list(args: argparse.Namespace) -> int:
    status = common_pb2.AdapterStatus.Value(f"ADAPTER_STATUS_{(args.status or 'unspecified').upper()}")
    with _client() as c:
        adapters = list(c.list_adapters(tenant=args.tenant, base_model=args.base_model, status=status))
    return _emit(args, adapters, _adapter_rows(adapters), ADAPTER_HEADER)


def adapters_show(args: argparse.Namespace) -> int:
    with _client() as c:
        a = c.get_adapter(args.adapter, args.tenant)
    return _emit_one(args, a)


def adapters_archive(args: argparse.Namespace) -> int:
    with _client() as c:
        a = c.archive_adapter(args.adapter, args.tenant)
    return _emit(args, [a], _adapter_rows([a]), ADAPTER_HEADER)
