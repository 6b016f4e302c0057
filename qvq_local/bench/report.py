"""Presentation of a finished benchmark: the Rich tables, the JSON file and the PNG chart.

Everything here reads the result dictionary built by ``qvq_local.bench.harness``; nothing measures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qvq_local import atomic
from qvq_local.bench.stats import median_and_spread
from qvq_local.units import file_size, memory_size

#: The per-image-size table: (header, field of a size's summary, format).  Each cell shows the median and,
#: with more than one run, the min-max across runs.  A new figure reported by the worker is one more row
#: here.
PER_SIZE_COLUMNS: list[tuple[str, str, str]] = [
    ("img tok", "image_tokens", "d"),
    ("encode s", "image_encode_s", ".3f"),
    ("prefill t/s", "prefill_tok_s", ".1f"),
    ("1st tok s", "first_token_s", ".3f"),
    ("decode t/s", "decode_tok_s", ".2f"),
    ("forced s", "forced_step_s", ".3f"),
]


def _fmt(value, spec: str = ".2f", missing: str = "-") -> str:
    if value is None or value == "":
        return missing
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _memory(value) -> str:
    """An amount of memory (peak RSS) in binary units; "-" when not measured."""
    return memory_size(value) if value else "-"


def _file(value) -> str:
    """A size on disk (a model, the bytes a token reads from it) in decimal units; "-" when not known."""
    return file_size(value) if value else "-"


def _table(title: str, columns: list[str]) -> Table:
    from rich import box

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    return table


def render_tables(result: dict, console: Console | None = None) -> None:
    """Print the machine line and three tables: per image size, speed against limits, size and memory."""
    console = console or Console()
    bw = result.get("bandwidth", {})
    machine = result.get("machine", {})
    settings = result.get("settings", {})
    console.print(
        f"[bold]{result.get('model', {}).get('label', '')}[/] on {machine.get('summary', '?')}\n"
        f"memory bandwidth: read {_fmt(bw.get('read_gbs_median'), '.1f')} GB/s median "
        f"(best {_fmt(bw.get('read_gbs_best'), '.1f')}), copy {_fmt(bw.get('copy_gbs_median'), '.1f')} GB/s; "
        f"{settings.get('runs', '?')} runs after a warm-up, "
        f"{settings.get('decode_tokens', '?')} thought tokens",
        highlight=False,
    )

    per_size = _table(
        "Per image size (median; below it, min-max across runs)",
        ["backend path image", *[header for header, _, _ in PER_SIZE_COLUMNS]],
    )
    blank = [""] * len(PER_SIZE_COLUMNS)
    backends = result.get("backends", {})
    for name, b in backends.items():
        if not b.get("available"):
            per_size.add_row(f"{name} [red](not run)[/]", *blank)
            continue
        for impl in ("qvq", "raw"):
            part = b.get(impl) or {}
            if not part.get("ok"):
                per_size.add_row(f"{name} {impl} [red](not run)[/]", *blank)
                continue
            for size, fig in part.get("sizes", {}).items():
                per_size.add_row(
                    f"{name} {impl} {size}px",
                    *[median_and_spread(fig, key, spec, sep="\n") for _, key, spec in PER_SIZE_COLUMNS],
                )
    console.print(per_size)

    speed = _table(
        "Decode against the limits",
        ["backend", "decode t/s", "bound t/s", "of bound", "qvq/raw decode", "qvq/raw 1st tok"],
    )
    for name, b in backends.items():
        if not b.get("available"):
            speed.add_row(name, "-", _fmt(b.get("bound_tok_s"), ".1f"), "-", "-", "-")
            continue
        ratios = b.get("ratios") or {}
        speed.add_row(
            name,
            median_and_spread(b, "decode_tok_s", ".2f", sep="\n"),
            _fmt(b.get("bound_tok_s"), ".1f"),
            median_and_spread(b, "bound_fraction", ".0%", sep="\n"),
            median_and_spread(ratios, "decode_tok_s", ".3f", sep="\n"),
            median_and_spread(ratios, "first_token_s", ".3f", sep="\n"),
        )
    console.print(speed)
    for name, b in backends.items():
        if b.get("available") and b.get("order"):
            console.print(f"  {name}: runs {b['order']}", highlight=False)
    for name, b in backends.items():
        placement = (b.get("qvq") or {}).get("placement")
        if b.get("available") and placement and placement != "CPU":
            console.print(
                f"  {name}: text layers: {placement}; the bound is the CPU memory's, which does not limit"
                " layers on the GPU.",
                highlight=False,
            )
    for name, b in backends.items():
        compute = (b.get("qvq") or {}).get("compute")
        if b.get("available") and compute:
            console.print(
                f"  {name}: qvq-local runs with {compute}; the raw library keeps the model's own dtype, "
                "so the qvq/raw ratios include that choice, not only the loop's overhead."
            )

    for name, b in backends.items():
        lock = (b.get("qvq") or {}).get("lang_lock")
        if b.get("available") and lock:
            console.print(
                f"  {name}: language lock (English question, {lock['masked_tokens']} tokens masked; table built"
                f" once in {_fmt(lock.get('table_s'), '.2f')} s): step {_fmt(lock['step_ms_off'], '.2f')} ms"
                f" unlocked, {_fmt(lock['step_ms_on'], '.2f')} ms locked"
                f" ({lock['overhead_ms']:+.2f} ms/token)",
                highlight=False,
            )

    _prefix_table(console, backends)
    _video_table(console, backends)
    _speculation_table(console, backends)

    size = _table(
        "Size and memory",
        [
            "backend",
            "on disk",
            "read/tok",
            "peak RSS qvq",
            "peak RSS raw",
            "load s",
            "convert s",
            "convert peak",
        ],
    )
    for name, b in backends.items():
        conv = b.get("conversion") or {}
        size.add_row(
            name,
            _file(b.get("model_bytes")),
            _file(b.get("bytes_per_token")),
            _memory((b.get("qvq") or {}).get("peak_rss_bytes")),
            _memory((b.get("raw") or {}).get("peak_rss_bytes")),
            _fmt((b.get("qvq") or {}).get("load_s"), ".2f"),
            (_fmt(conv.get("seconds"), ".1f") + ("*" if conv.get("reused") else "")) if conv else "-",
            _memory(conv.get("peak_rss_bytes")),
        )
    console.print(size)
    notes = []
    if any((b.get("conversion") or {}).get("reused") for b in backends.values()):
        notes.append("* converted in an earlier run and reused from the cache: time and peak are that run's")
    for name, b in backends.items():
        if not b.get("available"):
            notes.append(f"{name}: not run: {b.get('reason', '?')}")
        elif not (b.get("raw") or {}).get("ok"):
            notes.append(f"{name}: raw library not run: {(b.get('raw') or {}).get('reason', '?')}")
        elif not (b.get("qvq") or {}).get("ok"):
            notes.append(f"{name}: qvq path failed: {(b.get('qvq') or {}).get('reason', '?')}")
    for note in notes:
        console.print(f"[yellow]{note}[/]", highlight=False)
    console.print(
        "[dim]qvq/raw decode: higher is better (>= 1.0: no overhead). qvq/raw 1st tok: lower is better "
        "(<= 1.0: no overhead); each is the median of the per-run ratios (qvq run i / raw run i), with their "
        "min-max. bound = read bandwidth / bytes read per token; of bound = decode / bound. "
        "Ratios and decode at the smallest image size.[/]"
    )
    render_chains_table(result, console)


def _prefix_table(console: Console, backends: dict) -> None:
    """Issue 16: first token for a repeated image (in-memory and on-disk prefix cache) and the cache's cost."""
    table = _table(
        "Repeated image: prefix reuse (median (min-max) over runs)",
        ["backend", "image", "1st tok s", "again, memory", "again, disk", "write/read s", "size"],
    )
    rows = 0
    for name, b in backends.items():
        for size, fig in ((b.get("qvq") or {}).get("sizes") or {}).items():
            reuse = fig.get("prefix_reuse")
            if not reuse:
                continue
            rows += 1
            table.add_row(
                name,
                f"{size}px",
                median_and_spread(reuse, "first_token_s", ".2f"),
                f"{_fmt(reuse.get('memory_first_token_s'), '.2f')} s, x{median_and_spread(reuse, 'memory_ratio', '.2f')}",
                f"{_fmt(reuse.get('disk_first_token_s'), '.2f')} s, x{median_and_spread(reuse, 'disk_ratio', '.2f')}",
                f"{_fmt(reuse.get('write_s'), '.3f')}/{_fmt(reuse.get('read_s'), '.3f')}",
                _file(reuse.get("bytes")),
            )
    if rows:
        console.print(table)
        console.print(
            "[dim]again: the same image with another question; x = its first token / the first ask's (goal:"
            " <= 0.2). disk: a new process's case (`qvq ask` run again); the write happens after the first"
            " answer.[/]"
        )


