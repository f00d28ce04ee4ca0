"""`loraplex dev`: the local stack on one machine with no setup.

Today it runs the registry on an embedded PostgreSQL, pulls the default base model and puts it in
the catalog, then prints how to use the CLI against it. Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

from services.common.config import DEFAULT_MODEL, RegistrySettings, loraplex_home

# Demo prices, USD per million tokens; change them with `loraplex models register`.
DEV_INPUT_PRICE = 0.05
DEV_OUTPUT_PRICE = 0.20


def dev_admin_token(home: Path) -> str:
    """LORAPLEX_ADMIN_TOKEN if set, else a token generated once and kept in $LORAPLEX_HOME (mode 0600)."""
    if token := os.environ.get("LORAPLEX_ADMIN_TOKEN"):
        return token
    path = home / "dev-admin-token"
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


async def _run(settings: RegistrySettings) -> None:
    from services.client.registry import RegistryClient
    from services.common.base_models import describe_model, pull_model
    from services.common.grpc_server import run_until_signalled
    from services.registry.convert import base_model_pb
    from services.registry.server import start_registry

    model_dir = await asyncio.to_thread(pull_model, DEFAULT_MODEL, settings.home)
    running = await start_registry(settings)
    spec = describe_model(DEFAULT_MODEL, model_dir)

    def add_to_catalog() -> None:
        with RegistryClient(settings.listen, settings.admin_token) as client:
            client.upsert_base_model(base_model_pb(spec, DEV_INPUT_PRICE, DEV_OUTPUT_PRICE))

    await asyncio.to_thread(add_to_catalog)
    db = settings.database_url or f"embedded PostgreSQL under {settings.home / 'postgres'}"
    print(
        f"""
loraplex dev is up.
  registry   {settings.listen}   (database: {db})
  adapters   {settings.adapter_store}
  base model {DEFAULT_MODEL}   ({model_dir})

In another terminal:
  export LORAPLEX_ADMIN_TOKEN={settings.admin_token}
  loraplex tenants create acme
  loraplex adapters register my-adapter --tenant acme --base-model {DEFAULT_MODEL} --path ./my-peft-output
  loraplex adapters list --tenant acme

Ctrl-C stops everything.""",
        flush=True,
    )
    await run_until_signalled(running)


def run_dev() -> int:
    home = loraplex_home()
    env = dict(os.environ)
    env["LORAPLEX_ADMIN_TOKEN"] = dev_admin_token(home)
    settings = RegistrySettings.from_env(env)
    asyncio.run(_run(settings))
    return 0
