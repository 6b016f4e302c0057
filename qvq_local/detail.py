"""Image detail: how many image tokens one image may become, by name, and the default for this machine.

Why levels and not only ``--max-pixels``: the right bound depends on the model's grid (a Qwen2-VL token is
28x28 pixels, a Qwen3-VL token 32x32) and on the machine (on a GPU an image of 1,280 tokens encodes in a
fraction of a second; on a 2-core CPU one of 256 tokens already costs ~10 s).  A level names an image-token
budget; the pixel bound follows from the family's grid:

=======  =====================  ===================================  ===================================
level    image tokens, at most  Qwen2-VL, Qwen2.5-VL (28 px tokens)  Qwen3-VL (32 px tokens)
=======  =====================  ===================================  ===================================
low      256                    200,704 px: 448x448 square, 256      262,144 px: 512x512 square, 256
medium   576                    451,584 px: 672x672 square, 576      589,824 px: 768x768 square, 576
high     1,280                  1,003,520 px: 980x980 square, 1,225  1,310,720 px: 1120x1120, 1,225
max      16,384 (processor)     12,845,056 px: 3584x3584, 16,384     16,777,216 px: 4096x4096, 16,384
=======  =====================  ===================================  ===================================

Qwen's guidance is 256-1,280 image tokens per image, and grounding or small text needs 1,024 or more
(llama.cpp warns below that for Qwen-VL; mlx-vlm #1175 measured grounding IoU 0.54 at 256): ``high`` is the
top of that range, ``low`` its bottom (and this project's bound since the start).  ``max`` is the family
processor's own limit; llama.cpp's mtmd caps an image at 4,096 tokens on its side whatever is asked.  The
token count of an image is its grid (``width/28 x height/28`` after the resize), so a square image gets
the largest square grid within the budget (35x35 = 1,225 at ``high``); other shapes get up to the budget.
Every level also keeps the family's minimum (Qwen3-VL's processor scales an image below
65,536 pixels, 64 tokens, up to it; Qwen2-VL's minimum is 3,136 pixels, 4 tokens).

The default level (``auto``) comes from the machine that encodes the image:

* a GPU (CUDA, Metal) or an Apple Silicon Mac: ``high``;
* a remote server (``--backend openai``): ``high``, and the server bounds images by its own rule too;
* a CPU: the highest level whose estimated encode of one image stays within :data:`CPU_ENCODE_TARGET_S`,
  ``low`` at least; the estimate is the encode time measured on a 2-core CPU for QVQ's vision tower
  (:data:`CPU_CORE_SECONDS`, the 2b shape's 32-layer, 1280-wide ViT, the same tower as QVQ-72B's), divided
  by the cores.  A 2-core CPU keeps ``low`` (256 tokens); 16 cores give ``medium``.

``--max-pixels`` (or ``max_pixels`` in a request) is a bound in pixels and wins over any level.  This module
holds the rule only: the machine's facts come from :mod:`qvq_local.hardware` (and a loaded backend's view
of where it encodes images), gathered by the callers (the API, ``qvq doctor``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qvq_local.errors import InputError
from qvq_local.families import DEFAULT_FAMILY
from qvq_local.families.base import Family

#: The levels, from fewest image tokens to most.
LEVELS = ("low", "medium", "high", "max")
#: The word that asks for this machine's default (OpenAI's image parts say ``auto`` too).
AUTO = "auto"
#: Image tokens per image at each level (``max``: the family processor's own limit).
LEVEL_TOKENS: Mapping[str, int | None] = {"low": 256, "medium": 576, "high": 1280, "max": None}

#: Seconds of one CPU core to encode one square image at each level with QVQ's vision tower (the 2b
#: shape's ViT, 32 layers, 1280 wide; QVQ-72B's is the same) through llama.cpp (F16 mmproj, flash attention):
#: the CPU time of all threads, measured on a 2-core x86 CPU (``python examples/detail_encode.py --shape 2b``;
#: low agrees with README's bench, 9.5 s on 2 cores).  Divided by the cores to estimate another CPU (an
#: estimate: wider vectors, AMX or a faster memory system encode faster).  ``max`` has no figure: never a
#: default.
CPU_CORE_SECONDS: Mapping[str, float] = {"low": 21.5, "medium": 56.0, "high": 155.0}
#: The encode time per image a CPU's default level may cost at most (estimated).
CPU_ENCODE_TARGET_S = 5.0


def check_level(value: str, label: str = "--detail") -> str:
    """``value`` as a level name or ``auto`` (case and spaces ignored); an InputError naming ``label``."""
    word = str(value).strip().lower()
    if word == AUTO or word in LEVELS:
        return word
    raise InputError(f"{label} must be {' | '.join((*LEVELS, AUTO))}, got {value!r}")


def max_tokens(level: str, family: Family = DEFAULT_FAMILY) -> int:
    """The image-token budget of ``level`` on ``family``'s grid (``max``: what its processor allows)."""
    level = check_level(level)
    if level == AUTO:
        raise InputError("the auto detail level has no token budget of its own: resolve it first")
    tokens = LEVEL_TOKENS[level]
    return tokens if tokens is not None else family.processor_max_pixels // family.image_factor**2


