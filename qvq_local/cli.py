"""The ``qvq`` command line: argument parsing and wiring only.

Every command body is a lazy import of the module that does the work, so ``qvq --help`` stays fast
(no mlx, llama_cpp, huggingface_hub or numpy at import time).  User errors arrive as
``qvq_local.errors.QvqError`` and leave as one ``error: ...`` line with a non-zero exit code.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from qvq_local import families
from qvq_local.backends import registry
from qvq_local.backends.options import SERVER_KINDS
from qvq_local.convert import quants
from qvq_local.errors import QvqError


class _Commands(typer.Typer):
    """A Typer whose commands all end a user error the same way: ``QvqError`` -> one ``error: ...`` line on
    stderr and the error's exit code (qvq_local/errors.py), so no command writes that ``except`` itself."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)  # Typer reads the options from the wrapped signature
            def run(*a: Any, **k: Any) -> Any:
                try:
                    return fn(*a, **k)
                except QvqError as err:
                    typer.echo(f"error: {err}", err=True)
                    raise typer.Exit(err.exit_code) from None

            register(run)
            return fn

        return decorate


app = _Commands(
    name="qvq",
    help="Run QVQ visual reasoning models locally, quantised, and watch them think.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# ---------------------------------------------------------------- synth (issue: foundation)
@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the checkpoint into (created)."),
    shape: str = typer.Option(
        "tiny", "--shape", help=f"tiny, or a published size: {families.shape_choices()}."
    ),
    family: str = typer.Option(
        families.choice_name(families.DEFAULT_FAMILY),
        "--family",
        help=f"Model family whose layout to write: {families.family_choices()}.",
    ),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16 | f32"),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same bytes."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        help="qwen (the real Qwen vocabulary, from the dashscope package) | trained (a small one)."
        " Default: qwen for the published sizes when dashscope is installed, else trained.",
    ),
) -> None:
    """Write a random-weight checkpoint in exactly the Hugging Face layout of QVQ-72B-Preview (or of
    another family's published models: --family).

    For tests, demos and benchmarks without downloading a model: the words it writes are random.
    """
    from qvq_local.convert.synthetic import synth_command

    synth_command(
        shape=shape, out=out, dtype=dtype, seed=seed, force=force, tokenizer=tokenizer, family=family
    )


# ---------------------------------------------------------------- convert / pull / models (issue 3, 5)
@app.command()
def convert(
    source: str = typer.Argument(..., help="A Hugging Face checkpoint folder, or a hub id (owner/name)."),
    to: str | None = typer.Option(
        None, "--to", help="mlx | gguf. Default: what this machine's backend runs (mlx on Apple Silicon)."
    ),
    quant: str | None = typer.Option(None, "--quant", help=quants.quant_help()),
    bits: str | None = typer.Option(None, "--bits", help=quants.bits_help()),
    group_size: int | None = typer.Option(None, "--group-size", help=quants.group_size_help()),
    mmproj_quant: str | None = typer.Option(None, "--mmproj-quant", help=quants.mmproj_quant_help()),
    out: Path | None = typer.Option(
        None, "-o", "--out", help="Output folder. Default: $QVQ_HOME/models/<name>-<format>-<quant>."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the output folder if it exists."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress display."),
) -> None:
    """Convert Hugging Face weights to quantised MLX or to GGUF + mmproj, ready for `qvq ask`.

    The source is checked first (architecture, shards, tensor shapes).

    The output appears only when complete, with a qvq-manifest.json that `qvq models` reads.

    Examples:

      qvq convert Qwen/QVQ-72B-Preview

      qvq convert ./QVQ-72B-Preview --to gguf --quant q4_k_m

      qvq convert ./QVQ-72B-Preview --to mlx --bits 4 -o ~/models/qvq-mlx-4bit

      qvq ask chart.png "What is the trend?" --model QVQ-72B-Preview-mlx-4bit
    """
    from qvq_local.convert.pipeline import convert as run_convert

    path = run_convert(
        source,
        to=to,
        quant=quant,
        bits=bits,
        group_size=group_size,
        mmproj_quant=mmproj_quant,
        out=out,
        force=force,
        progress=not quiet,
    )
    typer.echo(str(path))


