"""`lav2 merge`: fold an adapter's bias, scale, LoRA and norms into plain LLaMA weights.

The folding itself lives in `lav2cli.inference.fold` (the maths inference shares):
every adapted linear becomes `W' = diag(s) (W + B A)`, `b' = s * b`, and the trained norms
replace the base's, all in float32, then one cast to the output dtype.

What cannot fold stays a small lav2 artifact (the "sidecar": lav2.json + adapter.safetensors)
in the same directory: the adaption prompts, the gates (and new_gate), the visual branch, and,
when LoRA was folded into wk/wv of prompt layers, a prompt-only LoRA pair that gives the prompt
keys/values back the projection without LoRA (the prompt path never saw LoRA). Its adapter
config has bias, scale and LoRA off, so inference runs plain `F.linear(x, W, b)`.

Output layouts (`--format`):
  lav2  llama.safetensors (Meta names, `.bias` for biased linears) + tokenizer + lav2.json
        (+ adapter.safetensors); `engine.load(DIR)` / `lav2 ask --model DIR` use it directly.
  hf    a Hugging Face Llama checkpoint (transformers' LlamaForCausalLM loads it), plus the
        sidecar when something did not fold.
  meta  consolidated.00.pth + params.json + tokenizer.model (`.bias` names), plus the sidecar
        when something did not fold (or when the tokenizer is BPE: tokenizer.json, which
        Meta's layout has no place for).
The directory is written atomically, and, unless verify=False, loaded back and compared with
the unmerged model on a few probe prompts (and an image, when there is a visual branch).

An adapter trained on a quantised base (`training.quantize` in its lav2.json, e.g. "int4:64")
learned on top of the dequantised weights: merge quantises the base the same way, folds into
the dequantised weights in float32 and writes float weights (never quantised ones), so the merged
model computes what the trained one did. `float_base=True` folds into the original float weights
instead.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from lav2cli import __version__, engine
from lav2cli.errors import Lav2Error
from lav2cli.fileio import atomic_dir, lock, refuse_overwrite
from lav2cli.formats import artifact, classify, hf
from lav2cli.formats import meta as meta_fmt
from lav2cli.formats.io import stored_dtype
from lav2cli.formats.merged import FOLDED
from lav2cli.inference.fold import folded_base, gates_open, sidecar

FORMATS = ("lav2", "hf", "meta")
PROBES = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "What is the capital of France?",
    "1 2 3 4 5 6 7 8 9 10",
)
@dataclass
class MergeResult:
    out: str
    format: str
    dtype: str
    folded: list[str]
    kept: list[str]  # what stays in the sidecar (empty: plain weights only)
    sidecar_params: int
    # the quantisation the adapter trained with, whose dequantised base was folded into (None: the
    # float base); the written weights are float either way
    base_quantize: str | None = None
    max_logit_diff: float | None = None
    probes: int = 0
    with_image: bool = False
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)




# -- the command --------------------------------------------------------------------------------


def _probe_image():
    """A fixed, deterministic RGB test image (gradients and a disc)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:224, 0:224].astype(np.float32) / 223.0
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(np.float32)
    rgb = np.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def _probe_tokens(tokenizer, vocab: int) -> list[torch.Tensor]:
    out = []
    for text in PROBES:
        ids = [i for i in tokenizer.encode(text, bos=True) if 0 <= i < vocab][:64]
        if ids:
            out.append(torch.tensor([ids]))
    return out


def _logits(eng, probes, image) -> list[torch.Tensor]:
    res = [eng.logits(t).cpu() for t in probes]
    if image is not None:
        res += [eng.logits(t, image).cpu() for t in probes]
    return res


def _check_out(out: Path, force: bool) -> None:
    if out.is_file():
        raise Lav2Error(f"--out {out}: a file; merge writes a folder")
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):  # replacing it would pull the folder from under the shell
        raise Lav2Error(f"--out {out}: the current folder (or one above it) cannot be replaced; "
                        f"give a new folder, e.g. --out {out / 'merged'}")
    if out.exists() and not force:
        if out.is_file() or any(out.iterdir()):
            raise Lav2Error(f"--out {out}: exists and is not empty (pass --force to replace it)")


