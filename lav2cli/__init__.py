"""lav2: LLaMA-Adapter V2 as a command-line toolkit."""

__version__ = "0.1.0"