@app.command()
def pull(
    ref: str = typer.Argument(
        ..., help="owner/repo, owner/repo:QUANT (e.g. :Q4_K_M, :q8_0) or a short name such as qvq."
    ),
    mmproj: str | None = typer.Option(
        None, "--mmproj", help="GGUF repos: the vision projector, by file name or type (f16, f32, q8_0)."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit (default: main)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress display."),
) -> None:
    """Download a model into the shared Hugging Face cache (HF_HUB_CACHE), verified and resumable.

    GGUF repos: only the chosen quantisation (all parts of a split one) and one vision projector (F16,
    else the largest; --mmproj to choose). Without :QUANT a repo with several gives Q4_K_M, else the
    error lists them with sizes. MLX repos are used as they are; full-precision repos fetch safetensors,
    configs and tokenizer files (never pickle weights), for `qvq convert`.

    The free disk space is checked first; every large file's sha256 is checked against the hub's
    (a corrupt file is deleted). Run again to resume. Files already in the cache are not fetched again;
    with HF_HUB_OFFLINE=1 only the cache is used. Prints the model's path.

    Examples:

      qvq pull qvq

      qvq pull lmstudio-community/QVQ-72B-Preview-GGUF:Q4_K_M

      qvq pull mlx-community/QVQ-72B-Preview-4bit

      qvq pull Qwen/QVQ-72B-Preview && qvq convert Qwen/QVQ-72B-Preview --to gguf
    """
    from qvq_local.hub import pull as run_pull

    path = run_pull(ref, progress=not quiet, revision=revision, mmproj=mmproj)
    typer.echo(str(path))


@app.command()
def models(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
    available: bool = typer.Option(
        False, "--available", help="Short names you can pull, with download sizes and whether each fits."
    ),
) -> None:
    """List local models: conversions in $QVQ_HOME/models and the runnable models in the Hugging Face cache.

    The NAME column is what `qvq ask --model NAME` accepts. --available lists the short names instead
    (`qvq pull NAME`): the source chosen for this platform, its download size and the memory verdict.

    Examples:

      qvq models

      qvq models --available

      qvq models --json | jq '.[].name'
    """
    import json

    from qvq_local.hub import list_models
    from qvq_local.models import models_dir
    from qvq_local.units import file_size

    if available:
        from qvq_local.doctor import available_rows

        rows = available_rows()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=None, show_edge=False, header_style="bold")
        for column in ("name", "model", "source", "format", "download", "fits this machine"):
            table.add_column(column, justify="right" if column == "download" else "left", overflow="fold")
        for row in rows:
            size = ("" if row["size_checked"] else "~") + file_size(row["size"])
            table.add_row(row["name"], row["title"], row["source"], row["format"], size, row["verdict"])
        Console().print(table)
        return
    rows = list_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(
            f"no local models in {models_dir().parent} or the Hugging Face cache: "
            "`qvq pull qvq`, `qvq pull OWNER/REPO:QUANT` or `qvq convert SOURCE` (`qvq models --available`)"
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=None, show_edge=False, header_style="bold")
    for column in ("name", "family", "format", "quantization", "size", "source"):
        # the name is what -m takes: never broken across lines (the source folds instead)
        table.add_column(
            column,
            justify="right" if column == "size" else "left",
            overflow="fold",
            no_wrap=column == "name",
            min_width=max(len(r["name"]) for r in rows) if column == "name" else None,
        )
    for row in rows:
        table.add_row(
            row["name"],
            row.get("family") or "?",
            row["format"],
            row["quantization"],
            file_size(row["size"]),
            row["source"],
        )
    Console().print(table)


