"""DeepSeek-VL2 configurations: the official ``config.json`` format, the defaults it omits, and presets.

A DeepSeek-VL2 snapshot's ``config.json`` has three sub-configs (``vision_config``, ``projector_config``,
``language_config``) plus the tiling settings. The published files **omit** keys whose values then come from the
defaults of the classes shipped with the official code — not from transformers' generic ``DeepseekV2Config``, whose
defaults differ (32 layers; older releases vocab 32000) and would silently build the wrong small or base. Each
dataclass below carries the *official* defaults, so ``VL2Config.from_dict`` fills exactly what the official code
would. It also checks each field's JSON type and that sizes and counts are positive (:class:`ConfigFieldError`).

Presets:

======================  ==================================================================================
``deepseek-vl2-tiny``   3.37B total / 1.0B activated: MHA, softmax greedy router, vocab 129280, 12 layers
``deepseek-vl2-small``  16.1B / 2.8B: MLA (no q-LoRA), softmax greedy router, vocab 102400, 27 layers
``deepseek-vl2``        27.5B / 4.5B: MLA, sigmoid ``noaux_tc`` router with correction bias, 30 layers
``random-tiny``         same structure as tiny at a size a laptop CPU runs in seconds (uneven 6 heads)
``random-small``        same structure as small (MLA + softmax), small sizes
``random-base``         same structure as base (MLA + sigmoid noaux_tc, renormalised, scale 2.0)
======================  ==================================================================================

The random presets keep the real vision geometry (384 px, patch 14, a 27×27 grid), so token counts and tiling are
the real ones; only widths and depths shrink.

Lesson: notebook 01, section "1. Load the model".
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

# {(m·384, n·384) : m·n ≤ 9}, in the official order; the first entry sets the tile size.
CANDIDATE_RESOLUTIONS: list[list[int]] = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384], [768, 768],
    [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768], [384, 2688], [2688, 384],
    [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456], [3456, 384], [1152, 1152],
]


class ConfigError(ValueError):
    """A configuration that vl2lab cannot build a DeepSeek-VL2 from."""


class ConfigFieldError(ConfigError):
    """A DeepSeek-VL2 config with a field of the wrong JSON type or an impossible value (the message names it)."""


# JSON type of each field annotation: (accepted Python types, how the message names it)
_KINDS = {"str": ((str,), "a string"), "int": ((int,), "an integer"), "float": ((int, float), "a number"),
          "bool": ((bool,), "a boolean (true/false)"), "list": ((list,), "an array"), "dict": ((dict,), "an object")}


def _typed(klass, sub, where: str) -> dict:
    """The fields of ``klass`` found in the config.json object ``sub``, each checked against the field's type."""
    if not isinstance(sub, dict):
        raise ConfigFieldError(f"field {where.rstrip('.')} is {json.dumps(sub)} "
                               f"({_KINDS.get(type(sub).__name__, ((), 'null'))[1]}); expected an object {{...}}")
    out = {}
    for f in (f for f in dataclasses.fields(klass) if f.name in sub):
        v, optional, kind = sub[f.name], f.type.startswith("Optional["), f.type.removeprefix("Optional[").rstrip("]")
        ok = isinstance(v, _KINDS[kind][0]) and (kind == "bool") == isinstance(v, bool)
        if not (ok or (v is None and optional)):
            number = isinstance(v, str) and v.strip().lstrip("-").replace(".", "", 1).isdigit()
            raise ConfigFieldError(f"field {where}{f.name} is {json.dumps(v)} "
                                   f"({_KINDS.get(type(v).__name__, ((), 'null'))[1]}); expected "
                                   f"{'null or ' if optional else ''}{_KINDS[kind][1]}"
                                   + (f': write it without quotes, "{f.name}": {v.strip()}' if number else ""))
        out[f.name] = v
    return out


# Sizes and counts that must be > 0 (null where the field is optional: a dense model, MHA); other numbers ≥ 0.
_POSITIVE = {"vision_config": ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio"),
             "projector_config": ("input_dim", "n_embed", "depth", "mlp_ratio", "downsample_ratio"),
             "language_config": ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "ep_size",
                                 "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq",
                                 "max_position_embeddings", "kv_lora_rank")}


