"""A small byte-level BPE tokenizer with DeepSeek-VL2's special tokens, and the loader real snapshots go through.

No real DeepSeek tokenizer can be fetched here, so the project trains its own: the same *kind* of tokenizer
(byte-level BPE: every string maps to tokens, nothing is ever unknown; ``tokenizer.json`` in the ``tokenizers``
format; class name ``LlamaTokenizerFast`` in ``tokenizer_config.json``) with the official special tokens, on a tiny
English corpus, at a vocabulary that fits the random presets' 1024 embedding rows.

Fixed ids of the special tokens (the layout of deepseek-vl2-small, shifted from 100000 down to 0):
0 ``<｜begin▁of▁sentence｜>`` (BOS), 1 ``<｜end▁of▁sentence｜>`` (EOS), 2 ``<｜▁pad▁｜>`` (pad), 3 ``<image>``,
4 ``<|ref|>``, 5 ``<|/ref|>``, 6 ``<|det|>``, 7 ``<|/det|>``, 8 ``<|grounding|>``, 9 ``<|User|>``, 10 ``<|Assistant|>``;
then the 256 byte symbols, then the merges.

BOS/EOS/pad are written with the full-width bar ``｜`` (U+FF5C) and ``▁`` (U+2581); the role and grounding tokens use
the ASCII ``|``. Code never hard-codes these ids: ``load_tokenizer`` looks every special token up at load time, so a
real snapshot (tiny: ``<image>`` = 128815, small: 100003) goes through the same path.

``tokenizer_config.json`` copies the flags of the official files: ``add_bos_token: true`` and
``add_eos_token: false`` (plain ``tokenizer(text)`` prepends BOS), pad = ``<｜▁pad▁｜>``. The processor does not rely
on them: it encodes with ``add_special_tokens=False`` and adds BOS itself, as the official processor does.

Lesson: notebook 01, section "2. What the processor does to a picture" (the token side).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vl2lab.inputs.jsonfile import read_json_object

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image>"
REF, REF_END, DET, DET_END, GROUNDING = "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE, REF, REF_END, DET, DET_END, GROUNDING, USER, ASSISTANT]  # ids 0..10
ADDITIONAL_SPECIAL_TOKENS = SPECIAL_TOKENS[3:]


class TokenizerError(ValueError):
    """A tokenizer folder or build request vl2lab cannot use."""


def _builtin_corpus() -> list[str]:
    """A few thousand words of plain English plus templated scene sentences (deterministic, no randomness)."""
    prose = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
What is in the picture? Describe the image in detail. How many objects are there?
The image shows a small red circle on the left and a large blue square on the right.
There is a green triangle above the yellow star, and a purple rectangle below it.
Please answer the question with a single word. The answer is yes. The answer is no.
This is a photo of a cat sitting on a table next to a cup of coffee.
A man is riding a bicycle down the street while a woman walks her dog.
The sky is blue and the grass is green. The sun is bright and the clouds are white.
Read the text in the image. The sign says stop. The chart shows the sales of each year.
Where is the ball? The ball is in the box. Which shape is the biggest? The circle is the biggest.
Count the dots: one, two, three, four, five, six, seven, eight, nine, ten.
Locate the object in the image and give its bounding box. The object is at the top left corner.
I can see a house, a tree, a car and a person. The person is standing in front of the house.
Thank you for the question. Here is a short description of the scene.
The first image and the second image are different: the colour of the square has changed.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 128 256 384 512 768 999 1000 1024 2024.
Is there a dog in the image? No, there is no dog. Is the circle red? Yes, the circle is red.
People often say that learning a new language takes time, patience and a lot of practice every day.
The train leaves the station at seven in the morning and arrives in the city before noon.
She opened the window, looked at the garden and noticed that the flowers had started to grow again.
Scientists measure the temperature of the water, the speed of the wind and the height of the waves.
Our school library has books about history, geography, mathematics, music, art and computer science.
When the weather is good we walk along the river, and when it rains we stay at home and read.
The children played football in the park until their parents called them back for dinner.
He bought bread, milk, cheese, apples, oranges, tomatoes and potatoes at the market on Saturday.
A computer program reads the input, processes the data, and writes the result to a file.
The model looks at every part of the image, then writes an answer one token after another.
Large language models are trained on a great deal of text, while vision models learn from pictures.
Each layer of the network transforms its input, and the final layer predicts the next word.
Doctors, teachers, engineers, farmers, drivers and artists all work together in a small town.
My friend lives in a beautiful old building near the centre, just across the bridge from the museum.
Would you like some tea or coffee? I would like a glass of water, please, because I am thirsty.
During the summer holidays, many families travel to the mountains, the lakes or the seaside.
The company announced new products, better prices and faster delivery for its customers this year.
Write a short story about a robot who wants to become a painter and learns to see colours.
Although the road was long and difficult, they finally reached the village late in the evening.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.
January, February, March, April, May, June, July, August, September, October, November, December.
First, second, third, fourth, fifth: the runners crossed the line one after another.
Please explain why the sky looks blue during the day and red or orange when the sun goes down.
Important information should be clear, simple and easy to understand for everyone who reads it.
""".split("\n")
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "brown", "pink"]
    shapes = ["circle", "square", "triangle", "star", "rectangle", "cross", "diamond", "ring"]
    relations = ["left of", "right of", "above", "below", "next to", "inside", "near"]
    places = ["top left", "top right", "bottom left", "bottom right", "center", "middle", "edge", "corner"]
    sizes = ["small", "large", "big", "tiny", "medium", "long", "short", "wide"]
    numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
               "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
    lines = [p for p in prose if p]
    for i, c in enumerate(colours):
        for j, s in enumerate(shapes):
            r, pl, sz = relations[(i + j) % 7], places[(i * 3 + j) % 8], sizes[(i + 5 * j) % 8]
            c2, s2 = colours[(i + 3 * j + 1) % len(colours)], shapes[(2 * i + j + 1) % len(shapes)]
            n = numbers[(i * j + i) % len(numbers)]
            lines += [f"There is a {sz} {c} {s} {r} the {c2} {s2}. I count {n} {s}s, {i + j} in total.",
                      f"How many {c} {s}s are there? There are {n}. What colour is the {s}? The {s} is {c}.",
                      f"Which shape is {r} the {c2} {s2}? The {c} {s} is. Where is the {s}? In the {pl}.",
                      f"The {c} {s} is at [[{37 * i % 1000},{53 * j % 1000},{(37 * i + 211) % 1000},"
                      f"{(53 * j + 307) % 1000}]]. Find the {sz} {c2} {s2} in the {pl} of the image."]
    return lines


