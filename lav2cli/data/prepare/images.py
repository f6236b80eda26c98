"""The image check: each distinct image opened and fully decoded once, in a thread pool
(PIL is imported only when images are checked)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

from lav2cli.data.prepare.items import MISSING_IMAGE, UNREADABLE_IMAGE
from lav2cli.data.prepare.job import UI

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_bad_images(paths: Iterable[str], workers: int, ui: UI | None = None) -> dict[str, tuple[str, str]]:
    """Open and decode each path once, in threads; returns ``{path: (reason, detail)}`` for the bad ones.

    PIL's ``LOAD_TRUNCATED_IMAGES`` is forced off meanwhile so that truncated files fail.
    """
    from PIL import ImageFile

    paths = sorted(set(paths))
    ui = ui or UI(quiet=True)
    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    bad: dict[str, tuple[str, str]] = {}
    try:
        with ui.progress("checking images", len(paths)) as advance:
            with ThreadPoolExecutor(workers) as pool:
                for path, result in zip(paths, pool.map(_check_image, paths)):
                    if result is not None:
                        bad[path] = result
                    advance(1)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return bad


def _check_image(path: str) -> tuple[str, str] | None:
    """None if ``path`` opens and fully decodes, else ``(reason, detail)``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        return MISSING_IMAGE, path
    except Exception as e:  # truncated, not an image, unsupported mode, a directory, ...
        return UNREADABLE_IMAGE, f"{path}: {type(e).__name__}: {e}"
    return None
