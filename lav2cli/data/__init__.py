"""Data: the record schema (:mod:`.records`) and the ``lav2 prepare`` converters (:mod:`.prepare`).

Kept torch-free so that ``lav2 --help`` and ``lav2 prepare`` start fast.
"""

from lav2cli.data.records import KINDS, Record, read_records

__all__ = ["KINDS", "Record", "read_records"]
