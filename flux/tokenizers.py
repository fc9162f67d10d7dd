"""Prompt tokenization for FLUX's two text encoders, from local tokenizer folders only.

Follows the reference `HFEmbedder` (src/flux/modules/conditioner.py in
https://github.com/black-forest-labs/flux): both tokenizers are called with
`truncation=True, padding="max_length"`, so every prompt becomes exactly `max_length` ids.

- CLIP (77 ids): `<|startoftext|>`, the byte-level BPE tokens (lowercased, whitespace collapsed,
  NFC, split with CLIP's regex), `<|endoftext|>`, then `<|endoftext|>` again as padding. Read from
  `vocab.json` + `merges.txt` and run by the `tokenizers` library (the same pipeline transformers'
  fast `CLIPTokenizer` builds; OpenAI's original also runs ftfy/html unescaping, which only changes
  prompts with mojibake or HTML entities).
- T5 (256 ids for schnell): the SentencePiece unigram tokens, `</s>` (id 1), then `<pad>` (id 0).
  Read from `tokenizer.json` by the `tokenizers` library; a folder with only `spiece.model` is
  converted by transformers' `T5TokenizerFast` (which needs the `sentencepiece` package).

Where the files are: ComfyUI ships `comfy/sd1_tokenizer/` (CLIP) and
`comfy/text_encoders/t5_tokenizer/` (T5); the black-forest-labs/FLUX.1-schnell repository has
`tokenizer/` (CLIP) and `tokenizer_2/` (T5). Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import InvalidInputError, LocalBackendUnavailable, ModelLoadError

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"  # also CLIP's padding and unknown token
T5_EOS = "</s>"
T5_PAD = "<pad>"
T5_UNK = "<unk>"

# Characters runs CLIP splits a prompt into before byte-level BPE (OpenAI's simple_tokenizer rule).
CLIP_SPLIT_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)

CLIP_FILES = ("vocab.json", "merges.txt")
T5_JSON = "tokenizer.json"
T5_SPIECE = "spiece.model"

_CLIP_WHERE = (
    "Expected vocab.json and merges.txt (special_tokens_map.json and tokenizer_config.json are "
    "optional), as in ComfyUI's bundled comfy/sd1_tokenizer/ folder or the tokenizer/ folder of the "
    "black-forest-labs/FLUX.1-schnell repository."
)
_T5_WHERE = (
    "Expected tokenizer.json (or spiece.model), as in ComfyUI's bundled "
    "comfy/text_encoders/t5_tokenizer/ folder or the tokenizer_2/ folder of the "
    "black-forest-labs/FLUX.1-schnell repository."
)


class PromptTokenizer(Protocol):
    """Turns a batch of prompts into a (B, max_length) int64 tensor of token ids."""

    def __call__(self, prompts: list[str]) -> torch.LongTensor: ...


@dataclass(frozen=True)
class TokenizerFolders:
    """The CLIP and T5 tokenizer folders of one installation."""

    clip: Path
    t5: Path


def find_comfyui_tokenizer_folders() -> TokenizerFolders | None:
    """ComfyUI's bundled tokenizer folders when the `comfy` package is importable, else None."""
    module = sys.modules.get("comfy")
    if module is not None:
        roots = list(getattr(module, "__path__", []))
    else:
        spec = importlib.util.find_spec("comfy")
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in map(Path, roots):
        folders = TokenizerFolders(clip=root / "sd1_tokenizer", t5=root / "text_encoders" / "t5_tokenizer")
        if (folders.clip / "vocab.json").is_file() and (folders.t5 / T5_JSON).is_file():
            return folders
    return None


