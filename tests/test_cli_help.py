"""`qvq --help` and every command's --help stay light: no heavy library is imported to print help.

(Its speed is measured, not asserted: `python -X importtime -m qvq_local.cli --help`.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("numpy", "PIL", "mlx", "mlx_vlm", "llama_cpp", "huggingface_hub", "torch", "transformers", "gguf")
COMMANDS = ["", "ask", "convert", "synth", "pull", "models", "doctor", "bench", "config"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_no_heavy_library(command):
    argv = ["qvq", *([command] if command else []), "--help"]
    code = (
        "import sys, json\n"
        f"sys.argv = {argv!r}\n"
        "from qvq_local import cli\n"
        "try:\n    cli.app()\nexcept SystemExit as e:\n    code = e.code\n"
        f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["code"] in (0, None)
    assert last["heavy"] == [], f"`{' '.join(argv)}` imported {last['heavy']}"
    assert "Usage" in out.stdout


def test_convert_help_lists_what_the_converter_offers():
    """``qvq convert --help`` is built from convert/quants.py, the one list the converter checks against."""
    from qvq_local.convert import quants
    from typer.testing import CliRunner

    from qvq_local.cli import app

    out = CliRunner().invoke(app, ["convert", "--help"], terminal_width=400).stdout
    flat = " ".join(out.replace("│", " ").split())
    for text in (
        quants.quant_help(),
        quants.mmproj_quant_help(),
        quants.bits_help(),
        quants.group_size_help(),
    ):
        assert text in flat
    assert all(name in quants.quant_help() for name in quants.GGUF_QUANTS)
