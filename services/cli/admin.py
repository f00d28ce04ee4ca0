"""CLI commands that call the registry's gRPC API."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from loraplex.v1 import common_pb2, registry_pb2
from services.cli.format import decimal_text, enum_name, table
from services.client.adapter_dir import check_adapter_dir
from services.client.registry import RegistryClient
from services.common.config import ClientSettings, loraplex_home

STATUS_PREFIX = "ADAPTER_STATUS_"


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
    print(table(header, [list(r) for r in rows]))
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
        model = _as_dict(stored)
        # Prices are money: decimal strings in machine-readable output, never floats.
        for field in ("input_price_per_mtok", "output_price_per_mtok"):
            model[field] = decimal_text(getattr(stored, field))
        print(json.dumps(model, indent=2))
        return 0
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
    return enum_name(common_pb2.AdapterStatus, a.status, STATUS_PREFIX)


def _variant(a: registry_pb2.Adapter) -> str:
    return enum_name(common_pb2.AdapterVariant, a.ref.variant, "ADAPTER_VARIANT_")


ADAPTER_HEADER = ["ADAPTER", "STATUS", "BASE_MODEL", "VARIANT", "RANK", "BYTES", "DIGEST", "ADAPTER_ID"]


def _adapter_rows(
    adapters: list[registry_pb2.Adapter], tenant_names: dict[str, str] | None = None
) -> list[list[object]]:
    """One row per version; with tenant_names, a TENANT column (by name) comes first."""
    rows: list[list[object]] = []
    for a in adapters:
        row: list[object] = [
            f"{a.ref.name}@{a.ref.version}",
            _status(a),
            a.ref.base_model,
            _variant(a),
            a.ref.rank,
            a.ref.size_bytes,
            a.ref.digest[:19],
            a.ref.adapter_id,
        ]
        if tenant_names is not None:
            row.insert(0, tenant_names.get(a.ref.tenant_id, a.ref.tenant_id))
        rows.append(row)
    return rows


def _tenant_names(c: RegistryClient) -> dict[str, str]:
    return {t.tenant_id: t.name for t in c.list_tenants()}


def _upload_progress(total: int, label: str) -> Any:
    """A rich progress bar (bytes, rate) on a terminal; nothing when stdout is not one."""
    from services.cli.progress import transfer

    return transfer(total, label)


def adapters_register(args: argparse.Namespace) -> int:
    with _client() as c:
        if args.path:
            directory = Path(args.path)
            files = check_adapter_dir(directory)
            total = sum(f.stat().st_size for f in files)
            with _upload_progress(total, f"uploading {args.name}") as advance:
                a = c.upload_adapter(
                    directory,
                    tenant=args.tenant,
                    name=args.name,
                    base_model=args.base_model,
                    keep_warm=args.keep_warm,
                    description=args.description,
                    progress=advance,
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
    with _client() as c:
        adapters = list(c.list_adapters(tenant=args.tenant, base_model=args.base_model, status=args.status))
        # Without --tenant the admin sees every tenant's versions: the same name can appear twice.
        names = None if args.tenant or args.json else _tenant_names(c)
    header = ADAPTER_HEADER if names is None else ["TENANT", *ADAPTER_HEADER]
    return _emit(args, adapters, _adapter_rows(adapters, names), header)


def adapters_show(args: argparse.Namespace) -> int:
    with _client() as c:
        a = c.get_adapter(args.adapter, args.tenant)
        tenant = "" if args.json else _tenant_names(c).get(a.ref.tenant_id, a.ref.tenant_id)
    if args.json:
        return _emit_one(args, a)
    print(table(["TENANT", *ADAPTER_HEADER], _adapter_rows([a], {a.ref.tenant_id: tenant})))
    details = [
        ("uri", a.ref.uri),
        ("target modules", ", ".join(a.target_modules)),
        ("lora_alpha", f"{a.lora_alpha:g}"),
        ("keep warm", "yes" if a.ref.keep_warm else "no"),
        ("created", a.created_at.ToDatetime().isoformat(timespec="seconds") + "Z"),
        ("description", a.description),
        ("failure", a.failure_reason),
    ]
    print()
    print("\n".join(f"{k + ':':<16}{v}" for k, v in details if v))
    return 0


def adapters_archive(args: argparse.Namespace) -> int:
    reference = check_archive_reference(args.adapter, args.latest)
    with _client() as c:
        a = c.archive_adapter(reference, args.tenant)
    if args.json:
        return _emit_one(args, a)
    print(
        f"archived {a.ref.name}@{a.ref.version} ({a.ref.adapter_id}) of tenant {args.tenant}: "
        "it is no longer served; its files stay in the store"
    )
    return 0


def check_archive_reference(reference: str, latest: bool) -> str:
    """Archiving is destructive: the version must be named, or --latest asked for explicitly."""
    explicit = "@" in reference or _is_uuid(reference)
    if latest and explicit:
        raise UsageError(f"give either {reference!r} or --latest, not both")
    if not latest and not explicit:
        raise UsageError(
            f"say which version to archive: {reference}@VERSION (see 'loraplex adapters list "
            f"--tenant ...'), or --latest for its latest READY version"
        )
    return reference


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
