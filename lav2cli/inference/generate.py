"""Generation: a static KV cache, left-padded batched prefill (a prefix all text-only rows share
computed once), prompt K/V computed once per request, greedy or temperature/top-p sampling,
penalties on tokens already generated, and an optionally compiled decode step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lav2cli.errors import Lav2Error
from lav2cli.model.adapter import LlamaAdapterV2


@dataclass
class Sampling:
    """How the next token is chosen. The penalties look at the tokens this answer has generated
    so far (not the prompt, so that an answer may still quote its context):

    - repetition_penalty (CTRL-style, 1.0 = off): a seen token's logit is divided by it when
      positive and multiplied by it when negative, so > 1 makes every seen token less likely;
    - frequency_penalty (OpenAI-style, 0.0 = off): subtracted from a token's logit once per
      time the token was generated;
    - presence_penalty (OpenAI-style, 0.0 = off): subtracted once from every generated token.
    """

    max_new_tokens: int = 256
    temperature: float = 0.1  # 0 = greedy
    top_p: float = 0.75
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise Lav2Error(f"repetition penalty {self.repetition_penalty}: expected a positive number (1.0 is off)")

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Logits [B, V] with `sampling`'s penalties for the tokens generated so far (`counts` [B, V]:
    how often each row generated each token). Neutral penalties return `logits` itself."""
    if not sampling.penalizes:
        return logits
    seen = counts > 0
    r = sampling.repetition_penalty
    if r != 1.0:
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if sampling.frequency_penalty != 0.0:
        logits = logits - sampling.frequency_penalty * counts
    if sampling.presence_penalty != 0.0:
        logits = logits - sampling.presence_penalty * seen.to(logits.dtype)
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        keep[..., 0] = True  # top_p = 0 means greedy, not an empty set
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
        return idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _decode_step(model: LlamaAdapterV2, token, input_pos, pad, prompt_kv):
    return model(token, input_pos=input_pos, pad=pad, prompt_kv=prompt_kv, last_only=True)[:, -1].float()


_compiled: dict[str, Callable] = {}
CACHE_BUCKET = 512
# steps the host may queue before it reads the tokens: a CUDA device need not wait for the host
# after every step; on a CPU, host and device are one, and a step run past a stop is time lost
READ_AHEAD = {"cuda": 8}
MIN_SHARED_PREFIX = 8  # below this, one more forward pass costs more than it saves


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own (whose logits start
    the answer)."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for i in range(n):
        if any(p[i] != first[i] for p in prompts):
            return i
    return max(n, 0)


def _prefill_shared_prefix(model: LlamaAdapterV2, prompts: Sequence[Sequence[int]], pad: list[int],
                           prompt_kv: list | None) -> int:
    """Text-only rows that share a prefix (a template's system turn, an instruction) get its K/V
    computed once, in a batch of one, and copied into each row's slots: every row's prefix sits at
    positions 0..P-1 whatever its left padding, so the K/V (RoPE included) are the same. Call with
    the batch's cache set up and its text-only `prompt_kv` (batch-independent). Returns the first
    cache slot the batched prefill still computes."""
    p = shared_prefix_len(prompts)
    if len(prompts) < 2 or p < MIN_SHARED_PREFIX:
        return 0
    layers = model.llama.layers
    device = model.llama.tok_embeddings.weight.device
    batch_caches = [layer.attention.kv_cache for layer in layers]
    model.setup_cache(1, p)
    try:
        model(torch.tensor([list(prompts[0][:p])], device=device), input_pos=torch.arange(p, device=device),
              pad=torch.zeros(1, dtype=torch.long, device=device), prompt_kv=prompt_kv, last_only=True)
        for layer, cache in zip(layers, batch_caches):
            one = layer.attention.kv_cache
            for r, n in enumerate(pad):
                cache.k[r, :, n:n + p] = one.k[0, :, :p]
                cache.v[r, :, n:n + p] = one.v[0, :, :p]
    finally:
        for layer, cache in zip(layers, batch_caches):
            layer.attention.kv_cache = cache
    # rows padded more than the least-padded one recompute a few prefix tokens: the same K/V
    return min(pad) + p