def max_pixels(level: str, family: Family = DEFAULT_FAMILY) -> int:
    """The pixel bound of ``level`` on ``family``'s grid: its token budget times one token's area."""
    if check_level(level) == "max":
        return family.processor_max_pixels
    return max_tokens(level, family) * family.image_factor**2


def min_pixels(family: Family = DEFAULT_FAMILY) -> int:
    """The fewest pixels an image is scaled up to on ``family`` (its processor's minimum)."""
    return family.processor_min_pixels


def square_side(level: str, family: Family = DEFAULT_FAMILY) -> int:
    """The side of the largest square image within ``level``'s bound, on the family's grid (px)."""
    factor = family.image_factor
    side = int(max_pixels(level, family) ** 0.5) // factor * factor
    return max(factor, side)


def square_tokens(level: str, family: Family = DEFAULT_FAMILY) -> int:
    """Image tokens of a square image at ``level`` (what the table in the module docstring lists)."""
    return (square_side(level, family) // family.image_factor) ** 2


def describe(level: str, family: Family = DEFAULT_FAMILY) -> str:
    """``"high (<= 1280 image tokens)"``: a level as headers and ``qvq doctor`` show it."""
    return f"{level} (<= {max_tokens(level, family):,} image tokens)"


def help_table() -> str:
    """The levels for ``--help``: each one's image tokens, and the square image each allows on each grid."""
    from qvq_local.families import FAMILIES

    grids: dict[int, Family] = {}
    for family in FAMILIES.values():
        grids.setdefault(family.image_factor, family)
    tokens = ", ".join(
        f"{level} {LEVEL_TOKENS[level]}" for level in LEVELS if LEVEL_TOKENS[level] is not None
    )
    limit = max_tokens("max", DEFAULT_FAMILY)
    squares = "; ".join(
        f"{'/'.join(str(square_side(level, f)) for level in LEVELS)} px on {f.name}'s" for f in grids.values()
    )
    return f"{tokens}, max {limit:,} (the processor's limit) image tokens; a square image of {squares} grid"


# ------------------------------------------------------------------------------ the machine's default


@dataclass(frozen=True)
class Machine:
    """What decides the default level: where images are encoded and how fast that is likely to be.

    ``encoder``: ``"gpu"``, ``"cpu"`` or ``"remote"`` (a server encodes them).  ``gpu``: its kind for
    messages (``"CUDA"``, ``"Metal"``).  ``cpu_count``: logical CPUs (for the CPU estimate).
    ``apple_silicon``: an Apple Silicon Mac (its CPU and GPU share fast unified memory).
    """

    encoder: str
    cpu_count: int = 1
    gpu: str | None = None
    apple_silicon: bool = False

    @classmethod
    def from_facts(cls, facts: Mapping, encoder: str | None = None) -> Machine:
        """The machine from :func:`qvq_local.hardware.describe`'s facts (with the backends'
        ``machine_facts`` merged in: ``cuda``, ``metal``), or from recorded ones; ``usable_cores`` (the
        process's CPU affinity) counts before ``cpu_count`` where given.

        ``encoder``: where the loaded model encodes images when the caller knows it (``"gpu"``, ``"cpu"``,
        ``"remote"``; a backend's ``run_facts`` hook says ``image_encoder``); None: a GPU the facts show is taken to be used.
        """
        gpu = "CUDA" if facts.get("cuda") else "Metal" if facts.get("metal") else None
        apple = bool(facts.get("apple_silicon"))
        if apple and gpu is None:
            gpu = "Metal"
        if encoder is None:
            encoder = "gpu" if gpu else "cpu"
        elif encoder not in ("gpu", "cpu", "remote"):
            raise ValueError(f"encoder must be gpu, cpu or remote, not {encoder!r}")
        cores = facts.get("usable_cores") or facts.get("cpu_count") or 1  # the cores this process may use
        return cls(encoder=encoder, cpu_count=max(1, int(cores)), gpu=gpu, apple_silicon=apple)


def estimate_cpu_encode_s(level: str, cpu_count: int) -> float | None:
    """Estimated seconds to encode one square image at ``level`` on ``cpu_count`` cores (QVQ's tower);
    None for a level without a measured figure (``max``)."""
    seconds = CPU_CORE_SECONDS.get(check_level(level))
    return None if seconds is None else seconds / max(1, cpu_count)


@dataclass(frozen=True)
class Choice:
    """A level and why it was chosen: ``source`` is ``"--detail"``, ``"the detail setting"``, ``"request"``
    or ``"machine"``; ``reason`` says which machine fact decided a default."""

    level: str
    source: str
    reason: str = ""

    def as_dict(self) -> dict:
        return {"level": self.level, "source": self.source, "reason": self.reason}


def machine_default(machine: Machine) -> Choice:
    """The default level for ``machine`` (see the module docstring for the rule)."""
    if machine.encoder == "remote":
        return Choice("high", "machine", "a server encodes the images (it bounds them by its own rule too)")
    if machine.encoder == "gpu":
        return Choice("high", "machine", f"{machine.gpu or 'a'} GPU encodes the images")
    if machine.apple_silicon:
        return Choice("high", "machine", "Apple Silicon")
    chosen = "low"
    for level in LEVELS[:-1]:  # max is never a default: beyond Qwen's guidance
        seconds = estimate_cpu_encode_s(level, machine.cpu_count)
        if seconds is not None and seconds <= CPU_ENCODE_TARGET_S:
            chosen = level
    estimate = estimate_cpu_encode_s(chosen, machine.cpu_count) or 0.0
    cores = f"{machine.cpu_count}-core CPU"
    return Choice(
        chosen, "machine", f"{cores}: ~{estimate:.0f} s an image (estimated for QVQ's vision tower)"
    )


@dataclass(frozen=True)
class ImageBound:
    """How one question's images are bounded: the pixel bound and the minimum on the family's grid
    (``factor`` pixels a token side), and where the bound comes from: a detail ``level`` (None when a pixel
    bound was given), its ``source`` (``"--detail"``, ``"--max-pixels"``, ``"the detail setting"``,
    ``"machine"`` ...) and, for a machine default, the ``reason``."""

    max_pixels: int
    min_pixels: int
    factor: int
    level: str | None
    source: str
    reason: str = ""

    @property
    def max_image_tokens(self) -> int:
        return max(1, self.max_pixels // (self.factor * self.factor))

    def as_dict(self) -> dict:
        """What a result's ``settings["detail"]`` records."""
        return {
            "level": self.level,
            "source": self.source,
            "reason": self.reason,
            "max_pixels": self.max_pixels,
            "min_pixels": self.min_pixels,
            "max_image_tokens": self.max_image_tokens,
        }

    def label(self) -> str:
        """``"detail high (<= 1,280 image tokens; default: CUDA GPU encodes the images)"`` for headers."""
        if self.level is None:
            return f"max pixels {self.max_pixels:,} (<= {self.max_image_tokens:,} image tokens; from {self.source})"
        why = f"default: {self.reason}" if self.source == "machine" else f"from {self.source}"
        return f"detail {self.level} (<= {self.max_image_tokens:,} image tokens; {why})"


def image_bound(
    family: Family, choice: Choice | None = None, *, pixels: int | None = None, source: str = "max_pixels"
) -> ImageBound:
    """The bound of a question's images on ``family``'s grid: ``pixels`` when given (a pixel bound wins over
    any level; ``source`` names who gave it), else ``choice``'s level.  The family's minimum always holds."""
    low, factor = min_pixels(family), family.image_factor
    if pixels is not None:
        return ImageBound(int(pixels), low, factor, None, source)
    if choice is None:
        raise ValueError("image_bound needs a level or a pixel bound")
    bound = max_pixels(choice.level, family)
    return ImageBound(bound, low, factor, choice.level, choice.source, choice.reason)


def resolve(requested: str | None, machine: Machine | None, *, source: str = "--detail") -> Choice:
    """The level to use: ``requested`` (a level; None or ``auto``: the machine's default).

    ``machine`` None (not known): ``low``, the bound this project has always used.
    """
    if requested is not None and check_level(requested, source) != AUTO:
        return Choice(check_level(requested, source), source)
    if machine is None:
        return Choice("low", "machine", "machine not known")
    return machine_default(machine)


__all__ = [
    "AUTO",
    "CPU_CORE_SECONDS",
    "CPU_ENCODE_TARGET_S",
    "LEVELS",
    "LEVEL_TOKENS",
    "Choice",
    "ImageBound",
    "Machine",
    "check_level",
    "describe",
    "estimate_cpu_encode_s",
    "help_table",
    "image_bound",
    "machine_default",
    "max_pixels",
    "max_tokens",
    "min_pixels",
    "resolve",
    "square_side",
    "square_tokens",
]