@dataclass
class VisionConfig:
    """SigLIP vision tower. Defaults are the official ``VisionEncoderConfig`` class defaults (SigLIP-L/16!),
    which is why every published config spells out the SO400M/14 values."""
    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    num_classes: int = 0
    layer_norm_eps: float = 1e-6
    model_type: str = "vision"

    @property
    def mlp_dim(self) -> int:
        """MLP hidden width, as timm computes it: int(width · mlp_ratio) (SO400M: int(1152·3.7362) = 4304)."""
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        """Patches per side: floor(384/14) = 27 (the last 6 pixel rows/columns are never seen)."""
        return self.image_size // self.patch_size


@dataclass
class ProjectorConfig:
    """2×2 space-to-depth downsample, then Linear → GELU → Linear (official ``MlpProjectorConfig`` defaults)."""
    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False
    model_type: str = "mlp_projector"


@dataclass
class LanguageConfig:
    """DeepSeekMoE language model. Defaults are the official ``configuration_deepseek.py`` ones."""
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: Optional[int] = None
    n_routed_experts: Optional[int] = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: Optional[int] = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "gready"  # sic: the official default; every MoE config sets it explicitly
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_mla: bool = True
    model_type: str = "deepseek_v2"

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer ``i`` is MoE when i ≥ first_k_dense_replace and i % moe_layer_freq == 0 (official rule)."""
        return self.is_moe and layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def head_dim(self) -> int:
        """MHA head width (tiny: 1280 / 10 = 128)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:
        """MLA query/key width per head: nope + rope (128 + 64 = 192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class VL2Config:
    """The whole DeepSeek-VL2: vision tower, projector, language model, and the tiling settings."""
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projector_config: ProjectorConfig = field(default_factory=ProjectorConfig)
    language_config: LanguageConfig = field(default_factory=LanguageConfig)
    candidate_resolutions: list = field(default_factory=lambda: copy.deepcopy(CANDIDATE_RESOLUTIONS))
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    torch_dtype: str = "bfloat16"
    model_type: str = "deepseek_vl_v2"
    name: str = "custom"

    # -- official format ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, name: str = "custom") -> "VL2Config":
        """Parse an official ``config.json`` dict; omitted keys take the official defaults, unknown keys are kept
        out (they do not change the computation)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("vision_config", "projector_config", "language_config") if k not in d]
        if missing or d.get("model_type", "deepseek_vl_v2") != "deepseek_vl_v2":
            raise ConfigError(
                f"not a DeepSeek-VL2 config (model_type={d.get('model_type')!r}, missing {missing}); "
                "expected the config.json of a deepseek-ai/deepseek-vl2[-tiny|-small] snapshot")

        subs = {"vision_config": VisionConfig, "projector_config": ProjectorConfig, "language_config": LanguageConfig}
        top = _typed(cls, {k: v for k, v in d.items() if k not in subs and k != "name"}, "")
        cfg = cls(**{k: klass(**_typed(klass, {} if d[k] is None else d[k], k + ".")) for k, klass in subs.items()},
                  **top)
        cfg.name = d.get("name", name) if name == "custom" else name
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        """The official ``config.json`` layout (every key written out, so no reader has to guess a default)."""
        d = dataclasses.asdict(self)
        d.pop("name")
        return d

    @classmethod
    def from_pretrained(cls, path: str) -> "VL2Config":
        """Read ``config.json`` from a snapshot folder."""
        fn = os.path.join(path, "config.json")
        if not os.path.isfile(fn):
            raise ConfigError(f"{path!r} has no config.json: not a DeepSeek-VL2 snapshot folder")
        try:
            with open(fn) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{fn} is not valid JSON ({e}); re-download or re-save the snapshot") from None
        try:
            return cls.from_dict(d, name=os.path.basename(os.path.normpath(path)))
        except ConfigFieldError as e:
            raise ConfigFieldError(f"{fn}: {e}; correct it (or re-download the snapshot's config.json)") from None

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    # -- checks ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        lm, v, p = self.language_config, self.vision_config, self.projector_config
        for sub, names in _POSITIVE.items():
            for n, x in dataclasses.asdict(getattr(self, sub)).items():
                if isinstance(x, (int, float)) and not isinstance(x, bool) and (x < 0 or (x == 0 and n in names)):
                    kind = "a positive " + ("integer" if isinstance(x, int) else "number") if n in names else ">= 0"
                    raise ConfigFieldError(f"field {sub}.{n} is {x!r}; it must be {kind}"
                                           + {"n_routed_experts": " (or null for a dense model)",
                                              "kv_lora_rank": " (or null for MHA)"}.get(n, ""))
        if lm.is_moe and not (lm.num_experts_per_tok and lm.num_experts_per_tok <= lm.n_routed_experts):
            raise ConfigFieldError(f"field language_config.num_experts_per_tok is {lm.num_experts_per_tok!r}; an MoE "
                                   f"model routes each token to 1..n_routed_experts ({lm.n_routed_experts}) experts")
        if p.n_embed != lm.hidden_size:
            raise ConfigFieldError(f"projector n_embed {p.n_embed} != language hidden_size {lm.hidden_size}")
        if p.input_dim != v.width:
            raise ConfigFieldError(f"projector input_dim {p.input_dim} != vision width {v.width}")
        if self.tile_tag != "2D" or self.global_view_pos != "head":
            raise ConfigFieldError("only tile_tag='2D' with global_view_pos='head' is supported (the published models)")
        if lm.is_moe and lm.topk_method not in ("greedy", "gready", "noaux_tc"):
            raise ConfigFieldError(f"router topk_method {lm.topk_method!r} is not one DeepSeek-VL2 uses "
                                   "(greedy or noaux_tc)")
        if lm.is_moe and lm.topk_method == "noaux_tc" and lm.scoring_func != "sigmoid":
            raise ConfigFieldError("noaux_tc routing needs scoring_func='sigmoid'")
        if not lm.use_mla and lm.hidden_size % lm.num_attention_heads:
            raise ConfigFieldError("MHA needs hidden_size divisible by num_attention_heads")
        if lm.use_mla and lm.q_lora_rank is not None:
            raise ConfigFieldError("MLA with q-LoRA is not used by any DeepSeek-VL2 variant (q_lora_rank must be null)")
        if lm.use_mla and not lm.kv_lora_rank:
            raise ConfigFieldError("field language_config.kv_lora_rank is null; MLA (use_mla: true) needs it > 0")

    def replace(self, **lang_overrides) -> "VL2Config":
        """A copy with some language-model fields changed (handy for experiments)."""
        c = copy.deepcopy(self)
        for k, v in lang_overrides.items():
            if not hasattr(c.language_config, k):
                raise ConfigError(f"unknown language_config field {k!r}")
            setattr(c.language_config, k, v)
        c.validate()
        return c


