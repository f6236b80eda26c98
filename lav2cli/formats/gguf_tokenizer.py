"""llama.cpp GGUF vocabularies <-> tokenizers: `from_metadata` builds a `BPETokenizer` from a
GGUF file's tokenizer.ggml.* metadata, `write` puts a tokenizer's vocabulary into a GGUF writer.

GGUF knows two vocabularies: "gpt2" (byte-level BPE: tokens, merges and a pre-tokenizer name)
and "llama" (sentencepiece-style: tokens ranked by score, byte fallback to <0xNN> pieces). Both
read into the `tokenizers` library; token types are sentencepiece's (see `Vocabulary`).
"""

from __future__ import annotations

import json
from typing import Any

from lav2cli.errors import Lav2Error
from lav2cli.tokenizer import BPETokenizer, Tokenizer

CONTROL, USER_DEFINED = 3, 4  # the token types that become added tokens

# llama.cpp pre-tokenizer names -> split regex (None: plain GPT-2 byte-level regex)
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2_PRE = {"default", "gpt-2", "gpt2", "olmo", "phi-2", "jina-es", "jina-de", "poro-chat", "viking"}


# --- reading -----------------------------------------------------------------------------------


def from_metadata(md: dict[str, Any], where: Any) -> BPETokenizer:
    """The tokenizer of a GGUF file from its metadata fields (`where` names the file in errors)."""
    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise Lav2Error(f"{where}: no tokenizer in the GGUF (tokenizer.ggml.tokens missing)")
    types = md.get("tokenizer.ggml.token_type")
    eos = md.get("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise Lav2Error(f"{where}: GGUF metadata tokenizer.ggml.eos_token_id missing")
    bos = md.get("tokenizer.ggml.bos_token_id")
    pad = md.get("tokenizer.ggml.padding_token_id")
    tmpl = md.get("tokenizer.chat_template")
    if model == "gpt2":
        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise Lav2Error(f"{where}: GGUF metadata tokenizer.ggml.merges missing")
        return byte_level_bpe(
            list(tokens), list(merges), list(types) if types is not None else None, bos, eos, pad,
            md.get("tokenizer.ggml.pre"), add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=tmpl)
    if model == "llama":
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise Lav2Error(f"{where}: GGUF metadata tokenizer.ggml.scores missing")
        return sentencepiece_bpe(
            list(tokens), list(scores), list(types) if types is not None else None, bos, eos, pad,
            md.get("tokenizer.ggml.unknown_token_id", 0),
            add_bos=bool(md.get("tokenizer.ggml.add_bos_token", True)),
            add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)), chat_template=tmpl)
    raise Lav2Error(f"{where}: GGUF tokenizer model {model!r} is not supported (expected 'gpt2' or 'llama')")


def byte_level_bpe(
    tokens: list[str],
    merges: list[str],
    token_types: list[int] | None,
    bos_id: int | None,
    eos_id: int,
    pad_id: int | None = None,
    pre: str | None = None,
    *,
    add_bos: bool = False,
    chat_template: str | None = None,
) -> BPETokenizer:
    """A llama.cpp "gpt2" (byte-level BPE) vocabulary. Control tokens (type 3) become special
    added tokens, user-defined ones (type 4) plain added tokens, so that "<|im_start|>" in text
    encodes to its single id. `pre` is llama.cpp's pre-tokenizer name (tokenizer.ggml.pre)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise Lav2Error("GGUF tokenizer: duplicate tokens in tokenizer.ggml.tokens")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise Lav2Error(f"GGUF tokenizer: bad merge {m!r} in tokenizer.ggml.merges")
        pairs.append((a, b))
    model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    tok = HFTokenizer(model)
    pre = (pre or "default").lower()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("qwen2", "deepseek-r1-qwen"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _GPT2_PRE:
        tok.pre_tokenizer = byte_level
    else:
        raise Lav2Error(f"GGUF tokenizer: pre-tokenizer {pre!r} is not supported "
                        f"(known: {', '.join(sorted(_DIGITS_PRE | _GPT2_PRE))}, llama-bpe, qwen2)")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_typed_tokens(tok, tokens, token_types)
    return BPETokenizer(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos,
                        chat_template=chat_template)


def sentencepiece_bpe(
    tokens: list[str],
    scores: list[float],
    token_types: list[int] | None,
    bos_id: int | None,
    eos_id: int,
    pad_id: int | None = None,
    unk_id: int | None = 0,
    *,
    add_bos: bool = True,
    add_space_prefix: bool = True,
    chat_template: str | None = None,
) -> BPETokenizer:
    """A llama.cpp "llama" (sentencepiece-style) vocabulary: BPE whose merges are ranked by the
    score of the merged piece (llama.cpp's rule), byte fallback to <0xNN> pieces."""
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {t: i for i, t in enumerate(tokens)}
    types = list(token_types) if token_types is not None else [1] * len(tokens)
    ranked = []
    for t, i in vocab.items():
        if types[i] != 1 or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None and types[ia] == 1 and types[ib] == 1:
                ranked.append((-float(scores[i]), i, ia, ib, a, b))
    ranked.sort()
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    model = models.BPE(vocab=vocab, merges=[(r[4], r[5]) for r in ranked], unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
    tok = HFTokenizer(model)
    norms = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(norms + [normalizers.Replace(" ", "\u2581")])
    decs = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decs.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decs)
    _add_typed_tokens(tok, tokens, types)
    return BPETokenizer(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos,
                        chat_template=chat_template)


def _add_typed_tokens(tok: Any, tokens: list[str], types: list[int] | None) -> None:
    from tokenizers import AddedToken

    if types is None:
        return
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


# --- writing -----------------------------------------------------------------------------------


def write(w: Any, tokenizer: Tokenizer) -> None:
    """Add `tokenizer` to the `gguf.GGUFWriter` `w`: a byte-level BPE vocabulary as "gpt2", a
    sentencepiece one as "llama", then the bos/eos/pad ids."""
    v = tokenizer.vocabulary()
    if v.model == "bpe":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_name(v.pre_tokenizer))
        w.add_token_list(v.tokens)
        w.add_token_types(v.types)
        w.add_token_merges(v.merges)
        w.add_add_bos_token(tokenizer.add_bos)
    elif v.model == "sentencepiece":
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(v.tokens)
        w.add_token_scores(v.scores)
        w.add_token_types(v.types)
        if v.unk_id is not None:
            w.add_unk_token_id(v.unk_id)
        w.add_add_bos_token(tokenizer.add_bos)
        w.add_add_space_prefix(True)
    else:
        raise Lav2Error(f"GGUF writer: cannot write a {v.model!r} vocabulary (expected bpe or sentencepiece)")
    if tokenizer.bos_id is not None:
        w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_pad_token_id(tokenizer.pad_id)


def _pre_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer's pre-tokenizer (digits split -> smollm)."""
    pre = json.dumps(pre_tokenizer)
    if '"Digits"' in pre:
        return "smollm"
    if "\\p{N}{1,3}" in pre:
        return "llama-bpe"
    return "gpt-2"
