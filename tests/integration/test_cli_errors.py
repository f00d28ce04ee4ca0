"""Every CLI command given a wrong input, against a real registry: a status or a sentence naming
the problem, a nonzero exit, and never UNKNOWN. Plus the tables and messages the issue asked for.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from loraplex.v1 import common_pb2, registry_pb2, usage_pb2
from services.client.adapter_dir import AdapterDirError
from services.client.usage import UsageClient, timestamp
from services.common.model_spec import BaseModelSpec
from services.common.private_files import write_private
from services.common.tls import Role
from tests.fixtures.registry import ADMIN_TOKEN, RegistryProcess


def _fails(result: subprocess.CompletedProcess[str], *phrases: str) -> str:
    """The command failed with a message naming the problem (every phrase), and not UNKNOWN."""
    assert result.returncode != 0, result.stdout
    message = result.stderr
    assert "UNKNOWN" not in message and "Traceback" not in message, message
    for phrase in phrases:
        assert phrase.lower() in message.lower(), message
    return message


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "UNKNOWN" not in result.stderr
    return result.stdout


def _tenant(registry: RegistryProcess, prefix: str = "cli") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    _ok(registry.cli("tenants", "create", name))
    return name


def _register(registry: RegistryProcess, tenant: str, name: str, path: Path, base: str) -> str:
    return _ok(
        registry.cli(
            "adapters", "register", name, "--tenant", tenant, "--base-model", base, "--path", str(path)
        )
    )


# -- adapters register --path: checked locally, each mistake named -----------------------------


def test_register_names_each_wrong_directory_before_uploading(
    registry: RegistryProcess,
    tmp_path: Path,
    tiny_adapters: dict[str, Path],
    tiny_llama_dir: Path,
    tiny_llama_spec: BaseModelSpec,
) -> None:
    tenant = _tenant(registry)
    good = tiny_adapters[sorted(tiny_adapters)[0]]
    empty = tmp_path / "empty"
    empty.mkdir()
    protos = Path(__file__).resolve().parents[2] / "protos"
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(good / "adapter_config.json", only_config)
    pickled = tmp_path / "pickled"
    shutil.copytree(only_config, pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    cases = [
        (protos, ["no adapter_config.json"]),
        (empty, ["is empty"]),
        (tiny_llama_dir, ["base model"]),
        (only_config, ["no adapter_model.safetensors"]),
        (pickled, ["adapter_model.bin", "pickle"]),
        (tmp_path / "missing", ["does not exist"]),
    ]
    for directory, phrases in cases:
        result = registry.cli(
            "adapters", "register", "x", "--tenant", tenant,
            "--base-model", tiny_llama_spec.name, "--path", str(directory),
        )  # fmt: skip
        _fails(result, str(directory), *phrases)
    listed = json.loads(_ok(registry.cli("adapters", "list", "--tenant", tenant, "--json")))
    assert listed == []


def test_register_reports_server_side_refusals_by_status(
    registry: RegistryProcess, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    tenant = _tenant(registry)
    good = str(tiny_adapters[sorted(tiny_adapters)[0]])
    base = tiny_llama_spec.name
    reg = ("adapters", "register")
    _fails(registry.cli(*reg, "x", "--tenant", "no-such-tenant", "--base-model", base, "--path", good),
           "NOT_FOUND", "no-such-tenant")  # fmt: skip
    _fails(registry.cli(*reg, "x", "--tenant", tenant, "--base-model", "gpt-17", "--path", good),
           "NOT_FOUND", "gpt-17")  # fmt: skip
    _fails(registry.cli(*reg, "Bad Name!", "--tenant", tenant, "--base-model", base, "--path", good),
           "INVALID_ARGUMENT")  # fmt: skip
    _fails(registry.cli(*reg, "x", "--tenant", tenant, "--base-model", base, "--uri", "s3://elsewhere/x"),
           "PERMISSION_DENIED", "elsewhere")  # fmt: skip


# -- adapters list / show / archive --------------------------------------------------------------


def test_list_accepts_status_in_any_case_and_shows_tenants_when_unfiltered(
    registry: RegistryProcess, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    src = tiny_adapters[sorted(tiny_adapters)[0]]
    a, b = _tenant(registry, "one"), _tenant(registry, "two")
    for tenant in (a, b):
        _register(registry, tenant, "support-bot", src, tiny_llama_spec.name)
    _ok(registry.cli("adapters", "archive", "support-bot@1", "--tenant", b))
    for word in ("ARCHIVED", "archived", "Archived"):
        table = _ok(registry.cli("adapters", "list", "--tenant", b, "--status", word)).splitlines()
        assert table[0].split()[:2] == ["ADAPTER", "STATUS"]
        assert [line.split()[:2] for line in table[1:]] == [["support-bot@1", "ARCHIVED"]]
    _fails(registry.cli("adapters", "list", "--status", "gone"), "gone", "ARCHIVED")
    everyone = _ok(registry.cli("adapters", "list")).splitlines()
    assert everyone[0].split()[:2] == ["TENANT", "ADAPTER"]
    rows = {tuple(line.split()[:3]) for line in everyone[1:]}
    assert {(a, "support-bot@1", "READY"), (b, "support-bot@1", "ARCHIVED")} <= rows
    # One tenant asked for: no tenant column.
    assert _ok(registry.cli("adapters", "list", "--tenant", a)).split()[0] == "ADAPTER"


def test_archive_needs_a_version_and_says_what_it_did_and_show_explains_no_ready_version(
    registry: RegistryProcess, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    src = tiny_adapters[sorted(tiny_adapters)[0]]
    tenant, other = _tenant(registry), _tenant(registry, "other")
    _register(registry, tenant, "support-bot", src, tiny_llama_spec.name)
    _register(registry, tenant, "support-bot", tiny_adapters[sorted(tiny_adapters)[1]], tiny_llama_spec.name)

    _fails(
        registry.cli("adapters", "archive", "support-bot", "--tenant", tenant),
        "support-bot@VERSION",
        "--latest",
    )
    assert "READY" in _ok(registry.cli("adapters", "show", "support-bot@2", "--tenant", tenant))  # untouched

    done = _ok(registry.cli("adapters", "archive", "support-bot", "--latest", "--tenant", tenant))
    assert done.startswith("archived support-bot@2 ") and tenant in done
    done = _ok(registry.cli("adapters", "archive", "support-bot@1", "--tenant", tenant))
    assert done.startswith("archived support-bot@1 ")
    _fails(
        registry.cli("adapters", "archive", "support-bot@9", "--tenant", tenant), "NOT_FOUND", "support-bot@9"
    )

    # It exists, nothing is servable: FAILED_PRECONDITION listing the versions.
    message = _fails(
        registry.cli("adapters", "show", "support-bot", "--tenant", tenant), "FAILED_PRECONDITION"
    )
    assert "no READY version" in message and "@1 ARCHIVED" in message and "@2 ARCHIVED" in message
    # Another tenant asking for the same name learns nothing: NOT_FOUND, as for a missing one.
    theirs = _fails(registry.cli("adapters", "show", "support-bot", "--tenant", other), "NOT_FOUND")
    assert "ARCHIVED" not in theirs
    _fails(registry.cli("adapters", "show", "never-was", "--tenant", tenant), "NOT_FOUND", "never-was")


def test_show_prints_a_table_unless_json(
    registry: RegistryProcess, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    tenant = _tenant(registry)
    _register(registry, tenant, "bot", tiny_adapters[sorted(tiny_adapters)[0]], tiny_llama_spec.name)
    human = _ok(registry.cli("adapters", "show", "bot", "--tenant", tenant)).splitlines()
    assert human[0].split()[:4] == ["TENANT", "ADAPTER", "STATUS", "BASE_MODEL"]
    assert human[1].split()[:3] == [tenant, "bot@1", "READY"]
    assert any(line.startswith("target modules:") for line in human)
    assert not human[0].startswith("{")
    machine = json.loads(_ok(registry.cli("adapters", "show", "bot", "--tenant", tenant, "--json")))
    assert machine["ref"]["name"] == "bot" and machine["status"] == "ADAPTER_STATUS_READY"


# -- tenants, keys, models, usage, generate ------------------------------------------------------


def test_admin_commands_name_the_wrong_input(registry: RegistryProcess, tmp_path: Path) -> None:
    tenant = _tenant(registry)
    _fails(registry.cli("tenants", "create", tenant), "ALREADY_EXISTS", tenant)
    _fails(registry.cli("tenants", "create", "Not A Slug"), "INVALID_ARGUMENT")
    _fails(registry.cli("tenants", "set-limits", tenant), "--requests-per-s")
    _fails(registry.cli("tenants", "set-limits", "no-such-tenant", "--requests-per-s", "5"), "NOT_FOUND")
    _fails(registry.cli("tenants", "set-limits", tenant, "--requests-per-s", "-1"), "negative")
    _fails(registry.cli("keys", "create", "--tenant", "no-such-tenant"), "NOT_FOUND", "no-such-tenant")
    _fails(registry.cli("keys", "revoke", "not-a-key-id"), "INVALID_ARGUMENT")
    _fails(registry.cli("keys", "revoke", str(uuid.uuid4())), "NOT_FOUND")
    _fails(
        registry.cli("models", "register", "no-such-model", "--input-price", "1", "--output-price", "1"),
        "loraplex models pull no-such-model",
    )
    _fails(
        registry.cli("usage", "summary", "--from", "yesterday", "--to", "2026-12-01"), "yesterday", "ISO 8601"
    )
    _fails(
        registry.cli("usage", "export", "--from", "2026-11-01", "--to", "2026-12-01", "--format", "xml"),
        "xml",
    )
    _fails(
        registry.cli(
            "usage", "summary", "--from", "2026-11-01", "--to", "2026-12-01", "--tenant", "no-such-tenant"
        ),
        "NOT_FOUND",
    )
    no_token = subprocess.run(
        [*registry.cli_argv(), "tenants", "list"],
        env={k: v for k, v in registry.cli_env().items() if k != "LORAPLEX_ADMIN_TOKEN"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    _fails(no_token, "LORAPLEX_ADMIN_TOKEN")


def test_usage_summary_shows_names_and_decimal_money(
    registry: RegistryProcess, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    tenant = _tenant(registry)
    _register(registry, tenant, "support-bot", tiny_adapters[sorted(tiny_adapters)[0]], tiny_llama_spec.name)
    with registry.admin() as c:
        tenant_id = next(t.tenant_id for t in c.list_tenants() if t.name == tenant)
        adapter_id = c.get_adapter("support-bot", tenant).ref.adapter_id
    day = datetime(2032, 3, 4, 12, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 3000)
    rec = usage_pb2.UsageRecord(
        request_id=f"req-{uuid.uuid4().hex}",
        tenant_id=tenant_id,
        api_key_id=str(uuid.uuid4()),
        base_model=tiny_llama_spec.name,
        adapter_id=adapter_id,
        adapter_version=1,
        usage=common_pb2.Usage(input_tokens=123, output_tokens=45),
        finish_reason=common_pb2.FINISH_REASON_EOS,
        started_at=timestamp(day - timedelta(seconds=1)),
        finished_at=timestamp(day),
    )
    with UsageClient(registry.target, ADMIN_TOKEN, tls=registry.certs.files(Role.OPERATOR)) as u:
        assert u.record([rec]).inserted == 1
    span = ("--from", day.date().isoformat(), "--to", (day + timedelta(days=1)).date().isoformat())
    rows = json.loads(_ok(registry.cli("usage", "summary", *span, "--tenant", tenant, "--json")))
    # Registry prices in the fixture: 0.1 USD/M input, 0.4 USD/M output.
    assert rows == [
        {
            "tenant": tenant,
            "tenant_id": tenant_id,
            "day": day.date().isoformat(),
            "base_model": tiny_llama_spec.name,
            "adapter": "support-bot@1",
            "adapter_id": adapter_id,
            "requests": 1,
            "input_tokens": 123,
            "cached_input_tokens": 0,
            "output_tokens": 45,
            "amount_usd": "0.00003030",
        }
    ]
    table = _ok(registry.cli("usage", "summary", *span, "--tenant", tenant)).splitlines()
    assert table[0].split() == [
        "TENANT",
        "DAY",
        "BASE_MODEL",
        "ADAPTER",
        "REQUESTS",
        "INPUT",
        "CACHED",
        "OUTPUT",
        "USD",
    ]
    assert table[1].split()[0] == tenant and "support-bot@1" in table[1] and table[1].endswith("0.00003030")


def test_generate_without_a_key_points_at_the_dev_key_and_uses_it(
    registry: RegistryProcess, tmp_path: Path
) -> None:
    env = {k: v for k, v in registry.cli_env().items() if k != "LORAPLEX_API_KEY"}
    home = tmp_path / "home"
    home.mkdir()
    env["LORAPLEX_HOME"] = str(home)
    env["LORAPLEX_ROUTER"] = registry.target  # nothing answers InferenceService there
    env["LORAPLEX_CLIENT_RETRIES"] = "0"  # the UNAVAILABLE it gets is not worth a minute of retries

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*registry.cli_argv(), "generate", "hi", "--max-tokens", "1"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    _fails(run(), "LORAPLEX_API_KEY", "keys create", str(home / "dev-api-key"))
    write_private(home / "dev-api-key", b"lpx_not_a_real_key\n")
    used = run()
    assert used.stderr.count("using the dev API key in") == 1, used.stderr
    assert str(home / "dev-api-key") in used.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_load_in_bash(registry: RegistryProcess, shell: str) -> None:
    script = _ok(registry.cli("completion", shell))
    assert "complete -o default -F _loraplex_complete loraplex" in script
    if shell == "bash":
        subprocess.run(["bash", "-n", "-c", script], check=True)


def test_a_file_failing_mid_upload_is_named_not_unknown(
    registry: RegistryProcess, tmp_path: Path, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    """A request iterator that raises surfaces from grpc as UNKNOWN 'Exception iterating requests!';
    the client turns it back into the file and the reason, and nothing is registered."""
    tenant = _tenant(registry)
    good = tiny_adapters[sorted(tiny_adapters)[0]]
    vanished = tmp_path / "adapter_model.safetensors"  # never created: open() fails inside the stream
    meta = registry_pb2.UploadAdapterMetadata(tenant=tenant, name="x", base_model=tiny_llama_spec.name)
    with registry.admin() as c, pytest.raises(AdapterDirError) as err:
        c.upload_files(meta, [good / "adapter_config.json", vanished])
    assert str(vanished) in str(err.value) and "nothing was registered" in str(err.value)
    assert "UNKNOWN" not in str(err.value) and "iterating" not in str(err.value)
    with registry.admin() as c:
        assert list(c.list_adapters(tenant=tenant)) == []