def check_prompts(prompts: list[str]) -> list[str]:
    """The prompts as a list, or InvalidInputError if they are not a non-empty list of strings."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise InvalidInputError(
            f"prompts must be a list of strings, got {type(prompts).__name__}: wrap a single prompt in a list"
        )
    if not prompts:
        raise InvalidInputError("prompts must hold at least one prompt, got an empty list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
    return list(prompts)


class FastPromptTokenizer:
    """A `tokenizers.Tokenizer` set up to truncate, add the special tokens and pad to `max_length`."""

    def __init__(self, tokenizer: Any, max_length: int, pad_id: int, eos_id: int, name: str):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: list[str]) -> torch.LongTensor:
        encodings = self.tokenizer.encode_batch(check_prompts(prompts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)  # (B, max_length)

    def __repr__(self) -> str:
        return f"FastPromptTokenizer({self.name}, vocab_size={self.vocab_size}, max_length={self.max_length})"


class TransformersPromptTokenizer:
    """A transformers tokenizer called the way the reference calls it (truncate, pad to max_length)."""

    def __init__(self, tokenizer: Any, max_length: int, name: str):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.name = name
        self.vocab_size = len(tokenizer)

    def __call__(self, prompts: list[str]) -> torch.LongTensor:
        batch = self.tokenizer(
            check_prompts(prompts),
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return batch["input_ids"].long()  # (B, max_length)

    def __repr__(self) -> str:
        return (
            f"TransformersPromptTokenizer({self.name}, vocab_size={self.vocab_size}, "
            f"max_length={self.max_length})"
        )


def _check_max_length(max_length: int, minimum: int, who: str) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < minimum:
        raise InvalidInputError(f"{who} max_length must be an integer >= {minimum}, got {max_length!r}")


def _check_folder(folder: str | Path, kind: str, where: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise ModelLoadError(f"{kind} tokenizer folder {str(path)!r} {state}. {where}")
    return path


def _tokenizers_library():
    try:
        import tokenizers
    except ImportError as e:
        raise LocalBackendUnavailable(
            "The local backend needs the `tokenizers` package: pip install tokenizers"
        ) from e
    return tokenizers


def load_clip_tokenizer(folder: str | Path, max_length: int = 77) -> FastPromptTokenizer:
    """CLIP tokenizer from `vocab.json` + `merges.txt` in `folder`; pads with `<|endoftext|>`."""
    _check_max_length(max_length, 2, "CLIP tokenizer")
    path = _check_folder(folder, "CLIP", _CLIP_WHERE)
    missing = [name for name in CLIP_FILES if not (path / name).is_file()]
    if missing:
        raise ModelLoadError(f"CLIP tokenizer folder {str(path)!r} lacks {', '.join(missing)}. {_CLIP_WHERE}")
    try:
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(
            f"CLIP tokenizer folder {str(path)!r}: vocab.json cannot be read ({e}). {_CLIP_WHERE}"
        ) from e
    absent = [t for t in (CLIP_BOS, CLIP_EOS) if not isinstance(vocab, dict) or t not in vocab]
    if absent:
        raise ModelLoadError(
            f"CLIP tokenizer folder {str(path)!r}: vocab.json has no {' or '.join(absent)}; "
            f"this is not a CLIP vocabulary. {_CLIP_WHERE}"
        )
    tk = _tokenizers_library()
    try:
        bpe = tk.models.BPE.from_file(
            str(path / "vocab.json"),
            str(path / "merges.txt"),
            unk_token=CLIP_EOS,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
        )
    except Exception as e:  # tokenizers raises plain Exception for malformed files
        raise ModelLoadError(
            f"CLIP tokenizer folder {str(path)!r}: vocab.json/merges.txt cannot be read ({e}). {_CLIP_WHERE}"
        ) from e
    bos_id, eos_id = vocab[CLIP_BOS], vocab[CLIP_EOS]

    tokenizer = tk.Tokenizer(bpe)
    tokenizer.normalizer = tk.normalizers.Sequence(
        [
            tk.normalizers.NFC(),
            tk.normalizers.Replace(tk.Regex(r"\s+"), " "),
            tk.normalizers.Lowercase(),
        ]
    )
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            # keep the runs that match the pattern, drop what lies between them (whitespace)
            tk.pre_tokenizers.Split(tk.Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [tk.AddedToken(t, special=True, normalized=True) for t in (CLIP_BOS, CLIP_EOS)]
    )
    tokenizer.post_processor = tk.processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, bos_id), (CLIP_EOS, eos_id)],
    )
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=eos_id, pad_token=CLIP_EOS)
    return FastPromptTokenizer(tokenizer, max_length, pad_id=eos_id, eos_id=eos_id, name=str(path))


def load_t5_tokenizer(
    folder: str | Path, max_length: int = 256
) -> FastPromptTokenizer | TransformersPromptTokenizer:
    """T5 tokenizer from `tokenizer.json` (or `spiece.model`) in `folder`; appends `</s>`, pads with 0."""
    _check_max_length(max_length, 1, "T5 tokenizer")
    path = _check_folder(folder, "T5", _T5_WHERE)
    if (path / T5_JSON).is_file():
        return _load_t5_tokenizer_json(path, max_length)
    if (path / T5_SPIECE).is_file():
        return load_t5_with_transformers(path, max_length)
    raise ModelLoadError(f"T5 tokenizer folder {str(path)!r} lacks tokenizer.json. {_T5_WHERE}")


def _load_t5_tokenizer_json(path: Path, max_length: int) -> FastPromptTokenizer:
    tk = _tokenizers_library()
    try:
        tokenizer = tk.Tokenizer.from_file(str(path / T5_JSON))
    except Exception as e:  # tokenizers raises plain Exception for malformed files
        raise ModelLoadError(
            f"T5 tokenizer folder {str(path)!r}: tokenizer.json cannot be read ({e}). {_T5_WHERE}"
        ) from e
    ids = {t: tokenizer.token_to_id(t) for t in (T5_PAD, T5_EOS)}
    absent = [t for t, i in ids.items() if i is None]
    if absent:
        raise ModelLoadError(
            f"T5 tokenizer folder {str(path)!r}: tokenizer.json has no {' or '.join(absent)}; "
            f"this is not a T5 tokenizer. {_T5_WHERE}"
        )
    pad_id, eos_id = ids[T5_PAD], ids[T5_EOS]
    # Set the post-processor, truncation and padding ourselves rather than trusting the file's.
    tokenizer.post_processor = tk.processors.TemplateProcessing(
        single=f"$A {T5_EOS}", special_tokens=[(T5_EOS, eos_id)]
    )
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=T5_PAD)
    return FastPromptTokenizer(tokenizer, max_length, pad_id=pad_id, eos_id=eos_id, name=str(path))


def load_t5_with_transformers(folder: str | Path, max_length: int = 256) -> TransformersPromptTokenizer:
    """T5 tokenizer through transformers' `T5TokenizerFast` (the path for `spiece.model`-only folders)."""
    _check_max_length(max_length, 1, "T5 tokenizer")
    path = _check_folder(folder, "T5", _T5_WHERE)
    try:
        from transformers import T5TokenizerFast
    except ImportError as e:
        raise ModelLoadError(
            f"T5 tokenizer folder {str(path)!r} has only spiece.model, which needs the "
            f"`transformers` and `sentencepiece` packages to read; add tokenizer.json instead. "
            f"{_T5_WHERE}"
        ) from e
    try:
        tokenizer = T5TokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # conversion errors come as ValueError, ImportError, OSError, ...
        raise ModelLoadError(
            f"T5 tokenizer folder {str(path)!r} could not be read by transformers ({e}); with only "
            f"spiece.model the `sentencepiece` and `protobuf` packages are needed, or add "
            f"tokenizer.json. {_T5_WHERE}"
        ) from e
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ModelLoadError(
            f"T5 tokenizer folder {str(path)!r}: no </s> or <pad> token; this is not a T5 tokenizer."
            f" {_T5_WHERE}"
        )
    return TransformersPromptTokenizer(tokenizer, max_length, name=str(path))