def build_tokenizer(texts: Optional[Iterable[str]] = None, vocab_size: int = 1024, path: Optional[str] = None):
    """Train a byte-level BPE tokenizer (built-in corpus + ``texts``) with the official special tokens at ids 0–10.

    The vocabulary holds the 11 special tokens, the 256 byte symbols and up to ``vocab_size − 267`` merges, so the
    total is ≤ ``vocab_size`` (equal when the corpus offers enough merges). Same inputs → byte-identical
    ``tokenizer.json``. With ``path`` the snapshot files (``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) are written there and the transformers tokenizer loaded back from them is returned;
    without it, the raw ``tokenizers.Tokenizer``.
    """

    n_fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_fixed:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: the special tokens and the 256 byte symbols "
                             f"alone take {n_fixed}; use vocab_size ≥ {n_fixed} (the random presets have 1024)")
    corpus = _builtin_corpus() + [str(t) for t in (texts or [])]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),  # digits one by one (coordinates, counts)
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(  # add_bos_token: true, as the official config
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, 0)])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise TokenizerError(f"internal: special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    if path is None:
        return tok
    save_tokenizer(tok, path)
    return load_tokenizer(path)


def save_tokenizer(tok, path: str) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` in the layout of the
    official snapshots, from a raw ``tokenizers.Tokenizer`` or a transformers fast tokenizer."""
    backend = getattr(tok, "backend_tokenizer", tok)
    names = {k: getattr(tok, k, None) or d for k, d in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD))}
    added = backend.get_added_tokens_decoder()  # {id: AddedToken}
    extra = [a.content for i, a in sorted(added.items()) if a.special and a.content not in names.values()]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(backend.to_str(pretty=True))
    decoder = {str(i): {"content": a.content, "lstrip": a.lstrip, "normalized": a.normalized, "rstrip": a.rstrip,
                        "single_word": a.single_word, "special": a.special} for i, a in sorted(added.items())}
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": extra, **names, "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": _max_length(tok), "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast", "unk_token": None})
    _write_json(os.path.join(path, "special_tokens_map.json"), {"additional_special_tokens": extra, **names})


def _max_length(tok) -> int:
    n = getattr(tok, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 10**7 else 4096  # the DeepSeek-VL2 context


def _write_json(fn: str, obj: dict) -> None:
    with open(fn, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _fix(fn: str) -> str:
    return (f"the file is truncated or corrupt: download it again, or copy {os.path.basename(fn)} from the snapshot "
            "it came from (for a published model, the official deepseek-ai/deepseek-vl2* repository of that variant)")


def check_tokenizer_files(path: str) -> None:
    """Parse a snapshot folder's ``tokenizer.json`` (with the ``tokenizers`` library that will load it; it must hold
    the image and role tokens) and its ``tokenizer_config.json`` / ``special_tokens_map.json`` if present: one
    TokenizerError naming the file if any is corrupt. Used before any weight is read, so that a bad tokenizer does
    not fail after a long load (it costs one more parse: ~0.2 s for a published 8 MB tokenizer.json)."""
    fn = os.path.join(str(path), "tokenizer.json")
    if not os.path.isfile(fn):
        raise TokenizerError(f"{path!r} has no tokenizer.json: pass a DeepSeek-VL2 snapshot folder, or make one "
                             "with vl2lab.inputs.tokenizer.build_tokenizer(path=...)")
    try:
        tok = Tokenizer.from_file(fn)
    except Exception as e:  # the tokenizers library raises a bare Exception ("EOF while parsing ...")
        raise TokenizerError(f"{fn} cannot be read as a tokenizer ({e}): {_fix(fn)}") from None
    lacks = [t for t in (IMAGE, USER, ASSISTANT) if tok.token_to_id(t) is None]
    if lacks:
        raise TokenizerError(f"{fn} lacks the special token(s) {lacks}: not a DeepSeek-VL2 tokenizer; copy "
                             "tokenizer.json from the snapshot of this model (the official deepseek-ai/deepseek-vl2* "
                             "repository of that variant)")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(str(path), name)):
            read_json_object(os.path.join(str(path), name), TokenizerError, _fix(name))


def load_tokenizer(path: str):
    """Load a snapshot folder's ``tokenizer.json`` as a transformers fast tokenizer (local files only).

    The file is loaded as it is (``PreTrainedTokenizerFast``): its own pre-tokenizer and decoder are kept, whatever
    class name ``tokenizer_config.json`` gives. Special tokens come from ``tokenizer_config.json`` /
    ``special_tokens_map.json``; the ids are looked up in the loaded vocabulary. Padding is on the left.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fn = os.path.join(str(path), "tokenizer.json")
    if not os.path.isfile(fn):
        raise TokenizerError(f"{path!r} has no tokenizer.json: pass a DeepSeek-VL2 snapshot folder, or make one "
                             "with vl2lab.inputs.tokenizer.build_tokenizer(path=...)")
    from transformers import PreTrainedTokenizerFast

    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(str(path), name)
        if os.path.isfile(p):
            cfg.update({k: v for k, v in read_json_object(p, TokenizerError, _fix(p)).items()
                        if k in ("bos_token", "eos_token", "pad_token", "model_max_length")})
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in cfg.items() if k.endswith("_token")}
    special = {k: v for k, v in special.items() if v is not None}
    special.setdefault("bos_token", BOS)
    special.setdefault("eos_token", EOS)
    special.setdefault("pad_token", PAD)
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=fn, model_max_length=cfg.get("model_max_length", 4096),
                                      padding_side="left", **special)
    except Exception as e:  # the tokenizers library raises a bare Exception ("EOF while parsing ...")
        raise TokenizerError(f"{fn} cannot be read as a tokenizer ({e}): {_fix(fn)}") from None
    vocab = tok.get_vocab()
    missing = [t for t in (special["bos_token"], special["eos_token"], IMAGE) if t not in vocab]
    if missing:
        raise TokenizerError(f"{fn} lacks the special token(s) {missing}: not a DeepSeek-VL2 tokenizer")
    return tok