#: --cpu-buffers on ask and bench (qvq_local/backends/llama_buffers.py explains the modes).
_CPU_BUFFERS_HELP = (
    "llama backend: auto (default) | all | no-amx | none. Which llama.cpp CPU buffer types hold the "
    "weights; auto turns them off on Intel AMX CPUs (AMX crashes on quantised models, llama.cpp #20824); "
    "no-amx keeps repacking. Also $QVQ_LLAMA_CPU_BUFFERS."
)
_GPU_LAYERS_HELP = (
    "llama backend: text layers on the GPU. all (default where llama.cpp was built with CUDA or Metal) | 0 "
    "(CPU only) | N (N layers on the GPU, the rest on the CPU: for a model larger than the GPU's memory; "
    "`qvq doctor --model M` estimates N). "
    "Also $QVQ_GPU_LAYERS."
)


# ---------------------------------------------------------------- the options of a question (ask, batch)
@dataclass(frozen=True)
class _Shared:
    """One option of every command that asks questions (``qvq ask``, ``qvq batch``), defined once: its
    parameter ``name`` and type, a fresh ``typer.Option`` each time it is put on a command (``make``), and
    where its value goes: ``question`` (:meth:`qvq_local.settings.AskSettings.build`'s name ``key``),
    ``load`` (the backend's load option ``key``) or ``model`` (how the model is found and kept: the
    request's field ``key``), after ``convert``."""

    name: str
    kind: Any
    make: Callable[[], Any]
    goes: str
    key: str = ""
    convert: Callable[[Any], Any] = lambda value: value


def _opt(default: Any, *names: str, help: str | None = None) -> Callable[[], Any]:
    return lambda: typer.Option(default, *names, help=help)


def _detail_help() -> str:
    from qvq_local import detail

    return (
        "Image detail: how many image tokens each image may become: "
        f"{detail.help_table()}. Default auto: high on a GPU, Apple Silicon or a server; on a CPU the "
        "highest level estimated to encode in 5 s (2 cores: low). Grounding and small text need high. "
        "--max-pixels wins over it. Also `qvq config set detail`; `qvq doctor` shows the default here."
    )


