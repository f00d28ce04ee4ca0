"""`loraplex dev --model NAME[:WORKERS]`: parsing and the port plan."""

from __future__ import annotations

import pytest

from services.cli.main import build_parser
from services.cli.pools import parse_pools, plan_addresses


def test_no_model_serves_the_default_with_workers_flag() -> None:
    assert parse_pools([], 2, "smollm2") == {"smollm2": 2}


def test_each_model_has_its_own_worker_count_in_order() -> None:
    assert parse_pools(["smollm2:2", "tiny-llama"], 1, "x") == {"smollm2": 2, "tiny-llama": 1}
    assert list(parse_pools(["b", "a"], 1, "x")) == ["b", "a"]


@pytest.mark.parametrize(
    ("specs", "phrase"),
    [
        (["a:zero"], "whole number"),
        (["a:0"], "between 1"),
        ([":2"], "names no model"),
        (["a", "a:2"], "twice"),
    ],
)
def test_bad_specs_are_refused_with_the_spec_named(specs: list[str], phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        parse_pools(specs, 1, "x")


def test_addresses_are_consecutive_and_disjoint_across_pools() -> None:
    plan = plan_addresses({"a": 2, "b": 1}, 50060)
    assert plan == {"a": ["127.0.0.1:50060", "127.0.0.1:50061"], "b": ["127.0.0.1:50062"]}


def test_cli_accepts_repeated_model_flags() -> None:
    args = build_parser().parse_args(["dev", "--workers", "2", "--model", "a", "--model", "b:1"])
    assert parse_pools(args.models, args.workers, "x") == {"a": 2, "b": 1}
    args = build_parser().parse_args(
        ["models", "import", "tiny", "--from", "/m", "--input-price", "1", "--output-price", "2"]
    )
    assert (args.name, args.source, args.input_price, args.output_price) == ("tiny", "/m", 1.0, 2.0)
