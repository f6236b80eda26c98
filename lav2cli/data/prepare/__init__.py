"""`lav2 prepare`: convert real datasets into lav2 records plus a manifest.

Entry point: :func:`prepare` (``prepare("coco", "out/train.jsonl", annotations=..., images=...)``).
Each source is one module with a generator, ``convert(job, **options)``, that turns its input into
a stream of records and skip notes (:mod:`.items`): :mod:`.coco` (with Karpathy), :mod:`.table`
(csv), :mod:`.alpaca`, :mod:`.llava`, :mod:`.mme`, :mod:`.easyvqa` and :mod:`.distill`.
Everything else is shared: :mod:`.job` (what a converter may use), :mod:`.images` (the image
check), :mod:`.pipeline` (the stages every source runs through, the validation split and the
manifest) and :mod:`.output` (the atomic writes and the summary).

Only distill imports torch (it runs a model); PIL and rich are imported only when used.
"""

from lav2cli.data.prepare.pipeline import SOURCES, prepare

__all__ = ["SOURCES", "prepare"]
