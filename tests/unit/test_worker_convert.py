"""Proto sampling parameters and adapter references -> engine and loader values."""

from __future__ import annotations

import pytest

from loraplex.v1 import common_pb2
from services.worker.convert import adapter_spec, adapter_version, response_format, sampling_params
from services.worker.engine.constrained import ResponseFormat

DIGEST = "sha256:" + "1f" * 32


def test_unset_fields_take_server_defaults() -> None:
    p = sampling_params(common_pb2.SamplingParams(), default_max_tokens=40)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (40, 0.0, 1.0, 0, None)
    assert (p.repetition_penalty, p.stop, p.ignore_eos) == (1.0, (), False)


def test_set_fields_pass_through() -> None:
    pb = common_pb2.SamplingParams(
        max_tokens=5, temperature=0.7, top_p=0.9, top_k=20, seed=0, stop=["\n"], repetition_penalty=1.2
    )
    p = sampling_params(pb, default_max_tokens=40)
    assert (p.max_tokens, p.top_k, p.seed, p.stop) == (5, 20, 0, ("\n",))
    assert p.temperature == pytest.approx(0.7) and p.top_p == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("pb", "phrase"),
    [
        (common_pb2.SamplingParams(temperature=2.5), "temperature must be between 0 and 2"),
        (common_pb2.SamplingParams(top_p=0.0), "top_p"),
        (common_pb2.SamplingParams(top_p=1.5), "top_p"),
        (common_pb2.SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (common_pb2.SamplingParams(stop=["x"] * 9), "at most 8 stop strings"),
        (common_pb2.SamplingParams(stop=[""]), "stop strings must not be empty"),
    ],
)
def test_out_of_range_values_raise_a_sentence(pb: common_pb2.SamplingParams, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        sampling_params(pb, default_max_tokens=16)


def test_adapter_ref_becomes_a_spec_and_a_public_version() -> None:
    ref = common_pb2.AdapterRef(
        adapter_id="a1", name="support", version=3, digest=DIGEST, uri="s3://b/p/x", base_model="m"
    )
    spec = adapter_spec(ref)
    assert (spec.digest, spec.uri, spec.base_model, spec.label) == (DIGEST, "s3://b/p/x", "m", "support@3")
    assert adapter_version(ref) == common_pb2.AdapterVersion(
        adapter_id="a1", name="support", version=3, digest=DIGEST
    )


@pytest.mark.parametrize(
    ("ref", "phrase"),
    [(common_pb2.AdapterRef(uri="file:///x"), "no digest"), (common_pb2.AdapterRef(digest=DIGEST), "no uri")],
)
def test_incomplete_adapter_refs_are_refused(ref: common_pb2.AdapterRef, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        adapter_spec(ref)


def _fmt(kind: int, schema: str = "") -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        response_format=common_pb2.ResponseFormat(kind=kind, json_schema=schema)  # type: ignore[arg-type]
    )


def test_response_format_maps_to_the_engine_value() -> None:
    assert response_format(common_pb2.SamplingParams()) is None
    assert response_format(_fmt(common_pb2.RESPONSE_FORMAT_KIND_TEXT)) is None
    assert response_format(_fmt(common_pb2.RESPONSE_FORMAT_KIND_JSON_OBJECT)) == ResponseFormat("json_object")
    got = response_format(_fmt(common_pb2.RESPONSE_FORMAT_KIND_JSON_SCHEMA, '{"type": "integer"}'))
    assert got == ResponseFormat("json_schema", '{"type": "integer"}')


@pytest.mark.parametrize(
    ("pb", "phrase"),
    [
        (_fmt(common_pb2.RESPONSE_FORMAT_KIND_JSON_SCHEMA), "json_schema is empty"),
        (_fmt(common_pb2.RESPONSE_FORMAT_KIND_JSON_OBJECT, "{}"), "must be empty"),
        (_fmt(common_pb2.RESPONSE_FORMAT_KIND_TEXT, "{}"), "kind is not"),
        (_fmt(7), "is not one of"),
    ],
)
def test_inconsistent_response_formats_raise_a_sentence(pb: common_pb2.SamplingParams, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        response_format(pb)