def trained_quantize(kind: str, path: Path | None) -> str | None:
    """The quantisation an artifact's last stage trained with ("int8", "int4:64"), or None."""
    if kind != "artifact" or path is None:
        return None
    meta = artifact.read_meta(path)
    if meta.get("merged"):  # its base is already the folded float one
        return None
    q = (meta.get("training") or {}).get("quantize")
    return None if q in (None, "none") else q


def merge(ref: str, out: str | Path, *, format: str = "lav2", dtype: str = "auto", base: str | None = None,
          clip: str | None = None, device: str = "auto", force: bool = False, verify: bool = True,
          float_base: bool = False, log: Callable[[str], None] = lambda m: None) -> MergeResult:
    """Fold the adapter at `ref` into plain weights at `out` (see the module docstring)."""
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise Lav2Error(f"unknown --format {format!r} (expected {', '.join(FORMATS)})")
    if dtype != "auto" and dtype not in engine.DTYPES:
        raise Lav2Error(f"unknown --dtype {dtype!r} (expected auto, {', '.join(engine.DTYPES)})")
    out = Path(out).expanduser()
    _check_out(out, force)
    kind, path = classify(str(ref))
    if kind == "base":
        raise Lav2Error(f"{ref}: a base model, not an adapter: nothing to merge "
                        f"(expected a lav2 artifact directory or an official LLaMA-Adapter .pth)")
    refuse_overwrite(out, {"the adapter being merged": path, "the --base model": base})
    if out.parent.exists():  # a writer holding --out (a training run) is refused before anything loads
        with lock(out, wait=False):
            pass

    base_quantize = None if float_base else trained_quantize(kind, path)
    log(f"loading {ref} (float32{f', the base quantised {base_quantize} as in training' if base_quantize else ''}) ...")
    eng = engine.load(str(ref), base=base, clip=clip, device=device, dtype="float32", quantize=base_quantize)
    model, c = eng.model, eng.config
    if c.adapter is None:
        raise Lav2Error(f"{ref}: has no adapter: nothing to merge")
    # the base an artifact names (not only --base) is read too
    refuse_overwrite(out, {f"the model file {f.name}": f for f in c.files})
    n_adapter_files = 2 if kind == "artifact" else 1
    out_dt = engine.DTYPES[dtype] if dtype != "auto" else stored_dtype(c.files[: len(c.files) - n_adapter_files])

    probes = image = None
    ref_logits: list[torch.Tensor] = []
    if verify:
        probes = _probe_tokens(eng.tokenizer, c.llama.vocab_size)
        if model.has_visual and eng.image_transform is not None and gates_open(model):
            image = eng.image_tensor([_probe_image()])
        log(f"reference logits on {len(probes)} probe prompt(s){' with and without an image' if image is not None else ''} ...")
        ref_logits = _logits(eng, probes, image)

    log("folding in float32 ...")
    folded, fold_kinds = folded_base(model)
    side_cfg, side_sd, kept = sidecar(model)
    folded = {k: v.to(out_dt).cpu().contiguous() for k, v in folded.items()}
    biased = sorted({k.split(".")[3] for k in folded if k.endswith(".bias")})
    llama_cfg = replace(c.llama, linear_bias=biased)
    tokenizer = eng.tokenizer
    spm = tokenizer.spm_file is not None  # Meta's layout holds a sentencepiece model, nothing else
    write_meta = format == "lav2" or bool(kept) or (format == "meta" and not spm)
    enc, pre = (c.encoder, c.preprocess) if side_cfg is not None and side_cfg.visual is not None else (None, None)
    del model
    eng.model = None  # free the unmerged weights before the merged ones are loaded back

    result = MergeResult(out=str(out), format=format, dtype=engine.dtype_name(out_dt), folded=fold_kinds, kept=kept,
                         sidecar_params=sum(t.numel() for t in side_sd.values()), base_quantize=base_quantize)
    log(f"writing {format} layout ({result.dtype}) ...")
    with atomic_dir(out, wait=False) as tmp:  # a second merge into the same --out is refused
        plain_cfg = replace(c.llama, linear_bias=[])
        if format == "lav2":
            save_file(folded, str(tmp / FOLDED), metadata={"format": "pt", "layout": "meta"})
            tokenizer.save(tmp)
        elif format == "hf":
            hf.save(tmp, plain_cfg, folded, tokenizer=tokenizer)
        else:
            meta_fmt.save(tmp, plain_cfg, folded, tokenizer_model_path=tokenizer.spm_file)
            if not spm:
                tokenizer.save(tmp)
        meta: dict[str, Any] = {}
        if write_meta:
            save_file({k: v.contiguous().cpu() for k, v in side_sd.items()}, str(tmp / artifact.WEIGHTS))
            meta = artifact.compose_meta(
                side_cfg, base_ref=".", base_format=f"merged-{format}", llama=llama_cfg, encoder=enc, preprocess=pre,
                template=c.template, training=c.meta.get("training"),
                self_caption=bool(c.meta.get("self_caption")),  # it answers as the unmerged model did
                merged={"from": str(ref), "format": format, "dtype": result.dtype, "folded": fold_kinds,
                        "kept": kept, "adapter": c.adapter.to_dict(), "base_quantize": base_quantize})
            (tmp / artifact.META).write_text(json.dumps(meta, indent=2) + "\n")
            if c.feature_stats:  # the unfamiliar-image check keeps working on the merged model
                (tmp / artifact.FEATURE_STATS).write_bytes(artifact.feature_stats_file(c.feature_stats))
        if verify:
            log("verifying: loading the merged directory back ...")
            merged = engine.load(str(tmp), device=device, dtype="float32")
            m = merged.model
            if m.adapter is not None:  # nothing but plain linears left on the token path
                assert not m.adapter.bias and not m.adapter.scale and not m.adapter.lora_rank
            new_logits = _logits(merged, probes, image)
            diff = max((float((a - b).abs().max()) for a, b in zip(ref_logits, new_logits)), default=0.0)
            scale_ = max((float(a.abs().max()) for a in ref_logits), default=1.0)
            result.max_logit_diff, result.probes, result.with_image = diff, len(probes), image is not None
            del merged, m
            if not diff == diff or (out_dt == torch.float32 and diff > 1e-3 * max(1.0, scale_)):
                raise Lav2Error(f"merged model differs from {ref}: max logit difference {diff:.3g} "
                                f"(nothing written; please report this)")
            if write_meta:
                meta["merged"]["max_logit_diff"] = diff
                (tmp / artifact.META).write_text(json.dumps(meta, indent=2) + "\n")
        result.files = sorted(p.name for p in tmp.iterdir())
    return result


