"""One small tokenizer interface, two backends: sentencepiece and byte-level BPE (tokenizers).

- `SentencePieceTokenizer(model_path)`: Meta LLaMA's `tokenizer.model`.
- `BPETokenizer`: anything the `tokenizers` library can run, built from an HF `tokenizer.json`
  (`from_file`) or around a `tokenizers.Tokenizer` (formats/gguf_tokenizer.py builds one from a
  llama.cpp GGUF vocabulary).
- `load_tokenizer(dir_or_file)` picks the backend from the files present.
- `template_for(tokenizer)` names the prompt template its chat template implies.
- `StreamDecoder` turns a growing id list into text increments (holds back incomplete UTF-8).

`encode(text, bos, eos)` never adds anything by itself; `bos=True` prepends the BOS token when the
model uses one (`add_bos`; SmolLM2's vocabulary does not), `eos=True` appends EOS.
`decode(ids, skip_special=True)` drops special/control tokens (what users should see);
`skip_special=False` gives the exact text back, special tokens included. Writers never ask which
backend they hold: `save(dir)` writes the tokenizer's own files, `vocabulary()` lists its tokens
(what a GGUF file stores), `spm_file` is the sentencepiece model Meta's layout can hold (or None).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

from lav2cli.errors import Lav2Error


@dataclass
class Vocabulary:
    """A tokenizer's vocabulary as plain lists, ids as list positions. `types` are sentencepiece's
    piece types (llama.cpp uses the same numbers): 1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte."""

    model: str  # "bpe" (byte-level, ranked by `merges`) or "sentencepiece" (ranked by `scores`)
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)  # "a b", highest priority first (bpe)
    scores: list[float] = field(default_factory=list)  # one per token (sentencepiece)
    pre_tokenizer: dict[str, Any] | None = None  # the tokenizers pre-tokenizer, as JSON (bpe)
    unk_id: int | None = None


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    add_bos: bool  # encode(bos=True) prepends bos_id
    stop_ids: frozenset[int]  # generation stops at any of these (eos, chatml's <|im_end|>, ...)
    chat_template: str | None  # raw chat template from the model files, when present
    spm_file: Path | None  # the sentencepiece model behind it (tokenizer.model), if any

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, i: int) -> str | None: ...

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write the tokenizer's files (HF names) into `directory`; the paths written."""
        ...

    def vocabulary(self) -> Vocabulary: ...


# Tokens that end a turn or a document in common vocabularies; any present joins stop_ids.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


# --- sentencepiece ----------------------------------------------------------------------------


class SentencePieceTokenizer:
    """Meta LLaMA's sentencepiece tokenizer (`tokenizer.model`)."""

    def __init__(self, model_path: str | os.PathLike, chat_template: str | None = None):
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            raise Lav2Error(f"{self.path}: tokenizer model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with long texts
            raise Lav2Error(f"{self.path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        self.vocab_size: int = self.sp.get_piece_size()
        bos = self.sp.bos_id()
        eos = self.sp.eos_id()
        self.bos_id: int | None = bos if bos >= 0 else None
        self.add_bos = self.bos_id is not None
        self.eos_id: int = eos if eos >= 0 else 0
        pad = self.sp.pad_id()
        self.pad_id: int = pad if pad >= 0 else (eos if eos >= 0 else 0)
        stops = {self.eos_id}
        for t in STOP_TOKENS:
            i = self.token_to_id(t)
            if i is not None:
                stops.add(i)
        self.stop_ids: frozenset[int] = frozenset(stops)
        self.chat_template = chat_template
        self._special = frozenset(
            i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        )

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
            return None
        return i

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self.sp.encode(text))
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if not skip_special:
            # sentencepiece renders control tokens as "", so splice their pieces in by hand
            out, run = [], []
            for i in ids:
                if i in self._special and not self.sp.is_unknown(i):
                    if run:
                        out.append(self.sp.decode(run))
                        run = []
                    out.append(self.sp.id_to_piece(i))
                else:
                    run.append(i)
            if run:
                out.append(self.sp.decode(run))
            return "".join(out)
        return self.sp.decode([i for i in ids if i not in self._special])

    @property
    def spm_file(self) -> Path:
        return self.path

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write tokenizer.model (a copy) and an HF tokenizer_config.json into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        t = d / "tokenizer.model"
        if self.path.resolve() != t.resolve():
            shutil.copyfile(self.path, t)
        tc: dict[str, Any] = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": self.id_to_token(self.bos_id) if self.bos_id is not None else None,
            "eos_token": self.id_to_token(self.eos_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
        }
        if self.chat_template:
            tc["chat_template"] = self.chat_template
        f = d / "tokenizer_config.json"
        f.write_text(json.dumps(tc, indent=2) + "\n")
        return [t, f]

    def vocabulary(self) -> Vocabulary:
        sp, n = self.sp, self.vocab_size
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                 else 5 if sp.is_unused(i) else 1 for i in range(n)]
        return Vocabulary(model="sentencepiece", tokens=[sp.id_to_piece(i) for i in range(n)], types=types,
                          scores=[float(sp.get_score(i)) for i in range(n)],
                          unk_id=sp.unk_id() if sp.unk_id() >= 0 else None)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# --- tokenizers (BPE) -------------------------------------------------------------------------