def _video_table(console: Console, backends: dict) -> None:
    """``qvq bench --video``: one question about a 10 s clip per backend (median (min-max) over runs)."""
    table = _table(
        "A clip (qvq bench --video; median (min-max) over runs)",
        ["backend", "as", "frames", "video tokens", "decode+sample s", "encode s", "prefill s", "1st tok s"],
    )
    rows = 0
    for name, b in backends.items():
        fig = (b.get("qvq") or {}).get("video")
        if not fig:
            continue
        rows += 1
        table.add_row(
            name,
            str(fig.get("mode", "-")),
            _fmt(fig.get("frames"), "d"),
            _fmt(fig.get("video_tokens"), "d"),
            median_and_spread(fig, "decode_sample_s", ".3f"),
            median_and_spread(fig, "encode_s", ".2f"),
            median_and_spread(fig, "prefill_s", ".2f"),
            median_and_spread(fig, "first_token_s", ".2f"),
        )
    if rows:
        console.print(table)
        console.print(
            "[dim]as: video (native video patches) or frames (one image each, llama.cpp). decode+sample: "
            "opening the clip, seeking to and decoding the sampled frames, sizing them. encode: the vision "
            "tower. 1st tok: from the call to the first generated token.[/]"
        )


def _speculation_table(console: Console, backends: dict) -> None:
    """``qvq bench --speculation``: does checking guessed tokens pay here (:mod:`qvq_local.bench.speculation`)."""
    table = _table(
        "Speculation (qvq bench --speculation; medians over runs)",
        [
            "backend",
            "k+1 pass / 1",
            "replay tok/step",
            "accept",
            "speedup",
            "projected",
            "Qwen vocab",
            "self-draft",
            "auto",
        ],
    )
    rows = 0
    for name, b in backends.items():
        fig = b.get("speculation")
        if not fig:
            continue
        if not fig.get("ok"):
            console.print(
                f"[yellow]{name}: speculation not measured: {fig.get('reason', '?')}[/]", highlight=False
            )
            continue
        rows += 1
        replay = fig.get("replay") or {}
        real = replay.get("real_vocabulary") or {}
        same = fig.get("identical_draft") or {}
        draft, auto = same.get("draft") or {}, same.get("auto") or {}
        ratio = (fig.get("cost_curve") or {}).get("ratio") or []
        table.add_row(
            name,
            f"{_fmt(ratio[-1] if ratio else None, '.2f')} (k={fig.get('k')})",
            _fmt(replay.get("tokens_per_step"), ".3f"),
            _fmt(replay.get("acceptance"), ".2f"),
            _fmt(replay.get("speedup"), ".2f") + "x",
            _fmt(replay.get("projected_speedup"), ".2f") + "x",
            f"{_fmt(real.get('tokens_per_step'), '.2f')} {_fmt(real.get('projected_speedup'), '.2f')}x",
            f"{_fmt(draft.get('tokens_per_step'), '.1f')} {_fmt(draft.get('speedup'), '.2f')}x"
            + ("" if draft.get("same_tokens", True) else " [red]tokens differ[/]"),
            f"k={auto.get('final_k', '-')} {_fmt(auto.get('speedup'), '.2f')}x",
        )
    if rows:
        console.print(table)
        console.print(
            "[dim]k+1 pass / 1: a forward pass over k+1 tokens against one over 1 (a bandwidth-bound GPU or "
            "Mac: near 1; a CPU: near k+1). replay: real QVQ replies forced through the model with n-gram "
            "guesses: tokens per pass, guesses accepted, speedup measured against the same replay one token a "
            "pass and projected from the cost curve. Qwen vocab: the same replies in Qwen's real tokenizer "
            "(model-free; needs dashscope): tokens per pass, projected speedup. self-draft: the model drafting "
            "for itself, tokens per pass and speedup (the mechanism's ceiling). auto: its final k (0: off, "
            "where it loses) and speedup.[/]"
        )


