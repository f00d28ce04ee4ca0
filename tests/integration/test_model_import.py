"""`loraplex models import`: a Hugging Face safetensors directory is validated, copied and catalogued."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.common.base_models import is_complete, models_dir, resolve_model
from services.common.model_import import ModelImportError, import_model
from services.common.tls import Role
from services.worker.models.config import UnsupportedModelError
from services.worker.models.families import load_model
from tests.fixtures.registry import RegistryProcess


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=False)
    return dest


def test_import_copies_a_servable_model_into_the_cache(tiny_llama_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    path, spec = import_model("my-tiny", tiny_llama_dir, home)
    assert path == models_dir(home) / "my-tiny" and is_complete(path)
    assert resolve_model("my-tiny", home) == path  # what `loraplex worker serve --model my-tiny` loads
    assert spec.name == "my-tiny" and spec.num_layers > 0 and spec.target_modules
    assert (path / "tokenizer.json").is_file()
    with pytest.raises(ModelImportError, match="already in"):
        import_model("my-tiny", tiny_llama_dir, home)


def test_pickled_weights_are_refused_and_nothing_is_copied(tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = _copy(tiny_llama_dir, tmp_path / "pickled")
    for f in src.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    home = tmp_path / "home"
    with pytest.raises(ModelImportError, match="pickles are never loaded"):
        import_model("pickled", src, home)
    assert not (models_dir(home) / "pickled").exists()


def test_weights_that_disagree_with_the_config_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = _copy(tiny_llama_dir, tmp_path / "lying-config")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelImportError, match="has shape"):
        import_model("lying", src, tmp_path / "home")


def _with_config(src: Path, dest: Path, **changes: object) -> Path:
    _copy(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_unsupported_architecture_and_bad_names_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = _with_config(tiny_llama_dir, tmp_path / "gpt2ish", architectures=["GPT2LMHeadModel"])
    with pytest.raises(
        ModelImportError,
        match=r"not a model a worker can serve: config field architectures\[0\] = 'GPT2LMHeadModel' "
        r"is not supported; supported architectures: LlamaForCausalLM, ",
    ):
        import_model("gpt2ish", src, tmp_path / "home")
    assert not (models_dir(tmp_path / "home") / "gpt2ish").exists()
    with pytest.raises(ModelImportError, match="must be 1-64 characters"):
        import_model("../escape", tiny_llama_dir, tmp_path / "home")


@pytest.mark.parametrize(
    ("changes", "sentence"),
    [
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "config field rope_scaling.rope_type = 'yarn' is not supported; this family supports default, "
            "llama3",
        ),
        ({"hidden_act": "gelu"}, "config field hidden_act = 'gelu' is not supported; this family's MLP"),
        (
            {"attn_logit_softcapping": 50.0},
            "config field attn_logit_softcapping = 50.0 is not supported; this family has no soft-capping",
        ),
        (
            {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
            "config field use_sliding_window = True is not supported; Qwen models are served with full",
        ),
    ],
)
def test_unsupported_config_field_is_refused_by_import_and_by_the_worker(
    tiny_llama_dir: Path, tmp_path: Path, changes: dict[str, object], sentence: str
) -> None:
    """The same reader decides for both, so import never accepts what a worker would refuse."""
    src = _with_config(tiny_llama_dir, tmp_path / "odd", **changes)
    with pytest.raises(ModelImportError, match=re.escape(sentence)):
        import_model("odd", src, tmp_path / "home")
    assert not (models_dir(tmp_path / "home") / "odd").exists()
    with pytest.raises(UnsupportedModelError, match=re.escape(sentence)):
        load_model(src, torch.float32, "cpu")


def test_cli_import_with_prices_adds_it_to_the_catalog(
    registry: RegistryProcess, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    env = {**registry.env, **registry.certs.env(Role.OPERATOR), "LORAPLEX_HOME": str(tmp_path)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "models",
            "import",
            "imported-tiny",
            "--from",
            str(tiny_llama_dir),
            "--input-price",
            "1.5",
            "--output-price",
            "6",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "registered base model imported-tiny" in done.stdout
    with registry.admin() as c:
        stored = {m.name: m for m in c.list_base_models()}["imported-tiny"]
    assert (stored.input_price_per_mtok, stored.output_price_per_mtok) == (1.5, 6.0)
    assert is_complete(tmp_path / "models" / "imported-tiny")
    # Half the prices is a usage error, caught before anything is copied.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "models",
            "import",
            "other",
            "--from",
            str(tiny_llama_dir),
            "--input-price",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--output-price" in done.stderr
    assert not (tmp_path / "models" / "other").exists()