def _pad_batch(prompts: Sequence[Sequence[int]], images: torch.Tensor | None, image_mask: torch.Tensor | None,
               size: int) -> tuple[list, torch.Tensor | None, torch.Tensor | None]:
    """The batch grown to `size` rows by repeating its last row (whose answers are dropped)."""
    extra = size - len(prompts)
    if extra <= 0:
        return list(prompts), images, image_mask

    def grow(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])

    return list(prompts) + [prompts[-1]] * extra, grow(images), grow(image_mask)


def decode_step_fn(compile: bool, device: torch.device) -> Callable:
    """The one-token step; compiled once per process when asked (shapes are static)."""
    if not compile:
        return _decode_step
    key = device.type
    if key not in _compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _compiled[key] = torch.compile(_decode_step, mode=mode, fullgraph=False, dynamic=False)
    return _compiled[key]


@torch.no_grad()
def generate(
    model: LlamaAdapterV2,
    prompts: Sequence[Sequence[int]],
    *,
    stop_ids: frozenset[int] | set[int],
    pad_id: int,
    images: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    sampling: Sampling = Sampling(),
    on_token: Callable[[int, list[int]], bool | None] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Generate continuations for a batch of token-id prompts of any lengths.

    Returns the new tokens of each row, without the stop token. `on_token(row, new_ids)`
    is called after each step for every row still running (used for streaming); when it returns
    True, that row stops there (a stop string, a client gone), and the batch ends when no row runs.
    """
    device = model.llama.tok_embeddings.weight.device
    n_rows = len(prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt")
    if compile:  # the step is specialised to the batch size: pad it to a power of two (few graphs)
        prompts, images, image_mask = _pad_batch(prompts, images, image_mask, 1 << (n_rows - 1).bit_length())
    B = len(prompts)
    lens = [len(p) for p in prompts]
    t0 = max(lens)
    total = t0 + sampling.max_new_tokens
    if compile:  # the cache length is part of the compiled graph: bucket it so requests share one
        total = -(-total // CACHE_BUCKET) * CACHE_BUCKET
    tokens = torch.full((B, t0), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, t0 - len(p):] = torch.tensor(p, dtype=torch.long)
    pads = [t0 - n for n in lens]
    pad = torch.tensor(pads, device=device)
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=device)
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()  # fresh entropy for this generator only; the global RNG is untouched

    model.setup_cache(B, total)
    try:
        prompt_kv = model.prompt_kv(images, image_mask)
        # with images, each row's prompts (and so its prefix K/V) differ
        start = _prefill_shared_prefix(model, prompts, pads, prompt_kv) if images is None else 0
        logits = model(tokens[:, start:], input_pos=torch.arange(start, t0, device=device), pad=pad,
                       prompt_kv=prompt_kv, last_only=True)[:, -1].float()
        step = decode_step_fn(compile, device)
        out: list[list[int]] = [[] for _ in range(n_rows)]  # padding rows are not read
        done = [False] * n_rows
        # the host reads new tokens (stop checks, streaming) every `read_every` steps; in between
        # it queues the next steps without waiting for the device (positions stay on the device)
        read_every = 1 if on_token is not None else READ_AHEAD.get(device.type, 1)
        unread: list[torch.Tensor] = []
        pos = torch.full((1,), t0, device=device)
        # how often each row generated each token, for the penalties (kept on the device)
        counts = torch.zeros(logits.shape, dtype=torch.float32, device=device) if sampling.penalizes else None
        for i in range(sampling.max_new_tokens):
            if counts is not None:
                logits = apply_penalties(logits, counts, sampling)
            nxt = sample_next(logits, sampling.temperature, sampling.top_p, generator)
            if counts is not None:
                counts.scatter_add_(1, nxt[:, None], torch.ones_like(nxt[:, None], dtype=counts.dtype))
            unread.append(nxt)
            last = i == sampling.max_new_tokens - 1
            if len(unread) == read_every or last:
                for r, ids in enumerate(torch.stack(unread, 1).tolist()[:n_rows]):
                    for t in ids:
                        if done[r] or t in stop_ids:
                            done[r] = True
                            break
                        out[r].append(t)
                        if on_token is not None and on_token(r, out[r]):
                            done[r] = True
                            break
                unread.clear()
                if all(done):
                    break
            if last:
                break
            logits = step(model, nxt[:, None], pos, pad, prompt_kv)
            pos = pos + 1
        return out
    finally:
        model.clear_cache()
