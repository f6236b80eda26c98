"""Images for training: the frozen encoder's features, cached once on disk (data.feature_cache),
and `train.standardize_features`, which gives clip_proj per-channel standardised features to
train on and folds the standardisation back into a plain projection whenever it is saved; and
where the training images lie in the encoder's feature space, which goes into the artifact for
`lav2cli.answer` to tell images unlike them."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Callable

import torch

from lav2cli.answer import FeatureStats
from lav2cli.data.records import read_records
from lav2cli.engine import Engine, load
from lav2cli.errors import Lav2Error
from lav2cli.fileio import atomic_file, cache_root, sweep
from lav2cli.formats import artifact
from lav2cli.model.adapter import LlamaAdapterV2
from lav2cli.model.vision import load_image
from lav2cli.recipe import TrainSection
from lav2cli.train.distributed import Dist, main_first

ImageFn = Callable[[str], torch.Tensor]  # an image path -> what the model's visual branch reads
FEATURE_STATS_IMAGES = 1024


# -- reading images ----------------------------------------------------------------------------


def image_reader(engine: Engine, paths: list[str], use_cache: bool, d: Dist,
                 log: Callable[[str], None]) -> ImageFn | None:
    """How a batch gets its images: encoder features from the feature cache (`use_cache`), or
    transformed pixels for the encoder to run on at each step. None when the model sees none."""
    if not engine.model.has_visual or engine.image_transform is None or not paths:
        return None
    if use_cache:
        with main_first(d):  # the main process encodes and writes the cache; the others then read it
            return feature_cache(engine, paths, log if d.main else (lambda m: None))
    transform = engine.image_transform
    return lambda p: transform(load_image(p))


def feature_cache(engine: Engine, paths: list[str], log: Callable[[str], None]) -> ImageFn:
    """Encoder features for every image, computed once into a memory-mapped fp16 array on disk
    (keyed by the encoder, the preprocessing and the images' paths, sizes and times) and read
    back lazily: neither encoding nor training holds all features in RAM."""
    import numpy as np

    paths = sorted(set(paths))
    encoder = getattr(engine.model, "clip", None)
    shape = getattr(encoder, "token_layout", None)  # how the encoder turns maps into tokens
    h = hashlib.sha256(json.dumps([engine.config.encoder, engine.config.preprocess.to_dict(), shape]).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    f = cache_root() / "features" / f"{h.hexdigest()[:32]}.npy"
    sweep(f.parent)  # what a killed encoding left (its key may never come back)
    feats = cached_features(f, len(paths), log)
    if feats is not None:
        log(f"image features: {len(paths)} images from the cache {f}")
    else:
        with atomic_file(f, "wb") as out:
            encode_all(engine, paths, out, where=f)
        log(f"image features: {len(paths)} images encoded and cached in {f}")
        feats = np.load(f, mmap_mode="r")
    index = {p: i for i, p in enumerate(paths)}
    return lambda p: torch.from_numpy(np.array(feats[index[p]], dtype=np.float32))


def cached_features(f: Path, n: int, log: Callable[[str], None]):
    """The feature cache `f` memory-mapped, or None when it is missing or damaged (cut short,
    the wrong shape, not an .npy: said in a line naming the file, and encoded again)."""
    import numpy as np

    if not f.is_file():
        return None
    try:
        feats = np.load(f, mmap_mode="r")  # a file shorter than its header says fails here
        size = f.stat().st_size
        if feats.ndim != 3 or feats.shape[0] != n or feats.dtype != np.float16 or size != feats.offset + feats.nbytes:
            raise ValueError(f"{size} bytes holding {feats.dtype}{list(feats.shape)}, expected float16[{n}, ...]")
    except Exception as e:  # whatever is wrong with it, the images are the truth
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log(f"{f}: damaged feature cache ({reason}); encoding the images again")
        return None
    return feats


def reserve(out: IO[bytes], size: int, where: Path) -> None:
    """Allocate the whole file once its size is known (after the first batch): a full disk fails
    here, in one line, before the rest is encoded, and not as a SIGBUS or a torn file later."""
    out.flush()
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(out.fileno(), 0, size)
            return
        free = shutil.disk_usage(where.parent).free
        if free >= size:
            return
        err = OSError(errno.ENOSPC, "not enough free space")
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return  # a filesystem that cannot preallocate: the writes still fail cleanly
        err = e
    free = shutil.disk_usage(where.parent).free
    raise Lav2Error(f"{where}: no space for the image feature cache (needs {size / 1e6:,.1f} MB, "
                    f"{free / 1e6:,.1f} MB free); free some space, set LAV2_CACHE to another disk, or "
                    f"set data.feature_cache = false") from err


@torch.no_grad()
def encode_all(engine: Engine, paths: list[str], out: IO[bytes], batch: int = 64, where: Path | None = None) -> None:
    """Encode every image into the open file `out` as one .npy array [N, tokens, dim] fp16,
    written batch by batch (the whole file reserved once the shape is known, when `where`, the
    file's final name, is given)."""
    import numpy as np
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar, ThreadPoolExecutor(4) as pool:
        task = bar.add_task("encoding images", total=len(paths))
        for i in range(0, len(paths), batch):
            ims = list(pool.map(load_image, paths[i:i + batch]))
            feats = engine.model.encode_images(engine.image_tensor(ims)).to("cpu", torch.float16).numpy()
            if i == 0:  # the shape is known once the encoder has run
                np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(feats.dtype),
                                                           "fortran_order": False,
                                                           "shape": (len(paths), *feats.shape[1:])})
                if where is not None:
                    reserve(out, out.tell() + len(paths) * feats[0].nbytes, where)
            out.write(np.ascontiguousarray(feats).tobytes())
            bar.advance(task, len(ims))


