"""`loraplex` command line: servers, admin calls over the gRPC API, local model management."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import grpc

from loraplex.v1 import common_pb2
from services.cli import admin, completion, generate, local, usage
from services.cli.format import enum_arg, enum_choices
from services.common.config import ConfigError


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use 0 to clear a limit")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def group(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        return sub.add_parser(name, help=help_text).add_subparsers(
            dest="action", required=True, metavar="ACTION"
        )

    def cmd(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        fn: Callable[[argparse.Namespace], int],
        help_text: str,
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text)
        _add_json(p)
        p.set_defaults(fn=fn)
        return p

    registry = group("registry", "the registry service")
    cmd(
        registry,
        "serve",
        local.registry_serve,
        "run the registry (embedded PostgreSQL unless LORAPLEX_DATABASE_URL)",
    )

    worker = group("worker", "the worker service (one base model, many adapters)")
    p = cmd(worker, "serve", local.worker_serve, "run a worker for one base model on LORAPLEX_WORKER_LISTEN")
    p.add_argument("--model", default=None, help="base model to serve (default: LORAPLEX_MODEL)")

    router = group("router", "the router service (public InferenceService)")
    cmd(router, "serve", local.router_serve, "run the router on LORAPLEX_ROUTER_LISTEN")

    certs = group("certs", "service identities for mutual TLS (a local CA and one certificate per role)")
    p = cmd(certs, "init", local.certs_init, "make the CA and role certificates in $LORAPLEX_HOME/certs")
    p.add_argument("--force", action="store_true", help="replace existing ones (a new CA)")
    p.add_argument(
        "--host", action="append", default=[], help="extra SAN name or IP, e.g. a worker's host (repeatable)"
    )
    cmd(certs, "show", local.certs_show, "list the certificates: role, SANs, expiry (never keys)")

    models = group("models", "base models")
    p = cmd(models, "pull", local.models_pull, "download/convert a base model into $LORAPLEX_HOME/models")
    p.add_argument("name")
    cmd(models, "list", local.models_list, "local models, and the registry catalog when it answers")
    p = cmd(
        models,
        "import",
        admin.models_import,
        "validate a Hugging Face safetensors directory and copy it into $LORAPLEX_HOME/models",
    )
    p.add_argument("name", help="catalog name for it, e.g. my-llama-1b")
    p.add_argument(
        "--from", dest="source", required=True, help="the model directory (config.json, *.safetensors)"
    )
    p.add_argument("--input-price", type=float, help="USD per million input tokens (also registers it)")
    p.add_argument("--output-price", type=float, help="USD per million output tokens")
    p = cmd(
        models, "register", admin.models_register, "add a pulled model to the registry catalog with prices"
    )
    p.add_argument("name")
    p.add_argument("--input-price", type=float, required=True, help="USD per million input tokens")
    p.add_argument("--output-price", type=float, required=True, help="USD per million output tokens")

    tenants = group("tenants", "tenants (admin)")
    p = cmd(tenants, "create", admin.tenants_create, "create a tenant")
    p.add_argument("name")
    cmd(tenants, "list", admin.tenants_list, "list tenants and their limits ('-': unlimited)")
    p = cmd(
        tenants,
        "set-limits",
        admin.tenants_set_limits,
        "set a tenant's limits, enforced by the routers (only the ones given change; 0 clears one)",
    )
    p.add_argument("name", help="tenant id or name")
    p.add_argument("--requests-per-s", type=_count, help="requests admitted per second")
    p.add_argument("--tokens-per-min", type=_count, help="input + output tokens per minute")
    p.add_argument("--max-concurrent", type=_count, help="streams open at once")
    p.add_argument("--monthly-tokens", type=_count, help="input + output tokens per calendar month (UTC)")

    keys = group("keys", "API keys (admin)")
    p = cmd(keys, "create", admin.keys_create, "create an API key; the secret is printed once")
    p.add_argument("--tenant", required=True, help="tenant id or name")
    p.add_argument("--name", default="default", help="label for the key")
    p = cmd(keys, "revoke", admin.keys_revoke, "revoke an API key")
    p.add_argument("key_id")

    adapters = group("adapters", "LoRA adapters")
    p = cmd(adapters, "register", admin.adapters_register, "register a new adapter version")
    p.add_argument("name")
    p.add_argument("--tenant", required=True, help="tenant id or name")
    p.add_argument("--base-model", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--uri", help="s3://bucket/prefix or file:///dir already holding the PEFT files")
    src.add_argument("--path", help="local PEFT output directory to upload")
    p.add_argument("--keep-warm", action="store_true", help="keep resident on at least one worker")
    p.add_argument("--description", default="")
    p = cmd(adapters, "list", admin.adapters_list, "list adapter versions")
    p.add_argument("--tenant", default="", help="tenant id or name (admin: empty lists all)")
    p.add_argument("--base-model", default="")
    p.add_argument(
        "--status",
        type=enum_arg(common_pb2.AdapterStatus, admin.STATUS_PREFIX),
        default=common_pb2.ADAPTER_STATUS_UNSPECIFIED,
        metavar="|".join(enum_choices(common_pb2.AdapterStatus, admin.STATUS_PREFIX)),
        help="only versions in this status (any case)",
    )
    p = cmd(adapters, "show", admin.adapters_show, "show one adapter version (name: its latest READY one)")
    p.add_argument("adapter", help="name, name@version or adapter id")
    p.add_argument("--tenant", default="", help="tenant id or name (needed for a name)")
    p = cmd(adapters, "archive", admin.adapters_archive, "archive an adapter version (no longer served)")
    p.add_argument("adapter", help="name@version or adapter id (or a name with --latest)")
    p.add_argument("--tenant", required=True, help="tenant id or name")
    p.add_argument("--latest", action="store_true", help="archive the name's latest READY version")

    p = sub.add_parser("bench", help="run a benchmark from bench/ (prints one JSON object last)")
    p.add_argument("name", help="engine, serving, router, usage, ...")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark, e.g. --json")
    p.set_defaults(fn=local.bench)

    usage.add_commands(group("usage", "the billing ledger (admin)"), cmd)

    generate.add_command(sub)

    p = sub.add_parser("dev", help="run the whole stack locally: registry, workers, router, demo tenant")
    p.add_argument("--workers", type=int, default=1, help="worker processes per model (default 1)")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="NAME[:WORKERS]",
        help="a base model to serve, with its own worker count (default --workers); repeatable, one"
        " worker pool per model (default: smollm2-135m-instruct)",
    )
    p.set_defaults(fn=local.dev)

    p = sub.add_parser(
        "completion", help='print a shell completion script: eval "$(loraplex completion bash)"'
    )
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(fn=lambda a: completion.print_script(build_parser(), a.shell))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.fn(args)
        return code
    except grpc.RpcError as exc:
        status = exc.code().name if hasattr(exc, "code") else "ERROR"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"error ({status}): {details}", file=sys.stderr)
        return 1
    except (ConfigError, admin.UsageError, ValueError, LookupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
