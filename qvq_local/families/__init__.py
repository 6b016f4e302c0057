"""Model families, registered by name: the facts particular to one architecture live in its module.

A family is a :class:`~qvq_local.families.base.Family` subclass and its instance, handed to
:func:`register` (the built-in ones below, a plugin's from its plugin function: :mod:`qvq_local.plugins`,
run when this package is first imported, so the converter's and the synthesiser's registries, which
import it, see a plugin's classes too).  Converting and synthesising
a family are done beside the converter and the synthesiser, by classes registered under the family's
name (``qvq_local.convert.gguf_converter.register``, ``qvq_local.convert.synth_writer.register``), so a
family in one module converts and answers like the built-in ones.  The rest of qvq-local asks the
registry:

* :func:`family_for_config` for a Hugging Face ``config.json`` (``qvq convert``, ``qvq doctor``);
* :func:`family_for_gguf_arch` / :func:`family_for_projector` for a GGUF pair (the llama.cpp backend);
* :func:`family_for_model_type` for an MLX folder (mlx-vlm's config spelling);
* :data:`DEFAULT_FAMILY` where no model is at hand yet (an image bounded before the model loads, the
  reasoning controller's default markers, the default system prompt).

What a new family must get right (checked against the pinned transformers 5, mlx-vlm 0.7 and the
bundled llama.cpp, which all support QVQ's successors): Qwen2.5-VL's merger projects to
``vision_config.out_hidden_size``, not ``vision_config.hidden_size`` (override ``merger_width``); its GGUF
projector is ``qwen2.5vl_merger`` while its text GGUF is ``qwen2vl`` like Qwen2-VL's, so a GGUF pair's
family is its projector's (``family_for_projector``), not its text architecture's.  Qwen3-VL's patch is
16 pixels (a 32-pixel grid), its text arch ``qwen3vl`` and projector ``qwen3vl_merger``, and its
DeepStack features would be dropped by the MLX session's split vision path (leave ``mlx_split_vision``
False until the session handles them).  Generic code may not name these either:
``tests/test_families.py`` scans for each family's identifiers.  Families registered earlier win a
lookup that several match (the built-in ones first).

Importing this package stays light (no gguf, numpy or backend library): ``qvq --help`` reaches it.
"""

from __future__ import annotations

from typing import Any

from qvq_local.families.base import Family
from qvq_local.families.qwen2_5vl import FAMILY as QWEN2_5VL
from qvq_local.families.qwen2vl import FAMILY as QWEN2VL
from qvq_local.families.qwen3_5 import FAMILY as QWEN3_5
from qvq_local.families.qwen3_5 import MOE_FAMILY as QWEN3_5_MOE
from qvq_local.families.qwen3vl import FAMILY as QWEN3VL
from qvq_local.families.qwen3vl_moe import FAMILY as QWEN3VL_MOE

#: Every family qvq-local runs, by name, in registration order (read it; add with :func:`register`).
FAMILIES: dict[str, Family] = {}

#: The family of the models this project is built around (QVQ-72B-Preview).
DEFAULT_FAMILY = QWEN2VL


def register(family: Family) -> Family:
    """Add ``family`` (an instance) to the registry and return it.

    Its name must be new, and it must declare every fact :class:`Family` lists (a missing one would
    otherwise surface as an AttributeError deep inside a conversion or a question).
    """
    if not isinstance(family, Family):
        raise TypeError(f"register() takes a Family instance, not {type(family).__name__}")
    missing = [k for k in Family.__annotations__ if not k.startswith("_") and not hasattr(family, k)]
    if missing:
        raise ValueError(f"family {type(family).__name__} does not declare {', '.join(missing)}")
    if family.name in FAMILIES:
        raise ValueError(f"a family named {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


for _family in (QWEN2VL, QWEN2_5VL, QWEN3VL, QWEN3VL_MOE, QWEN3_5, QWEN3_5_MOE):
    register(_family)


def family_for_config(config: dict[str, Any]) -> Family | None:
    """The family whose architecture a ``config.json`` names, or None."""
    return next((f for f in FAMILIES.values() if f.matches_config(config)), None)


def family_for_model_type(model_type: Any) -> Family | None:
    """The family with this ``model_type`` (mlx-vlm's config spelling), or None."""
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)


def family_for_gguf_arch(arch: Any) -> Family | None:
    """The first family whose text GGUF has ``general.architecture == arch``, or None.  Families may share
    a text architecture: the mmproj's projector (:func:`family_for_projector`) tells them apart."""
    return next((f for f in FAMILIES.values() if f.gguf_text_arch == arch), None)


def family_for_projector(projector: Any) -> Family | None:
    """The first family whose mmproj has ``clip.projector_type == projector``, or None."""
    return next((f for f in FAMILIES.values() if f.gguf_projector == projector), None)


def family_for_gguf_pair(arch: Any, projector: Any) -> Family | None:
    """The family of a GGUF pair: the one with both this text architecture and this mmproj projector, or
    None.  Families share one or the other (Qwen2-VL and Qwen2.5-VL share the ``qwen2vl`` text
    architecture; Qwen3-VL and its MoE share the ``qwen3vl_merger`` projector), never both."""
    return next(
        (f for f in FAMILIES.values() if f.gguf_text_arch == arch and f.gguf_projector == projector), None
    )


def supported_gguf_archs() -> list[str]:
    """The text architectures of the registered families, each once (families may share one)."""
    return list(dict.fromkeys(f.gguf_text_arch for f in FAMILIES.values()))


def choice_name(family: Family) -> str:
    """The name a user picks ``family`` by (``qvq synth --family``): its first alias, else its name."""
    return family.aliases[0] if family.aliases else family.name


def family_choices() -> str:
    """``"qwen2-vl (QVQ / Qwen2-VL; default) | qwen2.5-vl (Qwen2.5-VL) | ..."``, for help texts."""
    return " | ".join(
        f"{choice_name(f)} ({f.models}{'; default' if f is DEFAULT_FAMILY else ''})"
        for f in FAMILIES.values()
    )


def shape_choices() -> str:
    """``"Qwen2-VL 2b | 7b | 72b; Qwen2.5-VL 3b | ..."``: each family's synthetic published sizes (``tiny``,
    which every family has, left out), for help texts."""
    return "; ".join(
        f"{f.name} {' | '.join(s for s in f.synth_shapes if s != 'tiny')}" for f in FAMILIES.values()
    )


def describe_supported() -> str:
    """``"Qwen2VLForConditionalGeneration (QVQ / Qwen2-VL)"`` and the like, for error messages."""
    return ", ".join(f"{', '.join(f.hf_architectures)} ({f.models})" for f in FAMILIES.values())


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "Family",
    "choice_name",
    "describe_supported",
    "family_choices",
    "family_for_config",
    "family_for_gguf_arch",
    "family_for_gguf_pair",
    "family_for_model_type",
    "family_for_projector",
    "register",
    "shape_choices",
    "supported_gguf_archs",
]

# last, with everything above defined: a plugin's family registers through this module while it is
# imported, so every process that looks a family up (a bench worker, ``qvq convert``, ``qvq synth``) sees the
# plugins named in QVQ_PLUGINS, even one that never reads the backend registry
from qvq_local.plugins import load as load_plugins  # noqa: E402

load_plugins()
