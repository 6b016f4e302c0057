"""Short names (``qvq pull qvq``, ``qvq ask -m qvq``) for known-good published repos, per platform.

Each entry names one source for Apple Silicon (an MLX repo, run by mlx-vlm) and one for everything else
(a GGUF repo and quantisation, run by llama.cpp).  Sizes are the download sizes of the files qvq fetches
from that repo, as the hub listed them; ``qvq models --available`` shows them with whether the model fits
this machine (:func:`qvq_local.doctor.available_rows`: weights, KV cache at qvq ask's default context,
overhead).

Checked against the hub's published file lists (the project's search index; no hub is reachable from the
machines this was written on):

* ``lmstudio-community/QVQ-72B-Preview-GGUF``: ``QVQ-72B-Preview-Q4_K_M.gguf`` 47.4 GB and one projector,
  ``mmproj-model-f32.gguf`` 1.4 GB (the Dec 2024 listing).
* ``mlx-community/QVQ-72B-Preview-4bit``: exists, 8 safetensors shards, converted by mlx-vlm 0.1.6.  Its
  total size was NOT seen in a listing: 41 GB is this project's own estimate for QVQ-72B at MLX 4-bit
  (DESIGN.md), not a measured figure.

* ``Qwen/Qwen3-VL-4B-Thinking-GGUF`` and ``Qwen/Qwen3-VL-8B-Thinking-GGUF``: Qwen's own GGUF repos
  (language model in F16, Q8_0 and Q4_K_M; projector in F16 and Q8_0, as their model cards list them;
  ``llama-server -hf Qwen/Qwen3-VL-4B-Thinking-GGUF:Q4_K_M`` is the card's own example).  Their file
  sizes were NOT seen: the sizes below are estimates (text parameters x 4.85 bits for Q4_K_M, vision
  parameters x 16 bits for the F16 projector).
* ``mlx-community/Qwen3-VL-4B-Thinking-4bit`` / ``-8B-Thinking-4bit``: mlx-community's Qwen3-VL
  collection holds the 4-bit conversions (``Qwen3-VL-4B-Instruct-4bit`` was seen); the Thinking repos'
  names follow the same pattern but were NOT seen in a listing.  Sizes: estimates (4.5 bits a weight).

* ``Qwen/Qwen3-VL-30B-A3B-Thinking-GGUF``: Qwen's own (projector ``mmproj-Qwen3VL-30B-A3B-Thinking-*.gguf``,
  seen linked from other projects); a third-party table gives Q4_K_M 18.6 GiB and the F16 projector
  1.08 GB, which the size below adds up (not read from a listing here: an estimate).
  ``mlx-community/Qwen3-VL-30B-A3B-Thinking-4bit``: the collection's naming, NOT seen; size estimated
  (text 30.5B parameters x 4.5 bits, the ViT at 16 bits).
* ``unsloth/Qwen3.5-{4B,9B,35B-A3B}-GGUF``: seen in other projects' pins, ``Qwen3.5-9B-Q4_K_M.gguf``
  5,680,522,464 bytes (one project's record of the hub's size: 5.08 bits a text weight); the other
  sizes are estimated at that rate, and every projector (F16 of the ViT: 0.9 GB for 9B and 35B-A3B,
  0.66 GB for 4B) too, so every Qwen3.5 size here is an estimate.
  ``mlx-community/Qwen3.5-9B-MLX-4bit`` (and ``-2B-MLX-4bit``) were seen; ``-4B-`` and ``-35B-A3B-``
  follow the naming, NOT seen.  Sizes: estimates (4.5 bits a text weight, the ViT at 16 bits).

Qwen2.5-VL has no entry: no repo with a matching projector was found in a listing (``owner/repo:QUANT``
works for any of them).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1000**3


@dataclass(frozen=True)
class Source:
    ref: str  # owner/repo[:QUANT], what qvq_local.hub resolves
    format: str  # "gguf" or "mlx"
    size: int  # download bytes (model + projector)
    size_checked: bool  # False: an estimate, not read from the repo's listing


@dataclass(frozen=True)
class Entry:
    name: str
    title: str
    shape: str  # the family's shape name (dimensions for the KV-cache estimate)
    apple: Source
    other: Source
    family: str = "Qwen2-VL"  # the registered family whose ``shape`` gives the dimensions

    def source(self, apple_silicon: bool | None = None) -> Source:
        if apple_silicon is None:
            from qvq_local.hardware import is_apple_silicon

            apple_silicon = is_apple_silicon()
        return self.apple if apple_silicon else self.other


CATALOGUE: dict[str, Entry] = {
    "qvq": Entry(
        name="qvq",
        title="QVQ-72B-Preview",
        shape="72b",
        apple=Source("mlx-community/QVQ-72B-Preview-4bit", "mlx", 41 * GB, size_checked=False),
        other=Source(
            "lmstudio-community/QVQ-72B-Preview-GGUF:Q4_K_M", "gguf", int(48.8 * GB), size_checked=True
        ),
    ),
    "qwen3-vl-4b": Entry(
        name="qwen3-vl-4b",
        title="Qwen3-VL-4B-Thinking",
        shape="4b",
        family="Qwen3-VL",
        apple=Source("mlx-community/Qwen3-VL-4B-Thinking-4bit", "mlx", int(2.6 * GB), size_checked=False),
        other=Source("Qwen/Qwen3-VL-4B-Thinking-GGUF:Q4_K_M", "gguf", int(3.3 * GB), size_checked=False),
    ),
    "qwen3-vl-30b-a3b": Entry(
        name="qwen3-vl-30b-a3b",
        title="Qwen3-VL-30B-A3B-Thinking",
        shape="30b-a3b",
        family="Qwen3-VL-MoE",
        apple=Source(
            "mlx-community/Qwen3-VL-30B-A3B-Thinking-4bit", "mlx", int(18.3 * GB), size_checked=False
        ),
        other=Source(
            "Qwen/Qwen3-VL-30B-A3B-Thinking-GGUF:Q4_K_M", "gguf", int(21.1 * GB), size_checked=False
        ),
    ),
    "qwen3.5-4b": Entry(
        name="qwen3.5-4b",
        title="Qwen3.5-4B",
        shape="4b",
        family="Qwen3.5",
        apple=Source("mlx-community/Qwen3.5-4B-MLX-4bit", "mlx", int(3.0 * GB), size_checked=False),
        other=Source("unsloth/Qwen3.5-4B-GGUF:Q4_K_M", "gguf", int(3.3 * GB), size_checked=False),
    ),
    "qwen3.5-9b": Entry(
        name="qwen3.5-9b",
        title="Qwen3.5-9B",
        shape="9b",
        family="Qwen3.5",
        apple=Source("mlx-community/Qwen3.5-9B-MLX-4bit", "mlx", int(5.9 * GB), size_checked=False),
        other=Source("unsloth/Qwen3.5-9B-GGUF:Q4_K_M", "gguf", int(6.6 * GB), size_checked=False),
    ),
    "qwen3.5-35b-a3b": Entry(
        name="qwen3.5-35b-a3b",
        title="Qwen3.5-35B-A3B",
        shape="35b-a3b",
        family="Qwen3.5-MoE",
        apple=Source("mlx-community/Qwen3.5-35B-A3B-MLX-4bit", "mlx", int(20.4 * GB), size_checked=False),
        other=Source("unsloth/Qwen3.5-35B-A3B-GGUF:Q4_K_M", "gguf", int(22.9 * GB), size_checked=False),
    ),
    "qwen3-vl-8b": Entry(
        name="qwen3-vl-8b",
        title="Qwen3-VL-8B-Thinking",
        shape="8b",
        family="Qwen3-VL",
        apple=Source("mlx-community/Qwen3-VL-8B-Thinking-4bit", "mlx", int(5.0 * GB), size_checked=False),
        other=Source("Qwen/Qwen3-VL-8B-Thinking-GGUF:Q4_K_M", "gguf", int(6.2 * GB), size_checked=False),
    ),
}


def lookup(name: str) -> Entry | None:
    return CATALOGUE.get(name.strip().lower())
