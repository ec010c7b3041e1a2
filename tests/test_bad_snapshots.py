"""Bad snapshot folders (issue 16): each gets ONE clear error (what is wrong, what to do) before any weight is read,
or, for a folder that loads but is not whole or not sound, one warning that says so."""
from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

from vl2lab.inputs.tokenizer import TokenizerError, load_tokenizer
from vl2lab.model import build_model
from vl2lab.model.config import ConfigError, ConfigFieldError, VL2Config, get_config, published_config_dict
from vl2lab.weights import pretrained
from vl2lab.weights.pretrained import (CheckpointError, SnapshotWarning, load_pretrained, load_processor,
                                       read_config, save_pretrained, shipped_micro)


def _copy(src, tmp_path, name="snap"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, name, change):
    fn = os.path.join(path, name)
    with open(fn) as f:
        d = json.load(f)
    change(d)
    with open(fn, "w") as f:
        json.dump(d, f)


def _snapshot_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [w for w in seen if issubclass(w.category, SnapshotWarning)]


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if the loader opens the weights (the error must come before)."""
    def refuse(*a, **k):
        raise AssertionError("the weights were opened before the bad input was reported")
    monkeypatch.setattr(pretrained, "SnapshotReader", refuse)


# ----------------------------------------------------------------------------------------- 1. no tokenizer.json
def test_weights_only_folder_warns_once_and_says_what_to_copy(tmp_path):
    save_pretrained(build_model("random-tiny", seed=0), str(tmp_path))
    (model, processor), seen = _snapshot_warnings(load_pretrained, str(tmp_path))
    assert processor is None and model is not None                  # still loadable from Python
    assert len(seen) == 1
    msg = str(seen[0].message)
    assert str(tmp_path) in msg and "no tokenizer.json (a weights-only folder)" in msg
    assert "Copy tokenizer.json, tokenizer_config.json, special_tokens_map.json, processor_config.json" in msg
    assert seen[0].filename == __file__                              # points at the caller's line
    with pytest.raises(CheckpointError, match="has no tokenizer.json.*Copy tokenizer.json"):
        load_processor(str(tmp_path), required=True)


def test_incomplete_download_without_tokenizer_is_named(tiny_snapshot, tmp_path):
    path = _copy(tiny_snapshot, tmp_path)
    os.remove(os.path.join(path, "tokenizer.json"))
    with pytest.warns(SnapshotWarning, match=r"the download is incomplete \(tokenizer_config.json, "
                                             r"special_tokens_map.json, processor_config.json came"):
        _, processor = load_pretrained(path)
    assert processor is None


def test_complete_snapshot_loads_without_warnings(tiny_snapshot):
    (_, processor), seen = _snapshot_warnings(load_pretrained, tiny_snapshot)
    assert processor is not None and not seen


# ----------------------------------------------------------------------------------------- 2. corrupt processor files
@pytest.mark.parametrize("name, content, match", [
    ("tokenizer.json", '{"version": "1.0", "trunc', r"tokenizer\.json cannot be read as a tokenizer \(EOF while "
                                                      r"parsing.*truncated or corrupt: download it again, or copy "
                                                      r"tokenizer\.json from the snapshot it came from"),
    ("tokenizer.json", '{"version": "1.0"}', r"tokenizer\.json cannot be read as a tokenizer"),
    ("tokenizer_config.json", '{"add_bos_token": tr', r"tokenizer_config\.json is not valid JSON.*download it again"),
    ("processor_config.json", "[1, 2", r"processor_config\.json is not valid JSON.*truncated or corrupt"),
    ("processor_config.json", '{"patch_size": "14"}', r'processor_config\.json: field patch_size is "14"; expected '
                                                       r"an integer; correct it, or copy processor_config\.json"),
    ("processor_config.json", '{"candidate_resolutions": [[384, 384], [500, 384]]}',
     r"processor_config\.json: candidate_resolutions is .*multiple of the first width"),
    ("processor_config.json", '{"image_std": [0.5, 0, 0.5]}', r"field image_std .*3 numbers, none of them 0"),
])
def test_corrupt_processor_file_fails_before_the_weights(tiny_snapshot, tmp_path, no_weight_reads, name, content,
                                                         match):
    path = _copy(tiny_snapshot, tmp_path)
    with open(os.path.join(path, name), "w") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=match) as err:
        load_pretrained(path)
    assert os.path.join(path, name) in str(err.value)
    with pytest.raises(CheckpointError, match=match):
        read_config(path)                                            # what load_sharded / load_layer_split call first


def test_load_tokenizer_names_the_corrupt_file(tiny_snapshot, tmp_path):
    path = _copy(tiny_snapshot, tmp_path)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write('{"model": ')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json cannot be read as a tokenizer \(EOF"):
        load_tokenizer(path)


def test_another_models_tokenizer_fails_before_the_weights(tiny_snapshot, tmp_path, no_weight_reads):
    path = _copy(tiny_snapshot, tmp_path)
    other = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))   # no DeepSeek-VL2 tokens
    other.save(os.path.join(path, "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json lacks the special token\(s\) \['<image>', "
                                              r"'<\|User\|>', '<\|Assistant\|>'\]: not a DeepSeek-VL2 tokenizer"):
        load_pretrained(path)


# ----------------------------------------------------------------------------------------- 3. NaN / Inf weights
def _rewrite(path, change):
    fn = os.path.join(path, "model.safetensors")
    with safe_open(fn, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, fn, metadata={"format": "pt"})
    return tensors


def test_nonfinite_weights_warn_once_naming_them(tiny_snapshot, tmp_path):
    path = _copy(tiny_snapshot, tmp_path)
    bad = ["vision.blocks.0.attn.qkv.weight", "language.model.layers.1.mlp.experts.5.up_proj.weight",
           "language.lm_head.weight"]

    def spoil(t):
        t[bad[0]][3, 4] = float("nan")
        t[bad[1]][0, 0] = float("inf")
        t[bad[2]][-1, -1] = -float("inf")
        t["language.model.norm.weight"].fill_(3e38)                  # finite, but its sum overflows: no warning
    _rewrite(path, spoil)
    (model, _), seen = _snapshot_warnings(load_pretrained, path)
    assert len(seen) == 1
    msg = str(seen[0].message)
    assert msg.startswith(f"3 tensor(s) read from {path} hold NaN or Inf, e.g. [")
    assert all(k in msg for k in bad) and "download them again" in msg
    assert torch.isnan(model.vision.encoder.layers[0].self_attn.q_proj.weight).any()   # loaded as it is


def test_all_nan_weights_warn(tiny_snapshot, tmp_path):
    path = _copy(tiny_snapshot, tmp_path)
    tensors = _rewrite(path, lambda t: [v.fill_(float("nan")) for v in t.values()])
    with pytest.warns(SnapshotWarning, match=rf"^{len(tensors)} tensor\(s\) read from .* hold NaN or Inf"):
        load_pretrained(path)


# ----------------------------------------------------------------------------------------- 4. misleading messages
def test_other_variants_config_names_both_sizes(tmp_path):
    """tiny's config.json on micro's weights: not "download it again" but what each side says."""
    path = str(tmp_path / "mixed")
    os.makedirs(path)
    micro = shipped_micro()
    for f in os.listdir(micro):
        if f.endswith(".safetensors"):
            os.symlink(os.path.join(micro, f), os.path.join(path, f))
    get_config("deepseek-vl2-tiny").save(path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path)
    msg = str(err.value)
    assert "the weights and config.json describe different variants: config.json says hidden_size 1280" in msg
    assert "the weights have hidden_size 192" in msg and "(the sizes of the vl2-micro preset)" in msg
    assert "get_config('vl2-micro').save(folder)" in msg and "downloading again will not help" in msg


def test_other_variants_config_same_tensor_names(tiny_snapshot, tmp_path):
    path = _copy(tiny_snapshot, tmp_path)
    get_config("random-small").save(path)                             # MLA: other tensor names, other widths
    with pytest.raises(CheckpointError, match=r"different variants: config.json says hidden_size 64.*the weights "
                                              r"have hidden_size 96.*random-tiny preset"):
        load_pretrained(path)


def test_lost_layers_still_say_incomplete(tiny_snapshot, tmp_path):
    path = _copy(tiny_snapshot, tmp_path)
    _rewrite(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("language.model.layers.2.")])
    with pytest.raises(CheckpointError, match=r"tensor\(s\) missing.*incomplete: download its weight files again"):
        load_pretrained(path)


@pytest.mark.parametrize("section, field, value, match", [
    ("language_config", "hidden_size", "192", r'field language_config\.hidden_size is "192" \(a string\); expected '
                                              r'an integer: write it without quotes, "hidden_size": 192'),
    ("language_config", "use_mla", 0, r"field language_config\.use_mla is 0 \(an integer\); expected a boolean"),
    ("language_config", "kv_lora_rank", "32", r"kv_lora_rank is \"32\" \(a string\); expected null or an integer"),
    ("vision_config", "mlp_ratio", [2], r"field vision_config\.mlp_ratio is \[2\] \(an array\); expected a number"),
    ("language_config", "n_routed_experts", -4, r"field language_config\.n_routed_experts is -4; it must be a "
                                                r"positive integer \(or null for a dense model\)"),
    ("vision_config", "layers", 0, r"field vision_config\.layers is 0; it must be a positive integer"),
    ("language_config", "num_experts_per_tok", 17, r"num_experts_per_tok is 17; an MoE model routes each token to "
                                                   r"1\.\.n_routed_experts \(16\)"),
    ("language_config", "first_k_dense_replace", -1, r"first_k_dense_replace is -1; it must be >= 0"),
    (None, "torch_dtype", 16, r"field torch_dtype is 16 \(an integer\); expected a string"),
    (None, "vision_config", [], r"field vision_config is \[\] \(an array\); expected an object"),
])
def test_config_fields_are_checked(tiny_snapshot, tmp_path, no_weight_reads, section, field, value, match):
    path = _copy(tiny_snapshot, tmp_path)
    _edit_json(path, "config.json", lambda d: (d[section] if section else d).__setitem__(field, value))
    with pytest.raises(CheckpointError, match=match) as err:
        load_pretrained(path)
    assert str(err.value).startswith(os.path.join(path, "config.json") + ": field ")
    assert "correct it (or re-download the snapshot's config.json)" in str(err.value)


def test_config_field_errors_from_python():
    d = published_config_dict("random-tiny")
    d["language_config"] = {**d["language_config"], "num_hidden_layers": True}
    with pytest.raises(ConfigFieldError, match="num_hidden_layers is true .*expected an integer"):
        VL2Config.from_dict(d)
    assert issubclass(ConfigFieldError, ConfigError)
    with pytest.raises(ConfigFieldError, match="n_routed_experts is -1"):
        get_config("random-tiny").replace(n_routed_experts=-1)


@pytest.mark.parametrize("path, match", [
    ("/no/such/place/snap", r"the folder '/no/such/place/snap' does not exist \(the deepest existing folder on that "
                            r"path is '/'\): load_pretrained reads a snapshot folder"),
    ("./no-such-snapshot", r"the folder './no-such-snapshot' does not exist"),
    ("/no/such/deepseek-vl2-tiny", r"the folder '/no/such/deepseek-vl2-tiny' does not exist"),
    ("deepseek-vl2-huge", r"there is no folder 'deepseek-vl2-huge' in .*not a known variant name either; known "
                          r"presets: deepseek-vl2-tiny, .*vl2-micro"),
    ("deepseek-ai/deepseek-vl2-huge", r"no folder 'deepseek-ai/deepseek-vl2-huge'.*not a known variant"),
])
def test_missing_folder_is_not_called_an_unknown_variant(path, match):
    with pytest.raises(CheckpointError, match=match) as err:
        load_pretrained(path)
    if path.startswith(("/", ".")):
        assert "variant" not in str(err.value)


def test_a_file_is_not_a_folder(tiny_snapshot):
    with pytest.raises(CheckpointError, match=r"config\.json' is a file, not a folder.*pass the folder that holds it"):
        load_pretrained(os.path.join(tiny_snapshot, "config.json"))

