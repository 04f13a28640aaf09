"""The CLIP ViT-L/14 BPE tokenizer of Stable Diffusion v1.5, rebuilt without the model hub.

Offline, the exact 49,408-token vocabulary is rebuilt from the BPE merges file OpenAI published
with CLIP (shipped in ``selora/assets/clip/``, taken from the ``open_clip_torch`` wheel, MIT) the
way CLIP's own ``SimpleTokenizer`` builds it: 256 byte symbols, the same 256 with the end-of-word
mark ``</w>``, the first 48,894 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>``
(49407). The result is written as ``vocab.json`` + ``merges.txt`` into the cache and loaded with
the stock transformers ``CLIPTokenizerFast`` (transformers 5's ``CLIPTokenizer``; 4.x's slow
``CLIPTokenizer`` splits accented and CJK text differently). The paper profile loads the tokenizer of
the hub model.

Context length: 77 positions = ``<|startoftext|>`` + at most 75 text tokens + ``<|endoftext|>``;
the paper's "76 tokens" counts everything after the start token. Longer prompts lose their tail.

One known difference to CLIP's original tokenizer: it also runs ``ftfy.fix_text`` and
``html.unescape`` on the text (``"&amp;"`` becomes ``"&"``); the transformers tokenizer, like the
one that ships with SD v1.5, does not.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizerFast

from selora.io import atomic_write_text
from selora.paths import ASSETS_DIR, cache_dir
from selora.profile import profile as active_profile

BPE_FILE = ASSETS_DIR / "clip" / "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77  # CLIP text positions, start and end tokens included
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894 merges make up the rest of the vocabulary
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from each of the 256 byte values to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(bpe_file: Path = BPE_FILE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's vocabulary (token → id, 49,408 entries) and ranked merges from ``bpe_file``."""
    try:
        lines = gzip.decompress(Path(bpe_file).read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{bpe_file}: expected CLIP's gzipped BPE merges file ({err})") from err
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a header
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_file}: expected {N_MERGES} merge lines of two symbols each")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_file}: rebuilt {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer_files(out_dir: Path, bpe_file: Path = BPE_FILE) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (the hub's file formats) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_file)
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    return out_dir


def load_clip_tokenizer(profile: str | None = None) -> CLIPTokenizerFast:
    """SD v1.5's CLIP tokenizer (``model_max_length`` 77): from the hub (paper) or rebuilt (offline)."""
    if (profile or active_profile()) == "paper":
        from selora.models import SD15_MODEL_ID

        return CLIPTokenizerFast.from_pretrained(SD15_MODEL_ID, subfolder="tokenizer")
    folder = cache_dir("clip-tokenizer")
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        write_clip_tokenizer_files(folder)
    return CLIPTokenizerFast.from_pretrained(folder, model_max_length=CONTEXT_LENGTH)