# -- presets: the published config.json contents (keys as published; omitted keys fall to the defaults above) --
_SO400M = {"model_name": "siglip_so400m_patch14_384", "model_type": "vision", "image_size": 384,
           "patch_size": 14, "width": 1152, "layers": 27, "mlp_ratio": 3.7362}
_MHA = {"use_mla": False, "kv_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "v_head_dim": 0}
_MOE = {"n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1}


def _projector(input_dim: int, n_embed: int, published: bool = True) -> dict:
    return {**({"model_type": "mlp_projector"} if published else {}), "projector_type": "downsample_mlp_gelu",
            "input_dim": input_dim, "n_embed": n_embed, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2}


_PUBLISHED: dict[str, dict[str, Any]] = {
    "deepseek-vl2-tiny": {
        "vision_config": _SO400M, "projector_config": _projector(1152, 1280),
        "language_config": {"model_type": "deepseek_v2", "vocab_size": 129280, "hidden_size": 1280,
                            "intermediate_size": 6848, "moe_intermediate_size": 896, "num_hidden_layers": 12,
                            "num_attention_heads": 10, "num_key_value_heads": 10, "n_routed_experts": 64,
                            "num_experts_per_tok": 6, **_MOE, "topk_method": "greedy", "q_lora_rank": None, **_MHA,
                            "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1},
    },
    "deepseek-vl2-small": {
        "vision_config": _SO400M, "projector_config": _projector(1152, 2048),
        "language_config": {"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
                            "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
                            "num_key_value_heads": 16, "n_routed_experts": 64, "num_experts_per_tok": 6, **_MOE,
                            "topk_method": "greedy", "use_mla": True, "q_lora_rank": None,
                            "max_position_embeddings": 4096},
    },
    "deepseek-vl2": {
        "vision_config": _SO400M, "projector_config": _projector(1152, 2560),
        "language_config": {"model_type": "deepseek_v2", "vocab_size": 129280, "hidden_size": 2560,
                            "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 72,
                            "num_experts_per_tok": 6, **_MOE, "topk_method": "noaux_tc",
                            "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.0,
                            "use_mla": True, "q_lora_rank": None, "max_position_embeddings": 4096,
                            "bos_token_id": 0, "eos_token_id": 1},
    },
}

_RANDOM_VISION = {"model_name": "siglip_random_patch14_384", "image_size": 384, "patch_size": 14, "width": 64,
                  "layers": 2, "heads": 4, "mlp_ratio": 2.0}
_RANDOM_LM_COMMON = {"vocab_size": 1024, "intermediate_size": 192, "moe_intermediate_size": 32,
                     "num_hidden_layers": 3, "num_experts_per_tok": 4, **_MOE, "max_position_embeddings": 4096,
                     "q_lora_rank": None, "bos_token_id": 0, "eos_token_id": 1}
_RANDOM_MLA = {"use_mla": True, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


def _random(n_embed: int, lm: dict) -> dict:
    return {"vision_config": _RANDOM_VISION, "projector_config": _projector(64, n_embed, published=False),
            "language_config": {**_RANDOM_LM_COMMON, **lm}, "torch_dtype": "float32"}


_PUBLISHED.update({
    # MHA with 6 heads: 4 ranks split them unevenly (2,2,1,1), as 10 heads of the real tiny split (3,3,2,2).
    "random-tiny": _random(96, {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 6,
                                "n_routed_experts": 16, "topk_method": "greedy", **_MHA}),
    "random-small": _random(64, {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
                                 "n_routed_experts": 16, "topk_method": "greedy", **_RANDOM_MLA}),
    "random-base": _random(64, {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
                                "n_routed_experts": 12, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                                "norm_topk_prob": True, "routed_scaling_factor": 2.0, **_RANDOM_MLA}),
})

# vl2-micro: the model the project trains itself (vl2lab/train/micro.py) on the shapes task of vl2lab/train/scenes.py
# and ships in vl2lab/assets/vl2-micro. Same structure as random-tiny (MHA with 6 heads, softmax greedy MoE, 2 shared
# experts), sized to learn in minutes on two CPU cores; vocabulary = the task tokenizer's 512 entries. The tower
# uses 24-pixel patches (a 16×16 grid, 8×8 image tokens per tile: 145 tokens for a one-tile image instead of 421),
# so training spends its time on many scenes rather than on many tokens per scene; the tiling is unchanged.
_PUBLISHED["vl2-micro"] = {
    "vision_config": {"model_name": "siglip_micro_patch24_384", "image_size": 384, "patch_size": 24, "width": 192,
                      "layers": 3, "heads": 3, "mlp_ratio": 2.0},
    "projector_config": _projector(192, 192, published=False),
    "language_config": {**_RANDOM_LM_COMMON, "vocab_size": 512, "hidden_size": 192, "intermediate_size": 384,
                        "num_attention_heads": 6, "num_key_value_heads": 6, "n_routed_experts": 16,
                        "num_experts_per_tok": 2, "topk_method": "greedy", **_MHA},
    "torch_dtype": "float32",
}

_ALIASES = {"tiny": "deepseek-vl2-tiny", "small": "deepseek-vl2-small", "base": "deepseek-vl2",
            "deepseek-vl2-base": "deepseek-vl2"}

PRESETS = tuple(_PUBLISHED)
REAL_PRESETS = ("deepseek-vl2-tiny", "deepseek-vl2-small", "deepseek-vl2")


def preset_name(name: str) -> str:
    """Canonical preset name (accepts ``deepseek-ai/…`` hub ids and the aliases tiny/small/base)."""
    key = name.split("/")[-1].lower() if isinstance(name, str) else name
    key = _ALIASES.get(key, key)
    if key not in _PUBLISHED:
        raise ConfigError(f"unknown DeepSeek-VL2 variant {name!r}; known presets: {', '.join(PRESETS)} "
                          f"(aliases: {', '.join(_ALIASES)}), or pass a snapshot folder")
    return key


def get_config(name: str) -> VL2Config:
    """A preset's config, parsed through the same path as a snapshot's config.json."""
    key = preset_name(name)
    return VL2Config.from_dict(copy.deepcopy(_PUBLISHED[key]), name=key)


def published_config_dict(name: str) -> dict:
    """The preset as its ``config.json`` was published (with the omitted keys still omitted)."""
    return copy.deepcopy(_PUBLISHED[preset_name(name)])
