"""The GGUF converter against llama.cpp's own, tensor by tensor (opt-in: it needs llama.cpp's sources).

llama.cpp's converter ships in the llama-cpp-python sdist (``pip download llama-cpp-python==0.3.36
--no-deps --no-binary :all:``, then ``vendor/llama.cpp``); point ``QVQ_LLAMA_CPP_SRC`` at that folder to run
these.  Its ``convert_hf_to_gguf.py`` runs in a subprocess on the same synthetic checkpoint, with the
pre-tokeniser name given (the synthetic tokenizer's hash is not in its table) and ``--no-mtp`` for Qwen3.5
(qvq-local leaves the MTP block out).  Every tensor must be byte-identical (``ssm_a`` = ``-exp(A_log)``
within one float32 step: torch's float32 exp is not always correctly rounded, numpy's float64 one rounded
once is), and every key llama.cpp writes must be there with its value, except ``general.size_label``
(cosmetic), ``tokenizer.ggml.bos_token_id`` (qvq-local writes none for a tokenizer that has no bos) and,
in the mmproj, the keys qvq-local does not copy there (sampling defaults, the quantisation version).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from qvq_local.convert import synthetic

SRC = os.environ.get("QVQ_LLAMA_CPP_SRC")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SRC, reason="set QVQ_LLAMA_CPP_SRC to llama.cpp's source folder to compare"),
]

_DRIVER = """
import runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src + "/gguf-py", src]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""

#: Keys llama.cpp writes that qvq-local does not, by file (see the module's doc).
_NOT_WRITTEN = {
    "model": {"general.size_label", "tokenizer.ggml.bos_token_id"},
    "mmproj": {
        "general.size_label",
        "general.quantization_version",
        "general.sampling.temp",
        "general.sampling.top_k",
        "general.sampling.top_p",
        "general.sampling.penalty_repeat",
    },
}


def _reference(ckpt: Path, out: Path, pre: str, outtype: str, *extra: str) -> Path:
    cmd = [
        sys.executable,
        "-c",
        _DRIVER,
        SRC,
        pre,
        str(ckpt),
        "--outtype",
        outtype,
        "--outfile",
        str(out),
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _read(path: Path):
    import gguf
    import numpy as np

    r = gguf.GGUFReader(path)
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "general.name"}
    kv = {
        f.name: f.contents()
        for f in r.fields.values()
        if not f.name.startswith("GGUF.") and f.name not in skip
    }
    return kv, {t.name: (t.tensor_type.name, list(t.shape), np.asarray(t.data)) for t in r.tensors}


def _compare(ours: Path, ref: Path, which: str) -> int:
    import numpy as np

    okv, ot = _read(ours)
    rkv, rt = _read(ref)
    assert set(rkv) - set(okv) == _NOT_WRITTEN[which] & set(rkv), set(rkv) - set(okv)
    assert set(okv) <= set(rkv), set(okv) - set(rkv)
    for key in set(okv) & set(rkv):
        if key != "tokenizer.chat_template":
            assert okv[key] == rkv[key], key
    assert set(ot) == set(rt)
    for name, (qtype, shape, data) in ot.items():
        assert (qtype, shape) == rt[name][:2], name
        if name.endswith("ssm_a"):
            assert np.allclose(data, rt[name][2], rtol=2**-23, atol=0), name
        else:
            assert data.tobytes() == rt[name][2].tobytes(), name
    return len(ot)


CASES = [
    ("qwen3-vl-moe", "qwen2", ()),
    ("qwen3.5", "qwen35", ("--no-mtp",)),
    ("qwen3.5-moe", "qwen35", ("--no-mtp",)),
]


@pytest.mark.parametrize(("family", "pre", "extra"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_the_pair_is_llama_cpps_own(family, pre, extra, outtype, artifacts, tmp_path):
    from qvq_local.convert.to_gguf import convert_to_gguf

    ckpt = artifacts / f"reference-{family}"
    if not ckpt.exists():
        synthetic.write_checkpoint(ckpt, "tiny", dtype="f32", family=family)
    pair = convert_to_gguf(ckpt, tmp_path / "ours", quant=outtype, mmproj_quant=outtype)
    text = _reference(ckpt, tmp_path / "text.gguf", pre, outtype, *extra)
    mmproj = _reference(ckpt, tmp_path / "mmproj.gguf", pre, outtype, "--mmproj")
    n = _compare(pair.model, text, "model")
    m = _compare(pair.mmproj, mmproj, "mmproj")
    print(f"\n{family} {outtype}: {n} text and {m} mmproj tensors identical to llama.cpp's converter's")
