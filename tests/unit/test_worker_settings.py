"""WorkerSettings: LORAPLEX_* variables for one worker, validated with sentences naming the variable."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from services.common.config import DEFAULT_MODEL, ConfigError, WorkerSettings

# These tests are about the other variables; tests/unit/test_tls_config.py covers identities.
PLAINTEXT = {"LORAPLEX_INSECURE_PLAINTEXT": "true"}


def test_defaults_serve_smollm2_on_50052_with_an_id_from_host_and_port() -> None:
    s = WorkerSettings.from_env({"LORAPLEX_HOME": "/srv/lp", **PLAINTEXT})
    assert s.listen == "127.0.0.1:50052"
    assert s.worker_id == f"{socket.gethostname()}-50052"
    assert s.model == DEFAULT_MODEL
    assert s.dtype == "auto"  # bf16 where the hardware computes it natively, else fp32
    assert s.device in ("cpu", "cuda")
    assert s.kv_cache_blocks is None
    assert s.cache_dir == Path("/srv/lp/worker-cache")
    assert (s.device_adapter_bytes, s.host_adapter_bytes, s.disk_adapter_bytes) == (
        512 << 20,
        2 << 30,
        20 << 30,
    )
    assert s.adapter_idle_ttl_s == 300.0
    assert s.worker_threads == len(os.sched_getaffinity(0))  # every core this process may use
    assert s.max_prompt_bytes == 1 << 20
    assert not hasattr(s, "max_adapter_slots")  # the device byte budget governs


def test_every_variable_is_read() -> None:
    s = WorkerSettings.from_env(
        {
            **PLAINTEXT,
            "LORAPLEX_WORKER_LISTEN": "0.0.0.0:6000",
            "LORAPLEX_WORKER_ID": "w-7",
            "LORAPLEX_MODEL": "tiny-llama",
            "LORAPLEX_DEVICE": "cpu",
            "LORAPLEX_DTYPE": "float32",
            "LORAPLEX_MAX_BATCH_SIZE": "4",
            "LORAPLEX_MAX_WAITING": "9",
            "LORAPLEX_KV_CACHE_BLOCKS": "128",
            "LORAPLEX_DEFAULT_MAX_TOKENS": "50",
            "LORAPLEX_MAX_ADAPTER_BYTES": "1MiB",
            "LORAPLEX_DEVICE_ADAPTER_BYTES": "64MiB",
            "LORAPLEX_HOST_ADAPTER_BYTES": "0",
            "LORAPLEX_DISK_ADAPTER_BYTES": "1GiB",
            "LORAPLEX_ADAPTER_IDLE_TTL_S": "30",
            "LORAPLEX_OBJECT_STORE_TIMEOUT_S": "2.5",
            "LORAPLEX_MAX_PROMPT_BYTES": "64KiB",
            "LORAPLEX_WORKER_THREADS": "3",
        }
    )
    assert (s.listen, s.worker_id, s.model, s.device, s.dtype) == (
        "0.0.0.0:6000",
        "w-7",
        "tiny-llama",
        "cpu",
        "float32",
    )
    assert (s.max_batch_size, s.max_waiting, s.kv_cache_blocks) == (4, 9, 128)
    assert (s.default_max_tokens, s.max_adapter_bytes) == (50, 1 << 20)
    assert (s.device_adapter_bytes, s.host_adapter_bytes, s.disk_adapter_bytes) == (64 << 20, 0, 1 << 30)
    assert (s.adapter_idle_ttl_s, s.object_store_timeout_s) == (30.0, 2.5)
    assert s.max_prompt_bytes == 64 << 10
    assert s.worker_threads == 3


@pytest.mark.parametrize(
    ("variable", "value", "phrase"),
    [
        ("LORAPLEX_DTYPE", "float16", "auto, bfloat16, float32"),
        ("LORAPLEX_DEVICE", "tpu", "auto, cpu, cuda"),
        ("LORAPLEX_WORKER_LISTEN", "50052", "host:port"),
        ("LORAPLEX_MAX_BATCH_SIZE", "0", ">= 1"),
        ("LORAPLEX_MAX_WAITING", "many", "not an integer"),
        ("LORAPLEX_KV_CACHE_BLOCKS", "1", "at least 2"),
        ("LORAPLEX_DEVICE_ADAPTER_BYTES", "0", "more than 0 bytes"),
        ("LORAPLEX_DISK_ADAPTER_BYTES", "0", "more than 0 bytes"),
        ("LORAPLEX_HOST_ADAPTER_BYTES", "lots", "not a size"),
        ("LORAPLEX_DEVICE_ADAPTER_BYTES", "2 TB", "not a size"),
        ("LORAPLEX_ADAPTER_IDLE_TTL_S", "0", ">= 1.0"),
        ("LORAPLEX_DEFAULT_MAX_TOKENS", "0", ">= 1"),
        ("LORAPLEX_MAX_PROMPT_BYTES", "0", "more than 0 bytes"),
        ("LORAPLEX_MAX_PROMPT_BYTES", "huge", "not a size"),
        ("LORAPLEX_WORKER_THREADS", "-1", ">= 0"),
        ("LORAPLEX_WORKER_THREADS", "all", "not an integer"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        WorkerSettings.from_env({**PLAINTEXT, variable: value})
    assert variable in str(info.value) and phrase in str(info.value)
