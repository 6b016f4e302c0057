"""NVIDIA GPUs seen without llama.cpp, and the warning when llama.cpp cannot use them (recorded inputs)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from qvq_local import hardware
from qvq_local.backends import llama_buffers
from qvq_local.cli import app

SMI_H200 = (
    "GPU 0: NVIDIA H200 (UUID: GPU-5b1e3a5c-8a0e-4b7e-9d36-6c2c6f9d1a11)\n"
    "GPU 1: NVIDIA H200 (UUID: GPU-0f9e8d7c-6b5a-4c3d-2e1f-0a9b8c7d6e5f)\n"
)
DRIVER = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)


def test_nvidia_smi_and_driver_files_parse():
    assert hardware.parse_nvidia_smi_list(SMI_H200) == ["NVIDIA H200", "NVIDIA H200"]
    assert hardware.parse_nvidia_smi_list("No devices were found\n") == []
    assert hardware.parse_nvidia_driver_version(DRIVER) == "550.54.15"
    assert hardware.parse_nvidia_driver_version("") is None


def test_warning_only_for_an_nvidia_gpu_that_llama_cpp_cannot_use():
    gpu = {"present": True, "gpus": ["NVIDIA RTX 4090"], "driver": "550.54.15"}
    warning = llama_buffers.gpu_build_warning(gpu, ())
    assert warning is not None
    assert "NVIDIA RTX 4090" in warning and "without CUDA" in warning
    assert 'CMAKE_ARGS="-DGGML_CUDA=on"' in warning and "--force-reinstall" in warning
    assert llama_buffers.gpu_build_warning(gpu, ("CUDA",)) is None
    assert llama_buffers.gpu_build_warning({"present": False, "gpus": []}, ()) is None
    assert (
        llama_buffers.gpu_build_warning(gpu, None) is None
    )  # llama-cpp-python not installed: nothing to rebuild


def test_ask_warns_in_one_line_when_the_gpu_sits_idle(monkeypatch, capsys):
    from qvq_local import ask_cmd
    from qvq_local.backends import registry
    from qvq_local.model import Model

    class Loaded:
        gpu_offload = False

    # the llama backend's load_notices hook, reached through the registry by Model.notices()
    model = Model(Loaded(), name="m", spec=registry.get("llama"), quantization="q4")
    monkeypatch.setattr(hardware, "detect_nvidia", lambda run_smi=True: {"present": True, "gpus": []})
    ask_cmd.show_notices(model)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: this machine has an NVIDIA GPU")
    model.loaded.gpu_offload = True
    ask_cmd.show_notices(model)
    assert capsys.readouterr().err == ""


def test_doctor_json_shows_cpu_features_build_and_buffers(monkeypatch):
    from qvq_local.cpu import detect

    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    machine = json.loads(result.output)["machine"]
    assert machine["cpu"]["features"] == detect().shown()
    assert "nvidia" in machine and isinstance(machine["nvidia"]["present"], bool)
    if machine["llama_cpp_installed"]:
        assert "CPU" in machine["llama_backends"]
        assert machine["llama_cpu_buffers"]


def test_doctor_shows_the_nvidia_gpu_and_the_rebuild_line(monkeypatch):
    monkeypatch.setattr(
        hardware,
        "detect_nvidia",
        lambda run_smi=True: {"present": True, "gpus": ["NVIDIA L4"], "driver": "550.1"},
    )
    monkeypatch.setattr(hardware, "backend_installed", lambda b: b == "llama")
    monkeypatch.setattr(
        llama_buffers,
        "probe_gpu",
        lambda: {"llama_gpu_offload": False, "cuda": False, "metal": False, "llama_backends": ["CPU"]},
    )
    monkeypatch.setattr(llama_buffers, "buffer_plan", lambda cpu: "llama.cpp's choice")
    result = CliRunner().invoke(app, ["doctor"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "NVIDIA L4 (driver 550.1)" in result.output
    assert "built without CUDA" in result.output and "-DGGML_CUDA=on" in result.output


def test_doctor_with_a_broken_llama_library_reports_instead_of_crashing(monkeypatch):
    monkeypatch.setattr(hardware, "backend_installed", lambda b: b == "llama")
    monkeypatch.setattr(
        llama_buffers,
        "probe_gpu",
        lambda: {"llama_gpu_offload": None, "llama_error": "OSError: libllama.so"},
    )
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    machine = json.loads(result.output)["machine"]
    assert machine["llama_error"] == "OSError: libllama.so"
    assert "gpu_warning" not in machine and "llama_cpu_buffers" not in machine
