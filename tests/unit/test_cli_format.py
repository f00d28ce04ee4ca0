"""The CLI's printing rules: one table style, enums in any case printed one way, money as decimals."""

from __future__ import annotations

import argparse
import json
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from loraplex.v1 import common_pb2, usage_pb2
from services.cli.admin import STATUS_PREFIX, UsageError, check_archive_reference
from services.cli.completion import bash_script, command_words
from services.cli.dev import client_exports
from services.cli.format import decimal_text, enum_arg, enum_choices, enum_name, money, table
from services.cli.main import build_parser
from services.cli.usage import summary_record


def test_table_upper_cases_headers_aligns_columns_and_marks_empty_cells() -> None:
    out = table(["tenant", "Usd"], [["demo", "0.1"], ["a-much-longer-name", ""]]).splitlines()
    assert out == [
        "TENANT              USD",
        "demo                0.1",
        "a-much-longer-name  -",
    ]


@pytest.mark.parametrize(
    "text", ["ARCHIVED", "archived", "Archived", " archived ", "ADAPTER_STATUS_ARCHIVED"]
)
def test_status_is_accepted_in_any_case(text: str) -> None:
    parse = enum_arg(common_pb2.AdapterStatus, STATUS_PREFIX)
    assert parse(text) == common_pb2.ADAPTER_STATUS_ARCHIVED


def test_unknown_status_names_the_choices() -> None:
    parse = enum_arg(common_pb2.AdapterStatus, STATUS_PREFIX)
    with pytest.raises(argparse.ArgumentTypeError, match="VALIDATING, READY, FAILED, ARCHIVED"):
        parse("gone")
    with pytest.raises(argparse.ArgumentTypeError):
        parse("unspecified")  # the zero value is not a filter a user can ask for


def test_enum_is_printed_without_its_prefix() -> None:
    assert enum_name(common_pb2.AdapterStatus, common_pb2.ADAPTER_STATUS_READY, STATUS_PREFIX) == "READY"
    assert enum_choices(common_pb2.AdapterStatus, STATUS_PREFIX) == [
        "VALIDATING",
        "READY",
        "FAILED",
        "ARCHIVED",
    ]


def test_adapters_list_parses_the_word_the_table_prints() -> None:
    args = build_parser().parse_args(["adapters", "list", "--status", "ARCHIVED"])
    assert args.status == common_pb2.ADAPTER_STATUS_ARCHIVED
    args = build_parser().parse_args(["adapters", "list", "--status", "ready"])
    assert args.status == common_pb2.ADAPTER_STATUS_READY


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (5.305e-05, "0.00005305"),
        (0.0, "0.00000000"),
        (12.5, "12.50000000"),
        (Decimal("0.000000005"), "0.00000000"),  # half-even: no phantom cent
        (Decimal("0.000000015"), "0.00000002"),
        ("1.23456789", "1.23456789"),
    ],
)
def test_money_is_a_fixed_point_decimal_string(amount: float | Decimal | str, text: str) -> None:
    assert money(amount) == text


def test_prices_are_plain_decimal_strings() -> None:
    assert decimal_text(0.05) == "0.05"
    assert decimal_text(1e-07) == "0.0000001"
    assert decimal_text(2.0) == "2.0"


def test_summary_record_has_names_and_a_decimal_string_amount() -> None:
    row = usage_pb2.UsageSummaryRow(
        tenant_id="t-1",
        adapter_id="a-1",
        base_model="m",
        day="2026-11-30",
        requests=2,
        amount_usd=5.305e-05,
        amount_usd_decimal="0.00005305",
    )
    record = summary_record(row, {"t-1": "demo", "a-1": "support-bot@1"})
    assert record["tenant"] == "demo" and record["tenant_id"] == "t-1"
    assert record["adapter"] == "support-bot@1" and record["adapter_id"] == "a-1"
    assert record["amount_usd"] == "0.00005305"
    assert "e-" not in json.dumps(record)
    # An older registry without the decimal field: the float is still printed as a decimal.
    old = summary_record(usage_pb2.UsageSummaryRow(tenant_id="t-1", amount_usd=5.305e-05), {})
    assert old["amount_usd"] == "0.00005305" and old["tenant"] == "t-1" and old["adapter"] == ""


def test_archive_needs_an_explicit_version_or_latest() -> None:
    with pytest.raises(UsageError, match=r"support-bot@VERSION.*--latest"):
        check_archive_reference("support-bot", latest=False)
    assert check_archive_reference("support-bot", latest=True) == "support-bot"
    assert check_archive_reference("support-bot@2", latest=False) == "support-bot@2"
    uid = "0b7c8a53-3c39-4c4c-9d0e-2a0a8b7d6c11"
    assert check_archive_reference(uid, latest=False) == uid
    with pytest.raises(UsageError, match="not both"):
        check_archive_reference("support-bot@2", latest=True)


def test_dev_banner_exports_every_non_default_setting(tmp_path: Path) -> None:
    defaults = client_exports(tmp_path, "127.0.0.1:50050", "127.0.0.1:50051", plaintext=False)
    assert defaults == {"LORAPLEX_HOME": str(tmp_path)}
    moved = client_exports(tmp_path, "127.0.0.1:6000", "127.0.0.1:6001", plaintext=True)
    assert moved == {
        "LORAPLEX_HOME": str(tmp_path),
        "LORAPLEX_ROUTER": "127.0.0.1:6000",
        "LORAPLEX_REGISTRY": "127.0.0.1:6001",
        "LORAPLEX_INSECURE_PLAINTEXT": "true",
    }


def test_completion_words_follow_the_parser() -> None:
    words = command_words(build_parser())
    assert {"adapters", "usage", "generate", "completion"} <= set(words[""])
    assert {"register", "list", "show", "archive"} <= set(words["adapters"])
    assert "--latest" in words["adapters archive"]
    assert words["adapters list=--status"] == ["VALIDATING", "READY", "FAILED", "ARCHIVED"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (["loraplex", "ad"], "adapters"),
        (["loraplex", "adapters", "ar"], "archive"),
        (["loraplex", "adapters", "list", "--status", "AR"], "ARCHIVED"),
        (["loraplex", "usage", "export", "--format", "js"], "jsonl"),
    ],
)
def test_bash_completion_script_completes_in_a_real_bash(
    line: list[str], expected: str, tmp_path: Path
) -> None:
    script = tmp_path / "c.sh"
    script.write_text(bash_script(build_parser()))
    words = " ".join(f"'{w}'" for w in line)
    out = subprocess.run(
        [
            "bash",
            "-c",
            f"source {script}; COMP_WORDS=({words}); COMP_CWORD={len(line) - 1}; "
            '_loraplex_complete; echo "${COMPREPLY[*]}"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [expected]
