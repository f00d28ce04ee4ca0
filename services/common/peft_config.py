"""A PEFT LoRA adapter_config.json, read once, with PEFT's own semantics.

The one place loraplex interprets adapter_config.json: the registry validates adapters with it and
the worker computes each module's rank and scale with it, so the two can never disagree. Pure:
no torch, no PEFT import (the unit tests compare it against PEFT's own functions).

The semantics are those of the PEFT version loraplex is tested against (peft 0.21.2):
- which modules an adapter targets: `peft.tuners.tuners_utils.check_target_module_exists`, with
  `target_modules` a list (a module matches when its full name equals an entry or ends with "." +
  entry), a regex string (`re.fullmatch` on the full name, `peft.utils.other.match_target_against_key`)
  or "all-linear" (every linear layer but the output layer, `_maybe_include_all_linear_layers`);
  `exclude_modules` the same way; `layers_to_transform`/`layers_pattern` (list targets only, and
  only for entries matched by suffix, not for an entry equal to the module's full name);
- each module's rank and alpha: `peft.utils.other.get_pattern_key`, the first `rank_pattern` /
  `alpha_pattern` key (a regex) for which `re.match(rf"(.*\\.)?({key})$", full_name)` holds; so
  "q_proj", "self_attn.q_proj" and "model.layers.3.mlp.down_proj" all work as PEFT's docs write them;
- the scale: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (`LoraLayer.update_layer`),
  also for DoRA, whose magnitude vectors the weights carry.
Full names are module paths in the base model as `named_modules()` spells them, e.g.
"model.layers.3.self_attn.q_proj" (PEFT's `current_key`). The token embeddings
("model.embed_tokens", not linear: PEFT's embedding LoRA) and lm_head (linear, the output layer)
are asked the same questions; "all-linear" takes neither, as in PEFT.

Every other field LoraConfig writes is either honoured (see FIELDS) or, where it changes what the
weights mean and loraplex does not serve it, refused with a sentence naming the field.

The patterns come from tenants. PEFT matches them with `re`, which backtracks without limit: a
pattern such as "(.*)*x" takes minutes on a 32-character module name and holds the GIL while it
does. So each pattern is compiled with `re` (what PEFT accepts, and the same syntax errors), but
matched with the `regex` package (its default VERSION0 is `re`-compatible and it is already
installed with transformers), under a time budget per config: past MATCH_BUDGET_S of matching, the
adapter is refused with a sentence.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import regex

from services.common.adapter_errors import AdapterRejected

Variant = Literal["LORA", "RSLORA", "DORA"]
ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND (compared lower-cased)
# PEFT condenses target_modules lists this long into suffixes before matching (tuners_utils).
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's, for ensure_weight_tying

# Fields of peft 0.21.2's LoraConfig that loraplex honours, or that do not change the served
# model (training-only settings and bookkeeping). Anything else is refused below.
HONOURED_FIELDS = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "use_dora",
        "bias",  # "none" only (checked)
        "init_lora_weights",  # base-mutating initialisations refused (checked)
        # PEFT itself sets fan_in_fan_out to False on nn.Linear targets (with a warning), and every
        # layer loraplex adapts is an nn.Linear: honoured by ignoring it, as PEFT does.
        "fan_in_fan_out",
    }
)
INERT_FIELDS = frozenset(
    {
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",  # the registry compares it with the chosen base model
        "revision",
        "inference_mode",
        "lora_dropout",  # training only
        "megatron_core",  # a module name, used only with megatron_config
        "loftq_config",  # used only with init_lora_weights="loftq" (refused)
        "eva_config",  # initialisation only: the saved weights are what they are
        "corda_config",  # used only with init_lora_weights="corda" (refused)
        "lora_ga_config",  # used only with init_lora_weights="lora_ga" (refused)
        "qalora_group_size",  # used only with use_qalora (refused)
        "runtime_config",  # ephemeral GPU offload of the trainer
        # Ties the adapters of tied input and output embeddings: refused where it applies (below).
        "ensure_weight_tying",
    }
)
# Fields whose non-default (truthy) value changes what the weights mean; loraplex serves none.
REFUSED_FIELDS: dict[str, str] = {
    "modules_to_save": "fully trained copies of modules (modules_to_save)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "megatron_config": "Megatron-parallel layers (megatron_config)",
}
# Initialisations that subtract the adapter from the base weights: the adapter alone is not a delta.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Seconds of pattern matching one config may cost, all questions together (a real config needs
# microseconds per module: a few hundred modules and a handful of patterns).
MATCH_BUDGET_S = 2.0


class _Matcher:
    """Pattern matching with a time budget shared by every question asked of one config."""

    def __init__(self, budget_s: float = MATCH_BUDGET_S) -> None:
        self.left_s = budget_s

    def match(self, pattern: str, text: str, *, full: bool, field: str) -> bool:
        return self.find(pattern, text, full=full, field=field) is not None

    def find(self, pattern: str, text: str, *, full: bool, field: str) -> Any:
        """The match object (or None) of `pattern` at the start of `text` (all of it if `full`)."""
        compiled = _compiled_bounded(pattern, field)
        started = time.monotonic()
        try:
            if full:
                found = compiled.fullmatch(text, timeout=max(self.left_s, 1e-3))
            else:
                found = compiled.match(text, timeout=max(self.left_s, 1e-3))
        except TimeoutError:
            self.left_s = 0.0
            raise AdapterRejected(
                f"matching {field} pattern {_brief(pattern)} against the model's module names takes "
                f"too long (it backtracks exponentially); simplify the regular expression."
            ) from None
        self.left_s -= time.monotonic() - started
        if self.left_s <= 0:
            raise AdapterRejected(
                f"matching adapter_config.json's patterns ({field}) against the model's module names "
                f"takes over {MATCH_BUDGET_S:g} s; simplify the regular expressions."
            )
        return found


@dataclass(frozen=True)
class ModuleLora:
    """What the adapter does at one module: PEFT's r, lora_alpha and scaling there."""

    rank: int
    alpha: float
    scale: float
    dora: bool


