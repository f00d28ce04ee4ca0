"""Real PEFT adapters for tests and benchmarks, built deterministically and cached.

`build_adapter` trains a few optimizer steps on fixed texts, so weights are what PEFT really
produces (B non-zero, DoRA magnitudes moved by training). `random_adapter` skips training for
benchmarks that need hundreds of adapters: it initialises PEFT on a weightless (meta) base and
fills the LoRA tensors from a seeded generator; the files are still written by PEFT itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.adapter_files import ADAPTER_FILES
from services.common.base_models import build_atomically

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Bump when the training recipe changes, so cached adapters from the old recipe are not reused.
RECIPE_VERSION = 2
TRAIN_STEPS = 5
# Far above a real fine-tune's rate: a handful of steps must move B well away from zero.
LEARNING_RATE = 5e-3
TRAIN_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "def add(a, b): return a + b",
    "LoRA adapters are small and cheap to serve.",
)


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    target_modules: tuple[str, ...]
    r: int
    lora_alpha: int
    use_dora: bool = False
    use_rslora: bool = False
    seed: int = 0

    def lora_config(self) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            target_modules=list(self.target_modules),
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )


SMOLLM2_TEST_ADAPTERS: tuple[AdapterSpec, ...] = (
    AdapterSpec("qv-r8", ("q_proj", "v_proj"), r=8, lora_alpha=16, seed=1),
    AdapterSpec("all-r16", ATTENTION + MLP, r=16, lora_alpha=32, seed=2),
    AdapterSpec("dora-r8", ("q_proj", "v_proj"), r=8, lora_alpha=16, use_dora=True, seed=3),
    AdapterSpec(
        "rslora-r16", ("q_proj", "k_proj", "v_proj", "o_proj"), r=16, lora_alpha=16, use_rslora=True, seed=4
    ),
    AdapterSpec("mlp-r64", MLP, r=64, lora_alpha=64, seed=5),
)

# LoRA on the edges (embed_tokens, lm_head): alone, with attention, with rsLoRA and DoRA.
SMOLLM2_EDGE_ADAPTERS: tuple[AdapterSpec, ...] = (
    AdapterSpec("embed-r8", ("embed_tokens",), r=8, lora_alpha=16, seed=21),
    AdapterSpec("head-rslora-r16", ("lm_head",), r=16, lora_alpha=8, use_rslora=True, seed=22),
    AdapterSpec("edges-attn-r8", ("embed_tokens", "lm_head", *ATTENTION), r=8, lora_alpha=16, seed=23),
    AdapterSpec("embed-dora-r8", ("embed_tokens", "v_proj"), r=8, lora_alpha=16, use_dora=True, seed=24),
    AdapterSpec("head-dora-r4", ("lm_head",), r=4, lora_alpha=8, use_dora=True, seed=25),
)

TINY_TEST_ADAPTERS: tuple[AdapterSpec, ...] = (
    AdapterSpec("qv-r4", ("q_proj", "v_proj"), r=4, lora_alpha=8, seed=11),
    AdapterSpec("all-r8", ATTENTION + MLP, r=8, lora_alpha=16, seed=12),
    AdapterSpec("dora-r4", ("q_proj", "v_proj", "o_proj"), r=4, lora_alpha=8, use_dora=True, seed=13),
    AdapterSpec("rslora-r8", ("q_proj", "v_proj", "down_proj"), r=8, lora_alpha=8, use_rslora=True, seed=14),
    AdapterSpec("mlp-r16", MLP, r=16, lora_alpha=32, seed=15),
)


def is_adapter_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in ADAPTER_FILES)


def model_name(model_dir: Path) -> str:
    """Catalog name of a model in the local cache: its directory name (`<home>/models/<name>`)."""
    return model_dir.resolve().name


def cache_key(model_dir: Path, spec: AdapterSpec) -> str:
    import peft

    config = (model_dir / "config.json").read_bytes()
    identity = {
        "recipe": RECIPE_VERSION,
        "peft": peft.__version__,
        "model": model_name(model_dir),
        "model_config_sha256": hashlib.sha256(config).hexdigest(),
        # Size rather than a hash of the weights: hashing hundreds of MB on every lookup is slow.
        "weights_bytes": (model_dir / "model.safetensors").stat().st_size,
        "spec": asdict(spec),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic, single-threaded torch for the block, restored afterwards.

    One thread fixes the order of float reductions, so the bytes do not depend on the core count
    (two threads give other bytes); it also keeps a shared, oversubscribed CPU from thrashing.
    """
    import torch

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(was_deterministic)


def _save(peft_model: PeftModel, model_dir: Path, out: Path) -> None:
    # PEFT would record the base's load path (a cache dir); the registry matches adapters against
    # the catalog name. The model card reads it from the base config, hence both.
    name = model_name(model_dir)
    base: Any = peft_model.get_base_model()
    base.name_or_path = name
    base.config._name_or_path = name
    peft_model.peft_config["default"].base_model_name_or_path = name
    # Embeddings are never trained here; "auto" would look the base up on the model hub.
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)


def _train(model_dir: Path, spec: AdapterSpec, out: Path) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(list(TRAIN_TEXTS), return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with _deterministic(spec.seed):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(base, spec.lora_config())
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
        for _ in range(TRAIN_STEPS):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _save(model, model_dir, out)


def build_adapter(model_dir: Path, spec: AdapterSpec, cache_dir: Path) -> Path:
    """A trained PEFT adapter dir for `spec` on the model at `model_dir`, built once per cache."""
    key = cache_key(model_dir, spec)
    dest = cache_dir / f"{model_name(model_dir)}--{spec.name}--{key[:16]}"
    return build_atomically(dest, lambda tmp: _train(model_dir, spec, tmp), done=is_adapter_dir)


def random_adapter(model_dir: Path, spec: AdapterSpec, out_dir: Path) -> Path:
    """A PEFT adapter with seeded random A and non-zero B, written to `out_dir`, in well under a second."""
    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    # Base and PEFT's own LoRA init both on meta: nothing is allocated until the seeded fill below.
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(base, spec.lora_config())
    generator = torch.Generator().manual_seed(spec.seed)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        for path, layer in model.get_base_model().named_modules():
            if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
                continue
            linear = layer.get_base_layer()
            assert isinstance(linear, nn.Linear), f"{path} is not a linear layer"
            fan_in, fan_out = linear.in_features, linear.out_features
            # A as PEFT's kaiming-uniform init would draw it; B small but clearly non-zero.
            lora_a = (torch.rand(spec.r, fan_in, generator=generator) * 2 - 1) / fan_in**0.5
            lora_b = torch.randn(fan_out, spec.r, generator=generator) * 0.02
            layer.lora_A["default"].weight = nn.Parameter(lora_a)
            layer.lora_B["default"].weight = nn.Parameter(lora_b)
            if spec.use_dora:
                # DoRA's magnitude starts as the row norm of the adapted weight (PEFT's own init).
                weight = weights.get_tensor(f"{path}.weight").float()
                adapted = weight + layer.scaling["default"] * lora_b @ lora_a
                magnitude = adapted.norm(p=2, dim=1)
                layer.lora_magnitude_vector["default"].weight = nn.Parameter(magnitude)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save(model, model_dir, out_dir)
    return out_dir
