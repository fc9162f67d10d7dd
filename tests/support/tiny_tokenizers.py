"""Test helper: writes tiny but real CLIP and T5 tokenizer folders into a temporary directory.

The folders have the file layouts of the real ones, so the production loaders read them unchanged:
- CLIP, ComfyUI's `comfy/sd1_tokenizer/` and FLUX.1-schnell's `tokenizer/`: vocab.json (the 256
  byte-level base characters, their `</w>` variants, the merged tokens of a few dozen words, then
  `<|startoftext|>` and `<|endoftext|>`, the largest id as in CLIP), merges.txt (with the
  `#version` header line), special_tokens_map.json, tokenizer_config.json.
- T5, ComfyUI's `comfy/text_encoders/t5_tokenizer/` and FLUX.1-schnell's `tokenizer_2/`: a
  tokenizer.json holding a Unigram model built with the `tokenizers` library (`<pad>` 0, `</s>` 1,
  `<unk>` 2, Metaspace pre-tokenizer, a couple of hundred pieces), special_tokens_map.json,
  tokenizer_config.json. (The real `tokenizer_2/` also has spiece.model, which cannot be written
  without sentencepiece; the loader reads tokenizer.json first anyway.)

Everything is deterministic: the same bytes on every call. `CLIP_VOCAB_SIZE` and `T5_VOCAB_SIZE`
are the sizes a tiny model's `vocab_size` should be set from.

Usage: `write_clip_tokenizer(tmp_path / "clip")`, `write_t5_tokenizer(tmp_path / "t5")`,
`write_comfyui_tree(tmp_path)` (an importable fake `comfy` package with both folders) or
`write_flux_repo_tree(tmp_path)` (`tokenizer/` and `tokenizer_2/`).
"""

from __future__ import annotations

import json
from pathlib import Path

LAYOUTS = ("comfyui", "flux")

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# Words that get whole-word BPE merges / unigram pieces; anything else falls back to smaller pieces.
WORDS = [
    "a",
    "an",
    "and",
    "at",
    "blue",
    "car",
    "cat",
    "city",
    "detailed",
    "dog",
    "flower",
    "forest",
    "garden",
    "green",
    "high",
    "house",
    "in",
    "is",
    "it",
    "light",
    "man",
    "mountains",
    "night",
    "of",
    "on",
    "painting",
    "photo",
    "portrait",
    "quality",
    "red",
    "river",
    "sitting",
    "sky",
    "style",
    "sunset",
    "the",
    "to",
    "tree",
    "with",
    "woman",
]
T5_SUFFIXES = ("s", "ing", "ed", "er", "ly", "est")
T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()\"/&"


def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible byte -> printable character table (GPT-2/CLIP convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The tiny CLIP vocabulary (token -> id) and merge list, in rank order."""
    base = list(bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    merges: list[str] = []
    for word in WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        merged = symbols[0]
        for nxt in symbols[1:]:
            rule = f"{merged} {nxt}"
            merged += nxt
            if rule not in merges:
                merges.append(rule)
                tokens.append(merged)
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "tiny CLIP vocabulary has duplicate tokens"
    return vocab, merges


def t5_pieces() -> list[tuple[str, float]]:
    """The tiny T5 unigram vocabulary: (piece, log-probability score) in id order."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for i, word in enumerate(WORDS):
        add("▁" + word, -6.0 - 0.01 * i)
    for i, suffix in enumerate(T5_SUFFIXES):
        add(suffix, -7.0 - 0.01 * i)
    for i, ch in enumerate(T5_CHARS):
        add(ch, -9.0 - 0.01 * i)
        add("▁" + ch, -9.5 - 0.01 * i)
    return pieces


def _clip_special_tokens_map() -> dict:
    def token(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    return {
        "bos_token": token(CLIP_BOS),
        "eos_token": token(CLIP_EOS),
        "pad_token": CLIP_EOS,
        "unk_token": token(CLIP_EOS),
    }


def write_clip_tokenizer(folder: str | Path, layout: str = "comfyui") -> Path:
    """Write a tiny CLIP tokenizer folder (`layout` "comfyui" or "flux") and return its path."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(_clip_special_tokens_map(), indent=2), encoding="utf-8"
    )
    config = {
        "add_prefix_space": False,
        "bos_token": CLIP_BOS,
        "do_lower_case": True,
        "eos_token": CLIP_EOS,
        "errors": "replace",
        "model_max_length": 8192 if layout == "comfyui" else 77,
        "pad_token": CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": CLIP_EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def build_t5_tokenizer(layout: str = "comfyui"):
    """The tiny T5 `tokenizers.Tokenizer` (ComfyUI's file prepends `▁` to the first split only)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.processors import TemplateProcessing

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    tokenizer = Tokenizer(Unigram(t5_pieces(), unk_id=2, byte_fallback=False))
    # like the real file: tabs/newlines become spaces, trailing ones go, runs of spaces become one ▁
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Replace(Regex(r"\s"), " "),
            normalizers.Strip(left=False, right=True),
            normalizers.Replace(Regex(" {2,}"), "▁"),
        ]
    )
    scheme = "first" if layout == "comfyui" else "always"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")]
    )
    tokenizer.post_processor = TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tokenizer


def write_t5_tokenizer(folder: str | Path, layout: str = "comfyui") -> Path:
    """Write a tiny T5 tokenizer folder (`layout` "comfyui" or "flux") and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_t5_tokenizer(layout).save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        **special,
        "extra_ids": 0,
        "legacy": layout == "flux",
        "model_max_length": 512,
        "tokenizer_class": "T5Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def write_comfyui_tree(root: str | Path) -> tuple[Path, Path]:
    """A fake importable `comfy` package under `root` with both bundled folders; (clip, t5) paths."""
    comfy = Path(root) / "comfy"
    comfy.mkdir(parents=True, exist_ok=True)
    (comfy / "__init__.py").write_text('"""Stand-in for ComfyUI\'s comfy package."""\n')
    clip = write_clip_tokenizer(comfy / "sd1_tokenizer", "comfyui")
    t5 = write_t5_tokenizer(comfy / "text_encoders" / "t5_tokenizer", "comfyui")
    return clip, t5


def write_flux_repo_tree(root: str | Path) -> tuple[Path, Path]:
    """The FLUX.1-schnell repository's `tokenizer/` and `tokenizer_2/` under `root`; (clip, t5)."""
    root = Path(root)
    return (
        write_clip_tokenizer(root / "tokenizer", "flux"),
        write_t5_tokenizer(root / "tokenizer_2", "flux"),
    )


CLIP_VOCAB_SIZE = len(clip_vocab_and_merges()[0])
T5_VOCAB_SIZE = len(t5_pieces())