def main(ref: str, out: Path, format: str, dtype: str, base: str | None, clip: str | None, device: str,
         force: bool, verify: bool, as_json: bool, float_base: bool = False) -> None:
    """`lav2 merge` behind the CLI: progress on stderr, the result on stdout."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False)

    def log(msg: str) -> None:
        err.print(msg, markup=False, soft_wrap=True)

    r = merge(ref, out, format=format, dtype=dtype, base=base, clip=clip, device=device, force=force,
              verify=verify, float_base=float_base, log=log)
    log(f"folded: {', '.join(r.folded) or 'nothing'}")
    if r.base_quantize:
        log(f"the adapter was trained on a base quantised {r.base_quantize}: folded into that base dequantised, "
            f"written as {r.dtype} weights (not quantised); --float-base folds into the original float weights")
    if r.kept:
        log(f"kept outside the plain weights ({r.sidecar_params:,} parameters in lav2.json + adapter.safetensors): "
            + "; ".join(r.kept)
            + ("; transformers and other plain LLaMA loaders ignore these" if r.format != "lav2" else ""))
    else:
        log("nothing stays outside: the directory holds plain LLaMA weights"
            + (" (with biases)" if any(k == "bias" for k in r.folded) else ""))
    if r.max_logit_diff is not None:
        log(f"verified: max |logit difference| merged vs unmerged {r.max_logit_diff:.3g} "
            f"on {r.probes} probe prompt(s){' (text and image)' if r.with_image else ''}, {r.dtype}")
    if as_json:
        print(json.dumps(r.to_dict()))
    else:
        print(r.out)
