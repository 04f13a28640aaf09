"""The offline CLIP tokenizer equals CLIP's own algorithm, id for id, and truncates to 77 positions.

Reference: the BPE of OpenAI CLIP's ``simple_tokenizer.py`` (MIT), re-typed below in pure Python
and fed straight from the gzipped merges file. It shares no code with the system under test
(transformers' ``CLIPTokenizer``, a Rust ``tokenizers`` BPE reading the ``vocab.json`` /
``merges.txt`` that ``selora.tokenizer`` writes), so a wrong vocabulary order, a dropped or extra
merge, or a different pre-tokenisation shows up as different ids. open_clip's module itself was
not used: it imports ``ftfy`` and ``torch``-heavy siblings through its package ``__init__``.
Without ftfy the reference skips ``ftfy.fix_text``; the prompts below are already NFC text.
"""

from __future__ import annotations

import gzip
import html
import json
import string
from functools import cache

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from selora.tokenizer import (
    BPE_FILE,
    CONTEXT_LENGTH,
    VOCAB_SIZE,
    bytes_to_unicode,
    clip_vocab_and_merges,
    load_clip_tokenizer,
    write_clip_tokenizer_files,
)


class ReferenceCLIPTokenizer:
    """CLIP's SimpleTokenizer algorithm: ranked merges applied greedily within each word."""

    PAT = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )

    def __init__(self) -> None:
        lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(line.split()) for line in lines]
        byte_symbols = list(bytes_to_unicode().values())
        vocab = byte_symbols + [v + "</w>" for v in byte_symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.merges = merges
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.special = ("<|startoftext|>", "<|endoftext|>")  # CLIP's BPE cache maps them to themselves

    @cache  # noqa: B019 (a test-only reference tokenizer, a handful of instances)
    def bpe(self, token: str) -> str:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return " ".join(word)

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(text)).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in regex.findall(self.PAT, text):
            if token in self.special:
                ids.append(self.encoder[token])
                continue
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids


@pytest.fixture(scope="module")
def reference() -> ReferenceCLIPTokenizer:
    return ReferenceCLIPTokenizer()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SELORA_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield load_clip_tokenizer("offline")
    mp.undo()


PROMPTS = [
    "a photo of a cat",
    "female, 27 years: normal",
    "male, 51 years: right upper lobe cavity with surrounding infiltrate; left pleural effusion",
    "Patient's Sex: O  Patient's Age: 045Y  NO REPORT (same pt as MCUCXR_0001_0.png)",
    "bilateral apical scarring, calcified granuloma in the LEFT mid-zone (old TB?)",
    "a large red circle in the upper left",
    "a small striped purple cross at the bottom right",
    "Heart size normal. Lungs clear. No pneumothorax or pleural effusion. T2-T4 fractures?",
    "x-ray: PA view, 2048x2048, 12-bit",
    "naïve café résumé — über straße, 肺結核, 🙂 emoji",
    "it's they're we've I'm you'll he'd isn't",
    "   leading and trailing   spaces\tand\nnewlines   ",
    "<|startoftext|>special tokens inside<|endoftext|>",
    "1234567890 0.5mm 3cm 10/10 100% #1 @home",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "",
]


def test_rebuilt_vocabulary_has_clip_layout():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE == 49408
    assert len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # bytes, then bytes ending a word, then merges
    assert vocab["".join(merges[0])] == 512


def test_known_ids_of_sd15_tokenizer(tokenizer):
    # Published ids of "a photo of a cat" from SD v1.5's hub tokenizer (CLIP ViT-L/14).
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == CONTEXT_LENGTH == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert len(tokenizer) == 49408


def test_loaded_vocabulary_and_merge_ranks_equal_reference(tokenizer, reference):
    assert tokenizer.get_vocab() == reference.encoder  # all 49,408 token -> id pairs
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    loaded = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    assert loaded == reference.merges  # every merge, in rank order


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_reference_on_prompts(tokenizer, reference, prompt):
    assert tokenizer(prompt).input_ids == [49406, *reference.encode(prompt), 49407]


ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \t\néèüößçñ—’🙂肺"


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=80))
def test_ids_equal_reference_on_random_text(tokenizer, reference, text):
    if "&" in text:  # CLIP html-unescapes ("&amp;" -> "&"); SD's tokenizer does not (module docstring)
        text = text.replace("&", "and")
    assert tokenizer(text).input_ids == [49406, *reference.encode(text), 49407]


def test_truncation_keeps_start_75_text_tokens_and_end(tokenizer, reference):
    words = " ".join(f"finding{i}" for i in range(60))  # far more than 75 tokens
    content = reference.encode(words)
    assert len(content) > 75
    ids = tokenizer(words, truncation=True, max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77
    assert ids == [49406, *content[:75], 49407]  # the paper's "76 tokens" = 75 text tokens + end


def test_75_text_tokens_fit_and_the_76th_is_cut(tokenizer, reference):
    (lung,) = reference.encode("lung")  # one token
    fits = " ".join(["lung"] * 75)
    ids = tokenizer(fits, truncation=True, max_length=77).input_ids
    assert ids == [49406, *[lung] * 75, 49407]
    cut = tokenizer(fits + " cavity", truncation=True, max_length=77).input_ids
    assert cut == ids  # the 76th text token ("cavity") is lost


def test_padding_to_77_with_end_token(tokenizer, reference):
    ids = tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    content = reference.encode("a red circle")
    assert len(ids) == 77 and ids[: len(content) + 1] == [49406, *content]
    assert set(ids[len(content) + 1 :]) == {49407}  # end token, then padding with the end token


def test_files_match_hub_format(tmp_path):
    out = write_clip_tokenizer_files(tmp_path / "tok")
    merges = (out / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 48894 + 2
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == clip_vocab_and_merges()[0]


def test_load_builds_into_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path))
    load_clip_tokenizer("offline")
    vocab_file = tmp_path / "clip-tokenizer" / "vocab.json"
    stamp = vocab_file.stat().st_mtime_ns
    assert load_clip_tokenizer("offline")("lung").input_ids[1] == json.loads(vocab_file.read_text())["lung</w>"]
    assert vocab_file.stat().st_mtime_ns == stamp


def test_corrupt_merges_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bpe.txt.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"bpe\.txt\.gz: expected CLIP's gzipped BPE merges file"):
        clip_vocab_and_merges(bad)
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"header\ni n\nt h\n"))
    with pytest.raises(ValueError, match=r"short\.txt\.gz: expected 48894 merge lines"):
        clip_vocab_and_merges(short)