#: The options a question command takes, after its own, in the order ``--help`` lists them.
QUESTION_OPTIONS: tuple[_Shared, ...] = (
    _Shared(
        "model",
        str | None,
        _opt(
            None,
            "-m",
            "--model",
            help="Model: folder, GGUF file, name from `qvq models`, short name (qvq), or owner/repo[:QUANT].",
        ),
        "model",
    ),
    _Shared(
        "backend",
        str | None,
        lambda: typer.Option(
            None, "--backend", help=f"{registry.choices()} (default auto; {registry.alias_note()})."
        ),
        "model",
    ),
    _Shared(
        "mmproj",
        str | None,
        _opt(
            None,
            "--mmproj",
            help="GGUF models: the vision projector file to use instead of the one beside the model"
            " (for a hub repo also a projector's name or type there: f16, f32, q8_0).",
        ),
        "model",
    ),
    _Shared(
        "think_budget",
        int | None,
        _opt(
            None,
            "--think-budget",
            help="Thought tokens before the answer is forced (default: none, up to 8192).",
        ),
        "question",
    ),
    _Shared(
        "answer_budget",
        int | None,
        _opt(None, "--answer-budget", help="Answer tokens (default 1024)."),
        "question",
    ),
    _Shared("detail", str | None, lambda: typer.Option(None, "--detail", help=_detail_help()), "question"),
    _Shared(
        "max_pixels",
        int | None,
        _opt(
            None,
            "--max-pixels",
            help="Shrink each image to at most this many pixels (fewer image tokens); wins over --detail.",
        ),
        "question",
    ),
    _Shared(
        "temperature", float | None, _opt(None, "--temperature", help="Default: the model's own."), "question"
    ),
    _Shared("top_p", float | None, _opt(None, "--top-p"), "question"),
    _Shared("top_k", int | None, _opt(None, "--top-k"), "question"),
    _Shared("repetition_penalty", float | None, _opt(None, "--repetition-penalty"), "question"),
    _Shared("seed", int | None, _opt(None, "--seed"), "question"),
    _Shared(
        "system",
        str | None,
        _opt(None, "--system", help="Replace the model family's system prompt (QVQ's for Qwen2-VL models)."),
        "question",
    ),
    _Shared(
        "no_loop_stop",
        bool,
        _opt(False, "--no-loop-stop", help="Do not cut reasoning loops."),
        "question",
        "loop_detection",
        lambda value: not value,
    ),
    _Shared(
        "think",
        bool | None,
        _opt(
            None,
            "--think/--no-think",
            help="Switch the model's thinking on or off where its chat template can (enable_thinking:"
            " Qwen3.5; off, it answers at once). Default: the template's own (Qwen3.5-4B and up think,"
            " 0.8B/2B do not).",
        ),
        "question",
    ),
    _Shared(
        "lang_lock",
        str,
        _opt(
            "auto",
            "--lang-lock",
            help="auto | on | off: while thinking, mask tokens of scripts the question does not use"
            " (auto: when the question is in one script). Latin and Greek stay allowed (math, code).",
        ),
        "question",
    ),
    _Shared(
        "samples",
        int,
        _opt(
            1,
            "--samples",
            help="Think N chains at once from one prefill (decoded in one batch) and answer"
            " with the majority \\boxed{} answer (ties: the chain that finished first). Without"
            " --temperature/--top-p/--top-k the chains sample at temperature 0.7, top-k 40, top-p 0.95.",
        ),
        "question",
    ),
    _Shared(
        "speculate",
        str | None,
        _opt(
            None,
            "--speculate",
            help="off (default; draft with --draft) | ngram | draft | auto: speculative decoding (mlx, llama): guess tokens"
            " (n-grams of the prompt and the thought, or the --draft model), check them in one forward pass,"
            " keep the right ones; the output is plain decoding's. auto measures this machine once and turns"
            " itself off where it does not pay.",
        ),
        "question",
    ),
    _Shared(
        "draft",
        str | None,
        _opt(
            None,
            "--draft",
            help="A small model sharing the tokenizer (Qwen2-VL / Qwen2.5, same format) whose guesses"
            " --speculate draft|auto checks (--draft alone means --speculate draft).",
        ),
        "load",
    ),
    _Shared("cpu_buffers", str | None, _opt(None, "--cpu-buffers", help=_CPU_BUFFERS_HELP), "load"),
    _Shared("gpu_layers", str | None, _opt(None, "--gpu-layers", help=_GPU_LAYERS_HELP), "load"),
    _Shared(
        "no_cache",
        bool,
        _opt(
            False,
            "--no-cache",
            help="Do not reuse or keep the image's encoded prefix in $QVQ_HOME/cache (a repeated image then"
            " pays the encode and prefill again). See `qvq cache info`.",
        ),
        "model",
        "cache",
        lambda value: not value,
    ),
    _Shared(
        "base_url",
        str | None,
        _opt(
            None,
            "--base-url",
            help="--backend openai: the server, e.g. http://127.0.0.1:8000/v1 (or QVQ_BASE_URL).",
        ),
        "load",
    ),
    _Shared(
        "api_key",
        str | None,
        _opt(
            None,
            "--api-key",
            help="--backend openai: its key (default $QVQ_API_KEY, $OPENAI_API_KEY; QVQ-Max: $DASHSCOPE_API_KEY).",
        ),
        "load",
    ),
    _Shared(
        "server_kind",
        str | None,
        lambda: typer.Option(
            None,
            "--server-kind",
            help=f"--backend openai: {' | '.join(SERVER_KINDS)} (auto asks the server); decides how the budget is kept.",
        ),
        "load",
    ),
)