@dataclass(frozen=True)
class PeftLoraConfig:
    r: int
    lora_alpha: float
    # A list as a frozenset of entries, or a regex string, or ALL_LINEAR.
    target_modules: frozenset[str] | str
    exclude_modules: frozenset[str] | str | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    rank_pattern: tuple[tuple[str, int], ...]  # in the file's order: the first match wins
    alpha_pattern: tuple[tuple[str, float], ...]
    use_rslora: bool
    use_dora: bool
    _matcher: _Matcher = field(default_factory=_Matcher, compare=False, repr=False)

    @property
    def variant(self) -> Variant:
        """DoRA wins the label when both flags are set (its scale is still rsLoRA's)."""
        return "DORA" if self.use_dora else "RSLORA" if self.use_rslora else "LORA"

    @property
    def all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def targets(self, name: str, *, linear: bool = True, output_layer: bool = False) -> bool:
        """Whether PEFT puts a LoRA layer on the module called `name` (its full name).

        `linear`/`output_layer` describe the module, for "all-linear" (which PEFT expands to every
        nn.Linear but the model's output embeddings)."""
        if self._excluded(name):
            return False
        if self.all_linear:
            return linear and not output_layer
        if isinstance(self.target_modules, str):
            return self._matcher.match(self.target_modules, name, full=True, field="target_modules")
        if name in self.target_modules:
            return True  # a full name: PEFT applies no layer filter to it
        if not any(name.endswith(f".{entry}") for entry in self.target_modules):
            return False
        if not self._uses_layer_indexes:
            return True
        index = self.layer_index(name)
        if index is None:
            return False
        if isinstance(self.layers_to_transform, int):
            return index == self.layers_to_transform
        return index in (self.layers_to_transform or ())

    @property
    def _uses_layer_indexes(self) -> bool:
        indexes = self.layers_to_transform
        return indexes is not None and (len(indexes) != 0 if isinstance(indexes, tuple) else True)

    def layer_index(self, name: str) -> int | None:
        """The layer index PEFT reads off a module name (the first numbered segment)."""
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)  # PEFT's, fixed: no tenant input
            return int(match.group("idx")) if match else None
        for pattern in self.layers_pattern:
            found = self._matcher.find(_layer_regex(pattern), name, full=False, field="layers_pattern")
            if found is not None:
                return int(found.group("idx"))
        return None

    def rank(self, name: str) -> int:
        return self._pattern_value(self.rank_pattern, name, self.r, "rank_pattern")

    def alpha(self, name: str) -> float:
        return self._pattern_value(self.alpha_pattern, name, self.lora_alpha, "alpha_pattern")

    def scale(self, name: str) -> float:
        """PEFT's `scaling`: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        r, alpha = self.rank(name), self.alpha(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def module(self, name: str, *, linear: bool = True, output_layer: bool = False) -> ModuleLora | None:
        """The adapter at the module `name` (a linear layer unless `linear` is False, as for the
        token embeddings; the output layer for lm_head), or None where it does not target it."""
        if not self.targets(name, linear=linear, output_layer=output_layer):
            return None
        return ModuleLora(self.rank(name), self.alpha(name), self.scale(name), self.use_dora)

    def _pattern_value(
        self, pattern: tuple[tuple[str, Any], ...], name: str, default: Any, field: str
    ) -> Any:
        # PEFT: pattern.get(get_pattern_key(pattern.keys(), name), default): the first key that
        # matches; a key equal to the full name that matches nothing earlier is the same key.
        for key, value in pattern:
            if self._matcher.match(_suffix_regex(key), name, full=False, field=field):
                return value
        return next((value for key, value in pattern if key == name), default)

    def _excluded(self, name: str) -> bool:
        exclude = self.exclude_modules
        if not exclude:
            return False
        if isinstance(exclude, str):
            return self._matcher.match(exclude, name, full=True, field="exclude_modules")
        return name in exclude or any(name.endswith(f".{entry}") for entry in exclude)


def block_module_name(layers_prefix: str, layer: int, path: str) -> str:
    """The full name of the linear layer `path` ("self_attn.q_proj") of block `layer`."""
    return f"{layers_prefix}.{layer}.{path}"


def get_pattern_key(pattern_keys: Iterable[str], name: str) -> str:
    """peft.utils.other.get_pattern_key (0.21.2): the first key that matches a dotted suffix of
    `name` as a regex, else `name` itself (matched as PeftLoraConfig matches, within a budget)."""
    matcher = _Matcher()
    for key in pattern_keys:
        if matcher.match(_suffix_regex(key), name, full=False, field="pattern key"):
            return key
    return name


def _suffix_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"  # get_pattern_key's


def _layer_regex(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."  # check_target_module_exists'


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@lru_cache(maxsize=4096)
def _compiled_bounded(pattern: str, field: str) -> Any:
    _check_regex(pattern, field)  # re's verdict on the syntax first: what PEFT refuses stays refused
    try:
        return regex.compile(pattern)
    except regex.error as exc:
        raise AdapterRejected(
            f"{field} entry {_brief(pattern)} in adapter_config.json is not a regular expression "
            f"loraplex can match safely ({exc}); simplify it."
        ) from None


# ---------------------------------------------------------------------------------- parsing


def parse_peft_config(doc: Mapping[str, Any]) -> PeftLoraConfig:
    """adapter_config.json's object -> PeftLoraConfig, or AdapterRejected with a sentence a user
    can act on (naming the field) for anything loraplex would serve differently from PEFT."""
    peft_type = doc.get("peft_type")
    if peft_type != "LORA":
        raise AdapterRejected(
            f"adapter_config.json has peft_type {peft_type!r}; loraplex serves only LoRA adapters "
            f'(peft_type "LORA", including rsLoRA and DoRA).'
        )
    _refuse_unserved(doc)
    r = doc.get("r", 8)
    if not _is_int(r) or r <= 0:
        raise AdapterRejected(f"adapter_config.json has r={r!r}; it must be a positive integer.")
    alpha = doc.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise AdapterRejected(f"adapter_config.json has lora_alpha={alpha!r}; it must be a number.")
    targets = _target_modules(doc.get("target_modules"))
    layers_to_transform, layers_pattern = _layers(doc, targets)
    return PeftLoraConfig(
        r=int(r),
        lora_alpha=float(alpha),
        target_modules=targets,
        exclude_modules=_exclude_modules(doc.get("exclude_modules")),
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        rank_pattern=_pattern(doc, "rank_pattern", rank=True),
        alpha_pattern=_pattern(doc, "alpha_pattern", rank=False),
        use_rslora=_flag(doc, "use_rslora"),
        use_dora=_flag(doc, "use_dora"),
    )


def _refuse_unserved(doc: Mapping[str, Any]) -> None:
    for key, feature in REFUSED_FIELDS.items():
        if doc.get(key):
            raise AdapterRejected(
                f"adapter_config.json enables {feature}, which loraplex does not serve; train a plain "
                f"LoRA, rsLoRA or DoRA adapter instead."
            )
    for key, value in doc.items():
        if key in HONOURED_FIELDS or key in INERT_FIELDS or key in REFUSED_FIELDS:
            continue
        if value not in (None, False, 0, "", [], {}):
            raise AdapterRejected(
                f"adapter_config.json sets {key}={_brief(value)}, a field loraplex does not know (from a "
                f"newer PEFT?) and that may change what the weights mean; it serves plain LoRA, rsLoRA "
                f"(use_rslora) and DoRA (use_dora), so retrain or remove the field."
            )
    if doc.get("ensure_weight_tying") and _targets_embedding_layers(doc.get("target_modules")):
        raise AdapterRejected(
            "adapter_config.json sets ensure_weight_tying with embed_tokens or lm_head among its "
            "target_modules: PEFT then shares one LoRA between the tied input and output embeddings, "
            "which loraplex does not serve; retrain with ensure_weight_tying=False (separate LoRAs on "
            "embed_tokens and lm_head are served, also on models that tie their embeddings)."
        )
    bias = doc.get("bias", "none")
    if bias != "none":
        raise AdapterRejected(
            f"adapter_config.json has bias={bias!r}; loraplex serves adapters that leave the base "
            f'model\'s biases frozen, so retrain with bias="none".'
        )
    init = doc.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise AdapterRejected(
            f"the adapter was initialised with init_lora_weights={init!r}, which also changes the base "
            f"weights, so it is not a delta on the shared base; convert it to a plain LoRA with PEFT's "
            f"save_pretrained(..., path_initial_model_for_weight_conversion=...)."
        )


def _targets_embedding_layers(raw: object) -> bool:
    """PEFT's is_embedding_in_target (BaseTuner._check_tied_modules): a list entry whose last dotted
    part is embed_tokens or lm_head, or a regex that fully matches one of those bare names."""
    if isinstance(raw, str):
        return any(_safe_fullmatch(raw, name) for name in EMBEDDING_LAYER_NAMES)
    if isinstance(raw, list):
        return any(isinstance(t, str) and t.split(".")[-1] in EMBEDDING_LAYER_NAMES for t in raw)
    return False


def _safe_fullmatch(pattern: str, text: str) -> bool:
    try:
        return _Matcher().match(pattern, text, full=True, field="target_modules")
    except AdapterRejected:
        return False  # an invalid or runaway pattern is refused with its own sentence later


def _target_modules(raw: object) -> frozenset[str] | str:
    if isinstance(raw, str):
        if raw.lower() != ALL_LINEAR:
            _check_regex(raw, "target_modules")
        return raw
    if isinstance(raw, list) and raw and all(isinstance(t, str) and t for t in raw):
        return frozenset(raw)
    if raw is None or raw == []:
        raise AdapterRejected(
            "adapter_config.json has no target_modules; PEFT's save_pretrained writes the modules it "
            "adapted there, so save the adapter with PEFT (or list the modules it targets)."
        )
    raise AdapterRejected(
        f"adapter_config.json has target_modules={_brief(raw)}; it must be a list of module names, "
        f'a regular expression, or "all-linear".'
    )


def _exclude_modules(raw: object) -> frozenset[str] | str | None:
    if raw is None or raw == []:
        return None
    if isinstance(raw, str):
        _check_regex(raw, "exclude_modules")
        return raw
    if isinstance(raw, list) and all(isinstance(t, str) for t in raw):
        return frozenset(raw)
    raise AdapterRejected(
        f"adapter_config.json has exclude_modules={_brief(raw)}; it must be a list of module names or "
        f"a regular expression."
    )


def _layers(
    doc: Mapping[str, Any], targets: frozenset[str] | str
) -> tuple[int | tuple[int, ...] | None, tuple[str, ...] | None]:
    raw_layers, raw_pattern = doc.get("layers_to_transform"), doc.get("layers_pattern")
    # The same refusals as LoraConfig.__post_init__ ("all-linear" is a string too).
    if isinstance(targets, str) and (raw_layers is not None or raw_pattern is not None):
        raise AdapterRejected(
            "adapter_config.json sets layers_to_transform or layers_pattern with a string "
            f"target_modules ({_brief(targets)}); PEFT refuses that combination, so list the modules "
            "or put the layers into the regular expression."
        )
    if raw_pattern and raw_layers is None:
        raise AdapterRejected(
            "adapter_config.json sets layers_pattern without layers_to_transform; PEFT refuses that, "
            "so set both or neither."
        )
    layers: int | tuple[int, ...] | None
    if raw_layers is None or _is_int(raw_layers):
        layers = raw_layers
    elif isinstance(raw_layers, list) and all(_is_int(i) for i in raw_layers):
        layers = tuple(raw_layers)
    else:
        raise AdapterRejected(
            f"adapter_config.json has layers_to_transform={_brief(raw_layers)}; it must be a layer "
            f"index or a list of them."
        )
    pattern: tuple[str, ...] | None
    if raw_pattern is None or raw_pattern in ("", []):
        pattern = None
    elif isinstance(raw_pattern, str):
        pattern = (raw_pattern,)
    elif isinstance(raw_pattern, list) and all(isinstance(p, str) for p in raw_pattern):
        pattern = tuple(raw_pattern)
    else:
        raise AdapterRejected(
            f"adapter_config.json has layers_pattern={_brief(raw_pattern)}; it must be a name like "
            f'"layers" or a list of them.'
        )
    for p in pattern or ():
        _check_regex(_layer_regex(p), "layers_pattern", shown=p)
    if (
        layers is not None
        and not isinstance(targets, str)
        and len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION
        and any("." in t for t in targets)
    ):
        # PEFT applies layers_to_transform to suffix matches only, not to an entry equal to a
        # module's full name; but it first condenses lists of 20 or more entries into suffixes
        # (_find_minimal_target_modules), which the layer filter then applies to. What such a list
        # targets depends on every module name of the model: loraplex will not guess.
        raise AdapterRejected(
            f"adapter_config.json combines layers_to_transform with {len(targets)} target_modules "
            "entries, some dotted; PEFT condenses such lists first and then filters them by layer or "
            "not depending on the model, so list plain module names (q_proj) or spell the layers in "
            "a regular expression."
        )
    return layers, pattern


def _pattern(doc: Mapping[str, Any], field: str, *, rank: bool) -> tuple[tuple[str, Any], ...]:
    raw = doc.get(field) or {}
    if not isinstance(raw, dict):
        raise AdapterRejected(f"{field} in adapter_config.json must be a JSON object.")
    out: list[tuple[str, Any]] = []
    for key, value in raw.items():
        _check_regex(_suffix_regex(key), field, shown=key)
        if rank and (not _is_int(value) or value <= 0):
            raise AdapterRejected(f"{field} gives {key!r} r={value!r}; it must be a positive integer.")
        if not rank and not _is_number(value):
            raise AdapterRejected(f"{field} gives {key!r} lora_alpha={value!r}; it must be a number.")
        out.append((key, int(value) if rank else float(value)))
    return tuple(out)


def _flag(doc: Mapping[str, Any], field: str) -> bool:
    value = doc.get(field, False)
    if not isinstance(value, bool):
        raise AdapterRejected(f"adapter_config.json has {field}={_brief(value)}; it must be true or false.")
    return value


def _check_regex(pattern: str, field: str, *, shown: str | None = None) -> None:
    try:
        _compiled(pattern)
    except re.error as exc:
        raise AdapterRejected(
            f"{field} entry {shown if shown is not None else pattern!r} in adapter_config.json is not a "
            f"valid regular expression ({exc})."
        ) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _brief(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
