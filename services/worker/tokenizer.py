"""The model's Hugging Face tokenizer, built as AutoTokenizer builds it but without its detour.

AutoTokenizer first builds the model's config (config.json) to choose a class, and building a
config imports much of transformers' modelling stack (torch.distributed.tensor, accelerate): about
1.3 s, a quarter of a worker's cold start, for a class the tokenizer files usually name. When
tokenizer_config.json names the generic `TokenizersBackend`, brings no custom code (`auto_map`)
and the model type is not one AutoTokenizer overrides the declared class for, AutoTokenizer's
choice is that class (transformers 5's `AutoTokenizer.from_pretrained`), so it is built directly.
Anything else goes through AutoTokenizer. tests/unit/test_worker_tokenizer.py holds the two
equal on the test models, so a transformers upgrade that changes the choice fails there.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

GENERIC_CLASS = "TokenizersBackend"


def load_tokenizer(model_dir: Path) -> Any:
    if _declares_generic_class(model_dir):
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        return TokenizersBackend.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def copies(tokenizer: Any, n: int) -> list[Any]:
    """Independent copies (a fast tokenizer must not serve two threads at once); a deep copy is
    cheaper than reading the files again."""
    return [copy.deepcopy(tokenizer) for _ in range(n)]


def _declares_generic_class(model_dir: Path) -> bool:
    try:
        declared = json.loads((model_dir / "tokenizer_config.json").read_text())
        config = json.loads((model_dir / "config.json").read_text())
        from transformers.models.auto.tokenization_auto import MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
    except (OSError, ValueError, ImportError):
        return False
    if declared.get("tokenizer_class") != GENERIC_CLASS or "auto_map" in declared:
        return False
    overridden = MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
    return config.get("model_type") not in overridden and config.get("model_name") not in overridden
