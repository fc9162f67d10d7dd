"""Tests of the prompt tokenizers (flux/tokenizers.py) on tiny real tokenizer folders.

Both folder layouts (ComfyUI's bundled folders and FLUX.1-schnell's tokenizer/ + tokenizer_2/) are
written by tests/support/tiny_tokenizers.py. Ids are checked by hand for short prompts, structurally
(BOS/EOS/padding placement, truncation) and against transformers' CLIPTokenizer / T5TokenizerFast
called the way the reference HFEmbedder calls them. With COMFYUI_DIR set, the real bundled folders
are checked too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from comfyui_flux_schnell.errors import InvalidInputError, ModelLoadError
from comfyui_flux_schnell.flux.tokenizers import (
    TokenizerFolders,
    find_comfyui_tokenizer_folders,
    load_clip_tokenizer,
    load_t5_tokenizer,
    load_t5_with_transformers,
)
from support.tiny_tokenizers import (
    CLIP_VOCAB_SIZE,
    LAYOUTS,
    T5_VOCAB_SIZE,
    clip_vocab_and_merges,
    t5_pieces,
    write_clip_tokenizer,
    write_comfyui_tree,
    write_flux_repo_tree,
    write_t5_tokenizer,
)

PROMPTS = [
    "a photo of a cat",
    "A  RED car\tin the Forest, at sunset!!! 1984 (detailed:1.2)",
    "",
    "café naïve 東京 🐱 don't we'll it's &amp; tail",
    "  leading and trailing spaces  ",
]
SPECIAL = "text with <|endoftext|> and </s> typed in"  # special tokens in the text stay special
LONG = "a red car in the forest " * 60


def first(row: torch.Tensor, value: int) -> int:
    """Index of the first `value` in a 1-D tensor."""
    return int((row == value).nonzero()[0, 0])


@pytest.fixture(params=LAYOUTS)
def folders(request, tmp_path) -> tuple[Path, Path]:
    """(clip, t5) tiny tokenizer folders in one of the two layouts."""
    if request.param == "comfyui":
        return write_comfyui_tree(tmp_path)
    return write_flux_repo_tree(tmp_path)


# --- CLIP ----------------------------------------------------------------------------------------


def test_clip_known_ids(folders):
    vocab, _ = clip_vocab_and_merges()
    tok = load_clip_tokenizer(folders[0])
    ids = tok(["a cat"])
    # merge "a t</w>" (from the word "at") ranks before "ca t</w>" (from "cat"), so cat = c + at</w>
    expected = [vocab[t] for t in ("<|startoftext|>", "a</w>", "c", "at</w>", "<|endoftext|>")]
    assert ids[0, :5].tolist() == expected
    assert ids.shape == (1, 77)
    assert ids.dtype == torch.long
    assert tok.vocab_size == CLIP_VOCAB_SIZE


def test_clip_bos_eos_and_padding(folders):
    tok = load_clip_tokenizer(folders[0])
    bos, eos = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1
    ids = tok(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    assert tok.pad_id == eos
    assert tok.eos_id == eos
    ends = []
    for row in ids:
        assert row[0] == bos
        end = first(row, eos)
        ends.append(end)
        assert (row[end:] == eos).all()  # end of text, then <|endoftext|> padding
        assert (row[1:end] < bos).all()  # only ordinary tokens in between
        assert int(row.argmax()) == end  # the position CLIP's pooled output is taken from
    assert ends[2] == 1  # the empty prompt is BOS EOS
    assert len(set(ends)) == len(ends)


def test_clip_truncates_long_prompts(folders):
    ids = load_clip_tokenizer(folders[0])([LONG, "a cat"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == CLIP_VOCAB_SIZE - 2
    assert first(ids[0], CLIP_VOCAB_SIZE - 1) == 76  # 75 prompt tokens, then EOS in the last slot


def test_clip_custom_max_length(folders):
    ids = load_clip_tokenizer(folders[0], max_length=8)([LONG, ""])
    assert ids.shape == (2, 8)
    assert ids[0, -1] == CLIP_VOCAB_SIZE - 1
    assert ids[1].tolist() == [CLIP_VOCAB_SIZE - 2] + [CLIP_VOCAB_SIZE - 1] * 7


def test_clip_matches_transformers(folders):
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(str(folders[0]), local_files_only=True)
    prompts = [*PROMPTS, SPECIAL, LONG]
    expected = reference(prompts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")[
        "input_ids"
    ]
    assert torch.equal(load_clip_tokenizer(folders[0])(prompts), expected)


# --- T5 ------------------------------------------------------------------------------------------


def test_t5_known_ids(folders):
    piece_id = {p: i for i, (p, _) in enumerate(t5_pieces())}
    tok = load_t5_tokenizer(folders[1])
    ids = tok(["a photo of a cat"])
    words = ("▁a", "▁photo", "▁of", "▁a", "▁cat")
    assert ids[0, :6].tolist() == [piece_id[w] for w in words] + [1]
    assert (ids[0, 6:] == 0).all()
    assert ids.shape == (1, 256)
    assert ids.dtype == torch.long
    assert tok.vocab_size == T5_VOCAB_SIZE


def test_t5_eos_and_padding(folders):
    tok = load_t5_tokenizer(folders[1])
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    ids = tok(PROMPTS)
    assert ids.shape == (len(PROMPTS), 256)
    for row in ids:
        end = first(row, 1)
        assert (row[end + 1 :] == 0).all()  # </s> once, then <pad> = 0
        assert (row[:end] > 1).all()  # no BOS, no padding inside the prompt
    assert first(ids[2], 1) == 0  # the empty prompt is just </s>


def test_t5_truncates_long_prompts(folders):
    ids = load_t5_tokenizer(folders[1])([LONG * 3])
    assert ids.shape == (1, 256)
    assert first(ids[0], 1) == 255
    assert (ids[0, :255] > 2).all()


def test_t5_custom_max_length(folders):
    ids = load_t5_tokenizer(folders[1], max_length=512)(["a cat", LONG * 3])
    assert ids.shape == (2, 512)
    assert ids[1, -1] == 1


def test_t5_matches_transformers(folders):
    transformers = pytest.importorskip("transformers")
    reference = transformers.T5TokenizerFast.from_pretrained(str(folders[1]), local_files_only=True)
    prompts = [*PROMPTS, SPECIAL, LONG * 3]
    expected = reference(prompts, truncation=True, max_length=256, padding="max_length", return_tensors="pt")[
        "input_ids"
    ]
    assert torch.equal(load_t5_tokenizer(folders[1])(prompts), expected)


def test_t5_transformers_path_matches_tokenizers_path(folders):
    pytest.importorskip("transformers")
    prompts = [*PROMPTS, SPECIAL, LONG * 3]
    fast = load_t5_tokenizer(folders[1])(prompts)
    assert torch.equal(load_t5_with_transformers(folders[1])(prompts), fast)


# --- errors --------------------------------------------------------------------------------------


def test_missing_clip_folder_names_it_and_the_expected_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError) as info:
        load_clip_tokenizer(missing)
    message = str(info.value)
    for part in (str(missing), "vocab.json", "merges.txt", "comfy/sd1_tokenizer", "tokenizer/"):
        assert part in message


def test_missing_t5_folder_names_it_and_the_expected_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError) as info:
        load_t5_tokenizer(missing)
    message = str(info.value)
    for part in (str(missing), "tokenizer.json", "spiece.model", "t5_tokenizer", "tokenizer_2/"):
        assert part in message


def test_file_given_instead_of_folder(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "clip")
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_clip_tokenizer(folder / "vocab.json")


@pytest.mark.parametrize("remove", ["vocab.json", "merges.txt"])
def test_incomplete_clip_folder(tmp_path, remove):
    folder = write_clip_tokenizer(tmp_path / "clip")
    (folder / remove).unlink()
    with pytest.raises(ModelLoadError, match=remove):
        load_clip_tokenizer(folder)


def test_clip_merges_not_matching_vocab(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "clip")
    (folder / "merges.txt").write_text("#version: 0.2\nzz qq\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        load_clip_tokenizer(folder)


def test_clip_vocab_without_special_tokens(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "clip")
    (folder / "vocab.json").write_text('{"a": 0, "b": 1}', encoding="utf-8")
    with pytest.raises(ModelLoadError, match="startoftext"):
        load_clip_tokenizer(folder)


def test_corrupt_clip_vocab(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "clip")
    (folder / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"vocab\.json cannot be read"):
        load_clip_tokenizer(folder)


def test_t5_folder_without_tokenizer_files(tmp_path):
    folder = write_t5_tokenizer(tmp_path / "t5")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"lacks tokenizer\.json"):
        load_t5_tokenizer(folder)


def test_corrupt_t5_tokenizer_json(tmp_path):
    folder = write_t5_tokenizer(tmp_path / "t5")
    (folder / "tokenizer.json").write_text('{"model": 3}', encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json cannot be read"):
        load_t5_tokenizer(folder)


def test_t5_tokenizer_json_without_t5_tokens(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    folder = tmp_path / "t5"
    folder.mkdir()
    Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    with pytest.raises(ModelLoadError, match="not a T5 tokenizer"):
        load_t5_tokenizer(folder)


def test_unreadable_spiece_model_only_folder(tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "tokenizer_2"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelLoadError, match=r"spiece\.model"):
        load_t5_tokenizer(folder)


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ("a cat", "list of strings"),
        ([], "at least one"),
        (["a", 3], r"prompts\[1\]"),
        (None, "list"),
    ],
)
@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_bad_prompts(tmp_path, kind, prompts, match):
    if kind == "clip":
        tok = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "clip"))
    else:
        tok = load_t5_tokenizer(write_t5_tokenizer(tmp_path / "t5"))
    with pytest.raises(InvalidInputError, match=match):
        tok(prompts)


@pytest.mark.parametrize("max_length", [0, 1, 2.5, True])
def test_bad_clip_max_length(tmp_path, max_length):
    with pytest.raises(InvalidInputError, match="max_length"):
        load_clip_tokenizer(write_clip_tokenizer(tmp_path / "clip"), max_length=max_length)


@pytest.mark.parametrize("max_length", [0, -3, "256"])
def test_bad_t5_max_length(tmp_path, max_length):
    with pytest.raises(InvalidInputError, match="max_length"):
        load_t5_tokenizer(write_t5_tokenizer(tmp_path / "t5"), max_length=max_length)


# --- finding ComfyUI's folders -------------------------------------------------------------------


def _comfy_modules() -> dict:
    return {k: m for k, m in sys.modules.items() if k == "comfy" or k.startswith("comfy.")}


@pytest.fixture
def no_comfy():
    """Hide any imported `comfy` package during a test and restore sys.modules afterwards."""
    saved = _comfy_modules()
    for name in saved:
        del sys.modules[name]
    yield
    for name in _comfy_modules():
        del sys.modules[name]
    sys.modules.update(saved)


def test_finds_comfyui_bundled_folders(tmp_path, monkeypatch, no_comfy):
    clip, t5 = write_comfyui_tree(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = find_comfyui_tokenizer_folders()
    assert found == TokenizerFolders(clip=clip, t5=t5)
    assert load_clip_tokenizer(found.clip)(["a cat"]).shape == (1, 77)


def test_finds_folders_of_an_imported_comfy_package(tmp_path, monkeypatch, no_comfy):
    clip, t5 = write_comfyui_tree(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("comfy")
    assert sys.modules["comfy"] is module
    assert find_comfyui_tokenizer_folders() == TokenizerFolders(clip=clip, t5=t5)


def test_no_comfyui_means_none(monkeypatch, no_comfy):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert find_comfyui_tokenizer_folders() is None


def test_comfy_package_without_tokenizer_folders_means_none(tmp_path, monkeypatch, no_comfy):
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert find_comfyui_tokenizer_folders() is None


# --- the real bundled folders (optional) ---------------------------------------------------------


@pytest.mark.comfyui
def test_real_comfyui_folders_match_transformers_and_known_ids():
    comfyui_dir = os.environ.get("COMFYUI_DIR")
    if not comfyui_dir:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to check its bundled tokenizer folders")
    transformers = pytest.importorskip("transformers")
    root = Path(comfyui_dir) / "comfy"
    clip_folder, t5_folder = root / "sd1_tokenizer", root / "text_encoders" / "t5_tokenizer"
    clip, t5 = load_clip_tokenizer(clip_folder), load_t5_tokenizer(t5_folder)
    # openai/clip-vit-large-patch14 and google/t5-v1_1-xxl ids of a well-known prompt
    assert clip(["a photo of a cat"])[0, :8].tolist() == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        49407,
        49407,
    ]
    assert t5(["a photo of a cat"])[0, :9].tolist() == [3, 9, 1202, 13, 3, 9, 1712, 1, 0]
    prompts = [*PROMPTS, SPECIAL, LONG * 3]
    kwargs = {"truncation": True, "padding": "max_length", "return_tensors": "pt"}
    ref_clip = transformers.CLIPTokenizer.from_pretrained(str(clip_folder), local_files_only=True)
    ref_t5 = transformers.T5TokenizerFast.from_pretrained(str(t5_folder), local_files_only=True)
    assert torch.equal(clip(prompts), ref_clip(prompts, max_length=77, **kwargs)["input_ids"])
    assert torch.equal(t5(prompts), ref_t5(prompts, max_length=256, **kwargs)["input_ids"])