def render_chains_table(result: dict, console) -> None:
    """The ``--samples`` table of the bench report: one row per backend and N (nothing when not measured)."""
    rows = []
    for name, b in (result.get("backends") or {}).items():
        chains = b.get("chains") or {}
        if not chains.get("ok"):
            if chains:
                console.print(
                    f"[yellow]{name}: --samples not measured: {chains.get('reason', '?')}[/]", highlight=False
                )
            continue
        for n, fig in chains["by_n"].items():
            spread = f"{_fmt(fig['agg_tok_s_min'], '.1f')}-{_fmt(fig['agg_tok_s_max'], '.1f')}"
            rows.append(
                (
                    name,
                    n,
                    _fmt(fig["agg_tok_s"], ".1f"),
                    spread,
                    _fmt(fig["per_chain_tok_s"], ".1f"),
                    _fmt(fig.get("speedup"), ".2f") + "x",
                )
            )
    if not rows:
        return
    table = _table(
        "--samples N: chains decoded in one batch (decode only, median of runs)",
        ["backend", "N", "aggregate tok/s", "min-max", "per chain tok/s", "vs N=1"],
    )
    for row in rows:
        table.add_row(*row)
    console.print(table)


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write the result atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(path, json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")


def write_outputs(result: dict, json_path, chart_path, log) -> None:
    """The JSON file and the chart, each path recorded in the result."""
    if json_path:
        result["json"] = str(write_json(result, json_path))
    if chart_path:
        try:
            result["chart"] = str(write_chart(result, chart_path))
        except ImportError as exc:
            result["chart_error"] = f"matplotlib is not installed ({exc}); pip install 'qvq-local[bench]'"
            log(result["chart_error"])
        if json_path:  # record the chart's path in the file too
            write_json(result, json_path)


def _medians_and_errors(per_size: dict, sizes: list[str], key: str) -> tuple[list[float], list[list[float]]]:
    """Medians of ``key`` at each size and matplotlib's ``yerr`` (below, above) reaching the min and max."""
    ys, below, above = [], [], []
    for s in sizes:
        fig = per_size[s]
        y = float(fig[key])
        sp = (fig.get("spread") or {}).get(key) or {"min": y, "max": y}
        ys.append(y)
        below.append(max(0.0, y - sp["min"]))
        above.append(max(0.0, sp["max"] - y))
    return ys, [below, above]


def write_chart(result: dict, path: str | os.PathLike) -> Path:
    """A two-panel PNG: decode tokens/s and image-encoding seconds across image sizes, per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_dec, ax_enc) = plt.subplots(1, 2, figsize=(11, 4.2))
    palette = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    all_sizes: set[int] = set()
    tokens_at: dict[int, int] = {}
    top = 0.0
    bounds = []
    for i, (name, b) in enumerate(result.get("backends", {}).items()):
        if not b.get("available"):
            continue
        colour = palette[i % len(palette)]  # each backend its own colour, by its place in the result
        for impl, style in (("qvq", "-o"), ("raw", "--s")):
            part = b.get(impl) or {}
            if not part.get("ok"):
                continue
            sizes = sorted(part["sizes"], key=int)
            xs = [int(s) for s in sizes]
            all_sizes.update(xs)
            ys, yerr = _medians_and_errors(part["sizes"], sizes, "decode_tok_s")
            top = max([top, *ys, *(y + e for y, e in zip(ys, yerr[1]))])
            dodge = 0.99 if impl == "qvq" else 1.01  # side by side, so both paths' bars show
            ax_dec.errorbar(
                [x * dodge for x in xs],
                ys,
                yerr=yerr,
                fmt=style,
                color=colour,
                capsize=3,
                label=f"{name} {impl}",
            )
            if impl == "qvq":
                for s in sizes:
                    tokens_at.setdefault(int(s), int(part["sizes"][s].get("image_tokens") or 0))
                enc, enc_err = _medians_and_errors(part["sizes"], sizes, "image_encode_s")
                ax_enc.errorbar(xs, enc, yerr=enc_err, fmt=style, color=colour, capsize=3, label=name)
        if b.get("bound_tok_s"):
            bounds.append((name, colour, b["bound_tok_s"]))
    off_scale = []
    for name, colour, bound in bounds:
        if top and bound > 3 * top:  # a line far above the points would flatten them: name it instead
            off_scale.append(f"{name} {bound:,.0f}")
        else:
            ax_dec.axhline(bound, color=colour, linestyle=":", linewidth=1, label=f"{name} bandwidth bound")
    ticks = sorted(all_sizes)
    for ax in (ax_dec, ax_enc):
        if ticks:  # a fixed margin: with one size, autoscaling would spread the side-by-side bars apart
            ax.set_xlim(min(ticks) * 0.85, max(ticks) * 1.15)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{s}\n({tokens_at[s]} tok)" if tokens_at.get(s) else str(s) for s in ticks])
        ax.set_xlabel("image size (px, square; image tokens)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    model = result.get("model", {}).get("label", "")
    ax_dec.set_title(f"Decode speed, {model}" if model else "Decode speed")
    ax_dec.set_ylabel("tokens / s (median; bars: min-max)")
    if off_scale:
        ax_dec.text(
            0.02,
            0.02,
            "bandwidth bound (tok/s, off scale): " + ", ".join(off_scale),
            transform=ax_dec.transAxes,
            fontsize=8,
        )
    ax_dec.legend(fontsize=8, loc="best")
    ax_enc.set_title("Image encoding time (qvq-local)")
    ax_enc.set_ylabel("seconds (median; bars: min-max)")
    ax_enc.legend(fontsize=8, loc="best")
    summary = result.get("machine", {}).get("summary", "")
    fig.suptitle(f"qvq bench on {summary}" if summary else "qvq bench", fontsize=10)
    fig.tight_layout()
    try:
        with atomic.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