# -- train.standardize_features ----------------------------------------------------------------


def standardizes(t: TrainSection, params: dict[str, torch.nn.Parameter], image_fn: ImageFn | None,
                 log: Callable[[str], None]) -> bool:
    """Whether this run standardises clip_proj's input: asked for, and clip_proj trains on images."""
    on = t.standardize_features and "clip_proj.weight" in params and image_fn is not None
    if t.standardize_features and not on:
        log("train.standardize_features: no visual branch trains in this run, nothing to standardise")
    return on


@torch.no_grad()
def feature_stats(model: LlamaAdapterV2, image_fn: ImageFn, paths: list[str],
                  device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and 1/std of the encoder's tokens over a fixed sample of the training
    images. Centring matters most: on easy-VQA every channel's mean (the white background) is
    several times its spread, and a projection of raw features spends its updates on that
    constant."""
    paths = stats_sample(paths, seed)
    total, squares, n = 0.0, 0.0, 0
    for i in range(0, len(paths), 64):
        x = torch.stack([image_fn(p) for p in paths[i:i + 64]]).to(device)
        f = model.encode_images(x).double().flatten(0, -2)  # [images x tokens, channels]
        total, squares, n = total + f.sum(0), squares + (f * f).sum(0), n + f.shape[0]
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt()
    std = std.clamp_min(1e-3 * float(std.max()) + 1e-12)  # a dead channel is not blown up
    return mean.float().cpu(), std.reciprocal().float().cpu()


def start_standardized(model: LlamaAdapterV2, image_fn: ImageFn, paths: list[str], device: torch.device,
                       seed: int, clip_proj_trained: bool, log: Callable[[str], None]) -> None:
    """Standardise clip_proj's input by the training images' statistics. A clip_proj trained
    before (`clip_proj_trained`: by the artifact this stage continues) is re-expressed on the
    standardised features: same function, new coordinates."""
    stats = feature_stats(model, image_fn, paths, device, seed=seed)
    n = min(len(paths), FEATURE_STATS_IMAGES)
    if clip_proj_trained:
        model.standardize_trained_clip_proj(*stats)
        log(f"features standardised per channel (statistics of {n} training images); "
            f"the source artifact's clip_proj re-expressed on them")
    else:
        model.feature_norm = stats
        log(f"features standardised per channel (statistics of {n} training images)")


def raw_clip_proj(model: LlamaAdapterV2) -> dict[str, torch.Tensor]:
    """What to save of clip_proj while standardising: the plain projection of raw features it
    equals ({} when not standardising)."""
    return model.folded_clip_proj() if model.feature_norm is not None else {}


def feature_norm_state(model: LlamaAdapterV2) -> dict[str, Any] | None:
    """For the trainer state: the statistics and the unfolded clip_proj, so that a resumed run
    continues exactly (None when not standardising)."""
    if model.feature_norm is None:
        return None
    mean, inv_std = model.feature_norm
    return {"mean": mean, "inv_std": inv_std, **{n: p.detach().cpu() for n, p in model.clip_proj.named_parameters()}}


@torch.no_grad()
def restore_feature_norm(model: LlamaAdapterV2, state: dict[str, Any] | None, standardize: bool, where: Path) -> None:
    """Undo what feature_norm_state saved; the run resumed must standardise as this one does."""
    if (state is not None) != standardize:
        raise Lav2Error(f"{where}: train.standardize_features differs from the run being resumed")
    if state is not None:
        model.feature_norm = (state["mean"], state["inv_std"])
        for n, p in model.clip_proj.named_parameters():
            p.copy_(state[n].to(p))


# -- the training images' statistics in the artifact -------------------------------------------


def stats_sample(paths: list[str], seed: int) -> list[str]:
    """The fixed sample of training images that statistics are computed over."""
    paths = sorted(set(paths))
    return random.Random(seed).sample(paths, min(FEATURE_STATS_IMAGES, len(paths)))


@torch.no_grad()
def training_feature_stats(model: LlamaAdapterV2, image_fn: ImageFn, paths: list[str], device: torch.device,
                           seed: int = 0) -> FeatureStats:
    """Where the training images lie in the encoder's feature space (artifact.FEATURE_STATS,
    which ask and eval tell unfamiliar images by), over the sample `feature_stats` takes."""
    sample = stats_sample(paths, seed)
    pooled = [model.encode_images(torch.stack([image_fn(p) for p in sample[i:i + 64]]).to(device)).float().mean(1).cpu()
              for i in range(0, len(sample), 64)]
    return FeatureStats.fit(torch.cat(pooled))


def record_feature_stats(artifact_dir: str | Path, records: list[str | Path], device: str = "auto",
                         seed: int = 0) -> FeatureStats:
    """Write artifact.FEATURE_STATS into an artifact trained before training wrote it, from the
    images of its training records `records`; returns the statistics."""
    artifact_dir = Path(artifact_dir)
    artifact.read_meta(artifact_dir)  # a lav2 artifact, or a one-line error before anything loads
    engine = load(str(artifact_dir), device=device, dtype="float32", inference=True)
    paths = [r.image for f in records for r in read_records(f) if r.image is not None]
    if not engine.model.has_visual or engine.image_transform is None or not paths:
        raise Lav2Error(f"{artifact_dir}: feature statistics need a visual branch and records with images")
    transform = engine.image_transform
    stats = training_feature_stats(engine.model, lambda p: transform(load_image(p)), paths, engine.device, seed)
    with atomic_file(artifact_dir / artifact.FEATURE_STATS, "wb") as f:
        f.write(artifact.feature_stats_file(stats.to_tensors()))
    return stats