def _token_content(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _read_json(p: Path) -> dict[str, Any]:
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Lav2Error(f"{p}: cannot read JSON ({e})") from None
    return d if isinstance(d, dict) else {}


class BPETokenizer:
    """A `tokenizers.Tokenizer` with the bos/eos/pad/stop ids and chat template of its model."""

    spm_file = None

    def __init__(
        self,
        tok: Any,
        *,
        bos_id: int | None,
        eos_id: int,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
        source: Path | None = None,
    ):
        self.tok = tok
        self.source = source
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id: int = pad_id if pad_id is not None else eos_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        stops = {eos_id, *[int(i) for i in extra_stop_ids]}
        for t in STOP_TOKENS:
            i = tok.token_to_id(t)
            if i is not None:
                stops.add(i)
        self.stop_ids: frozenset[int] = frozenset(stops)

    # constructors ----------------------------------------------------------------------------

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike) -> "BPETokenizer":
        """An HF `tokenizer.json`; bos/eos/chat template from the `tokenizer_config.json`,
        `config.json` and `generation_config.json` next to it when present."""
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(tokenizer_json)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise Lav2Error(f"{p}: tokenizer.json not found")
        try:
            tok = HFTokenizer.from_file(str(p))
        except Exception as e:
            raise Lav2Error(f"{p}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
        d = p.parent
        tcfg = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        mcfg = _read_json(d / "config.json") if (d / "config.json").is_file() else {}
        gcfg = _read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}

        def tid(name: str) -> int | None:
            c = _token_content(tcfg.get(name))
            return tok.token_to_id(c) if c is not None else None

        def first(v: Any) -> tuple[int | None, list[int]]:
            if isinstance(v, int):
                return v, []
            if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
                return v[0], list(v[1:])
            return None, []

        extra: list[int] = []
        eos = tid("eos_token")
        for cfg in (gcfg, mcfg):
            e0, rest = first(cfg.get("eos_token_id"))
            extra += rest + ([e0] if e0 is not None else [])
            if eos is None:
                eos = e0
        bos = tid("bos_token")
        if bos is None:
            bos = first(mcfg.get("bos_token_id"))[0] if "bos_token_id" in mcfg else None
        pad = tid("pad_token")
        if pad is None:
            pad = first(mcfg.get("pad_token_id"))[0]
        if eos is None:
            for t in STOP_TOKENS:
                eos = tok.token_to_id(t)
                if eos is not None:
                    break
        if eos is None:
            raise Lav2Error(f"{p}: no end-of-sequence token (no eos_token in tokenizer_config.json)")
        add_bos = tcfg.get("add_bos_token")
        if add_bos is None:  # HF's default: only when the post-processor inserts it
            add_bos = bos is not None and bos in tok.encode("a", add_special_tokens=True).ids
        tmpl = tcfg.get("chat_template")
        if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default") or next(iter(named.values()), None)
        if tmpl is None and (d / "chat_template.jinja").is_file():
            tmpl = (d / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tok, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=bool(add_bos),
                   chat_template=tmpl if isinstance(tmpl, str) else None, extra_stop_ids=extra, source=p)

    # serialisation ---------------------------------------------------------------------------

    def to_json(self) -> str:
        """The HF tokenizer.json text (the ids and template go to tokenizer_config.json: `save`)."""
        return self.tok.to_str()

    def config_dict(self) -> dict[str, Any]:
        """An HF-style tokenizer_config.json that `from_file` reads back."""
        def name(i: int | None) -> str | None:
            return None if i is None else self.tok.id_to_token(i)

        d: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id),
            "eos_token": name(self.eos_id),
            "pad_token": name(self.pad_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
        }
        if self.chat_template is not None:
            d["chat_template"] = self.chat_template
        return d

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write tokenizer.json and tokenizer_config.json into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        a, b = d / "tokenizer.json", d / "tokenizer_config.json"
        a.write_text(self.to_json(), encoding="utf-8")
        b.write_text(json.dumps(self.config_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [a, b]

    def vocabulary(self) -> Vocabulary:
        """The BPE model's tokens and merges; added tokens typed control (special) or user-defined."""
        d = json.loads(self.to_json())
        model = d["model"]
        if model.get("type") != "BPE":
            raise Lav2Error(f"tokenizer model {model.get('type')} is not BPE: no BPE vocabulary to list")
        tokens = [""] * self.vocab_size
        for t, i in model["vocab"].items():
            tokens[i] = t
        types = [1] * self.vocab_size
        for a in d.get("added_tokens", []):
            tokens[a["id"]] = a["content"]
            types[a["id"]] = 3 if a.get("special") else 4
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return Vocabulary(model="bpe", tokens=tokens, types=types, merges=merges,
                          pre_tokenizer=d.get("pre_tokenizer"))

    # the interface ---------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos={self.eos_id}, source={self.source})"


# --- helpers ----------------------------------------------------------------------------------


class StreamDecoder:
    """Incremental text for a growing id list: `push(id)` returns the new text since the last
    call. Text ending in an incomplete UTF-8 sequence (U+FFFD) is held back until completed."""

    def __init__(self, tokenizer: Any, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        full = self.tokenizer.decode(self.ids, skip_special=self.skip_special)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""
        new, self.text = full[len(self.text):], full
        return new

    def flush(self) -> str:
        full = self.tokenizer.decode(self.ids, skip_special=self.skip_special)
        new = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return new


def load_tokenizer(dir_or_file: str | os.PathLike) -> SentencePieceTokenizer | BPETokenizer:
    """`tokenizer.model` -> sentencepiece, `tokenizer.json` -> BPE (tokenizers). In a directory
    with both, sentencepiece wins unless tokenizer.json knows more tokens (added chat tokens)."""
    p = Path(dir_or_file)
    if p.is_file():
        if p.suffix == ".json":
            return BPETokenizer.from_file(p)
        tmpl = _template_near(p.parent)
        return SentencePieceTokenizer(p, chat_template=tmpl)
    if not p.is_dir():
        raise Lav2Error(f"{p}: no such tokenizer file or directory")
    spm_path, json_path = p / "tokenizer.model", p / "tokenizer.json"
    if spm_path.is_file():
        sp = SentencePieceTokenizer(spm_path, chat_template=_template_near(p))
        if json_path.is_file():
            bpe = BPETokenizer.from_file(json_path)
            if bpe.vocab_size > sp.vocab_size:
                return bpe
        return sp
    if json_path.is_file():
        return BPETokenizer.from_file(json_path)
    raise Lav2Error(f"{p}: no tokenizer found (expected tokenizer.model or tokenizer.json)")


def _template_near(d: Path) -> str | None:
    f = d / "tokenizer_config.json"
    if f.is_file():
        t = _read_json(f).get("chat_template")
        if isinstance(t, str):
            return t
    return None


def template_for(tokenizer: Tokenizer) -> str:
    """The prompt template a model's own chat template implies: "chatml" when it is ChatML
    (<|im_start|> ... <|im_end|>), else lav2's default "alpaca"."""
    t = tokenizer.chat_template
    return "chatml" if t and "<|im_start|>" in t else "alpaca"