def _asks_questions(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command every option of :data:`QUESTION_OPTIONS` after its own, defined once for ``qvq ask``
    and ``qvq batch``; the command receives them gathered in one keyword, ``common``: ``options`` (the
    question's, by AskSettings.build's names), ``load_options`` (the backend's) and the model's fields
    (``model``, ``backend``, ``mmproj``, ``cache``), as :class:`qvq_local.ask_cmd.AskRequest` takes them."""
    import inspect

    own = [p for p in inspect.signature(fn).parameters.values() if p.name != "common"]
    shared = [
        inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.make(), annotation=o.kind)
        for o in QUESTION_OPTIONS
    ]

    @functools.wraps(fn)
    def command(**values: Any) -> Any:
        common: dict[str, Any] = {"options": {}, "load_options": {}}
        for o in QUESTION_OPTIONS:
            value = o.convert(values.pop(o.name))
            key = o.key or o.name
            if o.goes == "question":
                common["options"][key] = value
            elif o.goes == "load":
                common["load_options"][key] = value
            else:
                common[key] = value
        return fn(**values, common=common)

    command.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
    command.__annotations__ = {
        **{k: v for k, v in fn.__annotations__.items() if k != "common"},
        **{o.name: o.kind for o in QUESTION_OPTIONS},
    }
    del command.__wrapped__  # Typer reads the signature above, not fn's
    return command


# ---------------------------------------------------------------- ask / doctor / config (issue 5)
@app.command(context_settings={"allow_interspersed_args": True})
@_asks_questions
def ask(
    args: list[str] | None = typer.Argument(
        None,
        metavar="IMAGE... QUESTION",
        help="One or more images (or one clip: MP4, MOV, MKV, WebM, AVI, an animated GIF), then the question "
        "(quote it).",
    ),
    attach: list[Path] | None = typer.Option(None, "-a", "--attach", help="An image (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one OpenAI-style JSON object at the end."),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Do not show the thought stream."),
    save: Path | None = typer.Option(None, "--save", help="Write a Markdown transcript to this file."),
    fps: float | None = typer.Option(
        None, "--fps", help="A clip's frames sampled per second (default 2, as Qwen's video processors)."
    ),
    max_frames: int | None = typer.Option(
        None, "--max-frames", help="Most frames sampled from a clip (default the family's, 768)."
    ),
    video_tokens: int | None = typer.Option(
        None,
        "--video-tokens",
        help="A clip's token budget: sets its frame size, then its frame count (default 768 on a CPU, 4096 "
        "with a GPU).",
    ),
    frames: bool = typer.Option(
        False,
        "--frames",
        help="The IMAGE... arguments (files, or one folder) are one clip's frames, in order.",
    ),
    *,
    common: dict[str, Any],
) -> None:
    """Ask a question about one or more images, or a clip, and watch the model think.

    The last argument is the question; every other argument (and each -a) is an image, or one clip
    (sampled by time: --fps, --max-frames, --video-tokens), or with --frames one clip's frames.

    On a terminal a live panel shows the thought, its budget and the answer; piped, the thought goes to
    stderr and the answer to stdout. Ctrl-C stops and keeps what was produced (exit code 130).

    Examples:

      qvq ask chart.png "Which bar is the highest?" --think-budget 1024

      qvq ask -a left.png -a right.png "What changed?" --json

      qvq ask diagram.png "Find the angle x." -m QVQ-72B-Preview-gguf-q4_k_m --save run.md

      qvq ask scan.png "Read the small print." --detail high

      qvq ask chart.png "Which bar?" --backend openai --base-url http://gpu-box:8000/v1 -m Qwen/QVQ-72B-Preview

      qvq ask geometry.png "Find x." --samples 4 --think-budget 2048

      qvq ask clip.mp4 "What happens after the ball hits the fan?" --fps 1 --video-tokens 2048

      qvq ask --frames shots/ "What changed between the first and the last shot?"
    """
    from qvq_local.ask_cmd import AskRequest, run_ask

    # a clip's sampling: qvq ask's own (qvq batch asks about images)
    clip_options = {"fps": fps, "max_frames": max_frames, "video_tokens": video_tokens}
    code = run_ask(
        AskRequest(
            args=list(args or []),
            attach=[str(p) for p in (attach or [])],
            as_json=as_json,
            hide_thinking=hide_thinking,
            save=save,
            frames=frames,
            **{**common, "options": {**common["options"], **clip_options}},
        )
    )
    if code:
        raise typer.Exit(code)


@app.command(context_settings={"allow_interspersed_args": True})
@_asks_questions
def batch(
    source: str = typer.Argument(
        ...,
        metavar="INPUT",
        help="A folder of images, a glob in quotes ('scans/*.png'), or a list: JSONL rows"
        ' {"image": "a.png", "question": "..."} (or "images": [...]) or CSV with image(s),question columns'
        " (paths relative to the list).",
    ),
    output: Path = typer.Option(
        ...,
        "-o",
        "--output",
        help="JSONL file the answers go to, one row per item as it is answered; run again with the same"
        " file to resume (rows already there are skipped).",
    ),
    question: str | None = typer.Option(
        None,
        "-q",
        "--question",
        help="The question for every image of a folder or glob, and for list rows without one.",
    ),
    csv_path: Path | None = typer.Option(
        None, "--csv", help="Also write a CSV summary, one row per item of the output (earlier runs' too)."
    ),
    retry_errors: bool = typer.Option(
        False, "--retry-errors", help="Take the error rows out of the output and try those items again."
    ),
    *,
    common: dict[str, Any],
) -> None:
    """Ask about many images with one model load: a JSONL row per item, written as it goes, resumable.

    Each row holds the thought, the answer, the \\boxed{} value, the stop reason, timings, tokens, the
    settings (with the image detail and whether the image's encoded prefix was reused) and an error (a
    missing, corrupt or too large image is an error row, never the end of the run). Ctrl-C stops after
    the item in flight (exit code 130); run the same command again to go on. Every question option of `qvq ask`
    (not its clip options) applies to each item; an image asked about again reuses its encoded prefix.

    Examples:

      qvq batch charts/ -q "Which bar is the highest?" -o answers.jsonl --csv answers.csv

      qvq batch 'scans/*.png' -q "Transcribe the total." -o totals.jsonl --detail high

      qvq batch questions.jsonl -o answers.jsonl --think-budget 1024 --samples 4
    """
    from qvq_local.ask_cmd import AskRequest
    from qvq_local.batch_cmd import run_batch

    code = run_batch(
        AskRequest(**common),
        source,
        question,
        output,
        csv_path=csv_path,
        retry_errors=retry_errors,
    )
    if code:
        raise typer.Exit(code)


@app.command()
def doctor(
    model: str | None = typer.Option(
        None, "-m", "--model", help="Check whether this model fits (default: the configured model)."
    ),
    context: int | None = typer.Option(
        None, "--context", help="Context tokens to plan for (default: what `qvq ask` opens)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    selftest: bool = typer.Option(
        False,
        "--selftest",
        help="Also run a tiny synthetic model through each installed backend, each in a child process, "
        "and report pass, fail or crash (with the signal). Exit code 4 when one crashes or fails.",
    ),
) -> None:
    """Check this machine: platform, CPU features, memory, GPU, installed backends, whether a model fits.

    Examples:

      qvq doctor

      qvq doctor --selftest

      qvq doctor --model QVQ-72B-Preview-gguf-q4_k_m --context 16384
    """
    from qvq_local.doctor import print_doctor

    code = print_doctor(model, context, as_json, selftest=selftest)
    if code:
        raise typer.Exit(code)


config_app = _Commands(
    help="Show and change settings (default model, backend, budgets) in $QVQ_HOME/config.json.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")


@config_app.command("list")
def config_list(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List every setting, its value and where the value comes from."""
    import json

    from qvq_local import config

    values = config.effective()
    if as_json:
        typer.echo(json.dumps(values, indent=2))
        return
    for key, value in values.items():
        shown = "(unset)" if value is None else value
        typer.echo(f"{key} = {shown}    # {config.SETTINGS[key].help}; from {config.source(key)}")


@config_app.command("get")
def config_get(key: str = typer.Argument(..., help="Setting name, e.g. model.")) -> None:
    """Print one setting's value (nothing, exit code 1, when unset)."""
    from qvq_local import config

    value = config.get(key)
    if value is None:
        raise typer.Exit(1)
    typer.echo(value)


@config_app.command("set")
def config_set(
    key: str = typer.Argument(
        ..., help="Setting name: model, backend, think_budget, answer_budget, max_pixels."
    ),
    value: str = typer.Argument(..., help="The new value."),
) -> None:
    """Store a setting, e.g. `qvq config set model QVQ-72B-Preview-gguf-q4_k_m`."""
    from qvq_local import config

    parsed = config.set_value(key, value)
    typer.echo(f"{key} = {parsed}")


@config_app.command("unset")
def config_unset(key: str = typer.Argument(..., help="Setting name.")) -> None:
    """Remove a setting from the file."""
    from qvq_local import config

    config.unset(key)


@config_app.command("path")
def config_path() -> None:
    """Print where the settings file lives."""
    from qvq_local import config

    typer.echo(str(config.config_path()))


# ---------------------------------------------------------------- prefix cache (issue 16)
cache_app = _Commands(
    help="The prefix cache: each image's encoded prefix (system prompt + image KV state), kept in"
    " $QVQ_HOME/cache so the next question about the same image skips the image encode and prefill.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Where the cache is, how many entries it holds, their size and the cap (setting cache_max_mb)."""
    import json

    from qvq_local import prefix_cache

    info = prefix_cache.info()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(
        f"{info['path']}: {info['entries']} entr{'y' if info['entries'] == 1 else 'ies'},"
        f" {info['bytes_human']} of {info['max_bytes_human']} (cap: qvq config set cache_max_mb N)"
    )


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every entry of the prefix cache."""
    from qvq_local import prefix_cache
    from qvq_local.units import file_size

    n, size = prefix_cache.disk_cache().clear()
    typer.echo(f"removed {n} file(s), {file_size(size)}")


# ---------------------------------------------------------------- bench (issue 6)
@app.command()
def bench(
    model: str | None = typer.Option(
        None, "-m", "--model", help="Model to measure: folder, GGUF file, name from `qvq models`, hub id."
    ),
    shape: str | None = typer.Option(
        None,
        "--shape",
        help=f"tiny, or a published size of the --family ({families.shape_choices()}): synthesise and convert "
        "a random model of that shape (cached in QVQ_HOME/bench). Default when no --model: tiny.",
    ),
    family: str | None = typer.Option(
        None, "--family", help=f"Family of the --shape model: {families.family_choices()} (see `qvq synth`)."
    ),
    backend: str = typer.Option("auto", "--backend", help=f"{registry.choices('all')}."),
    image_sizes: str = typer.Option("224,448", "--image-sizes", help="Square image edge lengths in pixels."),
    runs: int = typer.Option(
        3, "--runs", help="Measured runs per figure (median reported), after a warm-up."
    ),
    decode_tokens: int = typer.Option(
        64, "--decode-tokens", help="Thought tokens per run before the answer is forced."
    ),
    quant: str = typer.Option(
        "q4", "--quant", help="q4 | q8: quantisation when converting (--shape, HF folder)."
    ),
    raw: bool = typer.Option(
        True, "--raw/--no-raw", help="Also run the raw library (mlx-vlm, llama-cpp-python)."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write every figure and the machine here."),
    chart: Path | None = typer.Option(None, "--chart", help="Write a PNG chart here (needs matplotlib)."),
    bandwidth_mib: int = typer.Option(
        1024, "--bandwidth-mib", help="Array size for the bandwidth measurement."
    ),
    cpu_buffers: str | None = typer.Option(
        None,
        "--cpu-buffers",
        help=_CPU_BUFFERS_HELP,
    ),
    gpu_layers: str | None = typer.Option(None, "--gpu-layers", help=_GPU_LAYERS_HELP),
    video: bool = typer.Option(
        False,
        "--video",
        help="Also ask about a synthetic 10 s clip: frames, video tokens, decode-and-sample, encode, first token.",
    ),
    speculation: bool = typer.Option(
        False,
        "--speculation",
        help="Also measure speculative decoding where a backend does it: the verify cost curve, real QVQ"
        " replies replayed with n-gram guesses (tokens per step, speedup measured and projected), a draft"
        " identical to the model, and what --speculate auto decides.",
    ),
    spec_replay: Path | None = typer.Option(
        None,
        "--spec-replay",
        help="--speculation: the replies to replay (JSON {'replies': [...]} or text; default: QVQ-72B-"
        "Preview's seven published replies).",
    ),
) -> None:
    """Measure speed and memory on this machine, side by side with the raw libraries and the bandwidth limit.

    Examples:

      qvq bench --shape 2b --backend all --json bench.json --chart bench.png

      qvq bench -m QVQ-72B-Preview-gguf-q4_k_m --image-sizes 448 --runs 3
    """
    from qvq_local.ask_cmd import flag
    from qvq_local.bench import bench_command

    load_options = {"cpu_buffers": cpu_buffers, "gpu_layers": gpu_layers}
    bench_command(
        model=model,
        shape=shape,
        backend=backend,
        image_sizes=image_sizes,
        runs=runs,
        decode_tokens=decode_tokens,
        quant=quant,
        raw=raw,
        json_path=json_path,
        chart_path=chart,
        bandwidth_mib=bandwidth_mib,
        family=family,
        options=load_options,
        option_labels={name: flag(name) for name in load_options},
        video=video,
        speculation=speculation,
        spec_replay=spec_replay,
    )


# ---------------------------------------------------------------- serve (issue 15)
@app.command()
def serve(
    model: str | None = typer.Option(
        None, "-m", "--model", help="Model to serve (default: the configured one); loaded once, at start."
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind; beyond localhost, set an API key."
    ),
    port: int = typer.Option(8000, "--port"),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        help="Require Authorization: Bearer KEY on every route but /health (or QVQ_API_KEY).",
    ),
    queue: int = typer.Option(8, "--queue", help="Requests that may wait for the model; more get 429."),
    backend: str | None = typer.Option(None, "--backend", help=f"{registry.choices()} (default auto)."),
    max_pixels: int | None = typer.Option(
        None, "--max-pixels", help="Shrink each image to this many pixels; wins over --detail."
    ),
    detail: str | None = typer.Option(
        None,
        "--detail",
        help="low | medium | high | max | auto: the image detail of a request that does not set it in its"
        " image part (image_url.detail, or image_url.max_pixels); default auto, this machine's (qvq doctor).",
    ),
    max_images: int | None = typer.Option(
        None, "--max-images", help="Images one request may carry (default 4)."
    ),
    gpu_layers: str | None = typer.Option(None, "--gpu-layers", help=_GPU_LAYERS_HELP),
    allow_image_urls: bool = typer.Option(
        False,
        "--allow-image-urls",
        help="Fetch http(s) image URLs (public addresses only); default: data: URIs only.",
    ),
) -> None:
    """Serve a model over an OpenAI-compatible API, with thinking budgets that work for QVQ.

    POST /v1/chat/completions (streamed or not; the thought in reasoning_content and reasoning, the answer in
    content; set the budget with thinking_budget), GET /v1/models, GET /health.  Needs the serve extra.

    Example:

      qvq serve -m QVQ-72B-Preview-gguf-q4_k_m --port 8000

      curl localhost:8000/v1/chat/completions -d '{"messages": [...], "thinking_budget": 512, "stream": true}'

    A request's image part may set its own detail as OpenAI's do, {"type": "image_url", "image_url":
    {"url": "data:...", "detail": "high"}} (low | medium | high | max | auto), or a pixel bound with
    "max_pixels"; the result's settings.detail says which bound was used and where it came from.
    """
    from qvq_local.serve import serve as run_server

    run_server(
        model,
        host=host,
        port=port,
        api_key=api_key,
        queue=queue,
        backend=backend or "auto",
        max_pixels=max_pixels,
        detail=detail,
        max_images=max_images,
        gpu_layers=gpu_layers,
        allow_image_urls=allow_image_urls,
        warn=lambda line: typer.echo(line, err=True),
    )


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    """SIGTERM means "stop" just as Ctrl-C does: raise KeyboardInterrupt so commands that write files
    run their cleanup (no half-written folder is left) and the CLI exits 130.  Further SIGTERMs are
    ignored so a second one cannot cut that cleanup short."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> None:
    import faulthandler
    import signal

    # A native crash (SIGSEGV, SIGILL... inside llama.cpp or MLX) prints the Python stack it happened in,
    # so a report can say which step crashed, instead of the process vanishing with "Segmentation fault".
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # stderr without a file descriptor
        pass
    # installed here, not at import: a library user embedding qvq_local keeps their own SIGTERM handling
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
