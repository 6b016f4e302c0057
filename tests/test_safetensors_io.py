"""The torch-free safetensors reader and streaming writer (qvq_local/formats/safetensors.py).

Round trips, bf16 bit-exactness, hard validation of corrupt files, atomic writing, and cross-checks
against the reference ``safetensors`` package where it is installed.
"""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest
from helpers import assert_error

from qvq_local.errors import ModelError
from qvq_local.formats import safetensors as st


def _raw_file(path, header: dict, data: bytes, header_len: int | None = None) -> None:
    """Write a safetensors file by hand (so tests can make it lie)."""
    h = json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + h + data)


def _sample_tensors():
    rng = np.random.default_rng(1)
    return {
        "w.f32": rng.standard_normal((5, 7)).astype(np.float32),
        "w.f16": rng.standard_normal((3, 4)).astype(np.float16),
        "w.i64": np.arange(12, dtype=np.int64).reshape(3, 4),
        "w.u8": np.arange(10, dtype=np.uint8),
        "w.bool": np.array([True, False, True]),
        "w.empty": np.zeros((0, 4), dtype=np.float32),
        "w.scalar": np.array(3.5, dtype=np.float32),
    }


# ------------------------------------------------------------------------------------------ bf16
def test_bf16_roundtrip_of_every_bit_pattern_is_exact():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = st.bf16_bits_to_f32(bits)
    back = st.f32_to_bf16_bits(values)
    nan = np.isnan(values)
    assert np.array_equal(back[~nan], bits[~nan])
    assert np.isnan(st.bf16_bits_to_f32(back[nan])).all()  # NaNs stay NaN


def test_f32_to_bf16_rounds_to_nearest_even():
    x = np.array(
        [1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), np.inf, -np.inf, 3.4e38],
        dtype=np.float32,
    )
    got = st.bf16_bits_to_f32(st.f32_to_bf16_bits(x))
    # halfway cases go to the even mantissa; just above halfway rounds up; past bf16's max rounds to inf
    assert got.tolist() == [1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -1.0, np.inf, -np.inf, np.inf]


def test_f32_to_bf16_matches_torch():
    torch = pytest.importorskip("torch")
    x = torch.randn(200_000) * torch.logspace(-30, 30, 200_000)
    ours = st.f32_to_bf16_bits(x.numpy())
    ref = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)


# ------------------------------------------------------------------------------------------ round trips
def test_roundtrip_many_dtypes_across_shards(tmp_path):
    tensors = _sample_tensors()
    bf16_src = np.random.default_rng(2).standard_normal((6, 8)).astype(np.float32)
    with st.ShardedWriter(tmp_path, max_shard_bytes=100) as w:
        for name, arr in tensors.items():
            w.add(name, arr)
        w.add("w.bf16", bf16_src, "BF16")
    files = sorted(p.name for p in tmp_path.iterdir())
    n = len([f for f in files if f.endswith(".safetensors")])
    assert n >= 3
    assert files == sorted(
        [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)] + [st.INDEX_NAME]
    )

    ckpt = st.ShardedCheckpoint(tmp_path)
    assert sorted(ckpt.keys()) == sorted([*tensors, "w.bf16"])
    for name, arr in tensors.items():
        assert ckpt.shape(name) == arr.shape
        assert ckpt.raw(name).dtype == arr.dtype
        assert np.array_equal(ckpt.raw(name), arr)
    assert ckpt.dtype("w.bf16") == "BF16" and ckpt.raw("w.bf16").dtype == np.uint16
    assert np.array_equal(ckpt.raw("w.bf16"), st.f32_to_bf16_bits(bf16_src))
    assert np.abs(ckpt.to_f32("w.bf16") - bf16_src).max() <= np.abs(bf16_src).max() * 2**-8
    assert ckpt.to_f32("w.f16").dtype == np.float32

    index = json.loads((tmp_path / st.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(ckpt.nbytes(k) for k in ckpt)
    assert set(index["weight_map"]) == set(ckpt.keys())
    for name, shard in index["weight_map"].items():
        assert ckpt.shard_of(name).name == shard
    # raw views are read-only memory maps, not copies
    with pytest.raises(ValueError):
        ckpt.raw("w.f32")[0, 0] = 1.0


def test_single_file_checkpoint(tmp_path):
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    _raw_file(
        tmp_path / "model.safetensors",
        {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}},
        arr.tobytes(),
    )
    ckpt = st.ShardedCheckpoint(tmp_path)
    assert ckpt.keys() == ["a"] and ckpt.metadata == {"format": "pt"}
    assert np.array_equal(ckpt.raw("a"), arr)


def test_reader_agrees_with_reference_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    ref = {"a": torch.randn(4, 6).to(torch.bfloat16), "b": torch.randn(5).half(), "c": torch.arange(7)}
    save_file(ref, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    f = st.SafetensorsFile(tmp_path / "model.safetensors")
    assert f.dtype("a") == "BF16" and f.dtype("b") == "F16" and f.dtype("c") == "I64"
    assert np.array_equal(f.to_f32("a"), ref["a"].float().numpy())
    assert np.array_equal(f.raw("b"), ref["b"].numpy())
    assert np.array_equal(f.raw("c"), ref["c"].numpy())


def test_writer_output_loads_in_reference_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    src = np.random.default_rng(3).standard_normal((9, 4)).astype(np.float32)
    with st.ShardedWriter(tmp_path, max_shard_bytes=1 << 20) as w:
        w.add("x.bf16", src, "BF16")
        w.add("x.f32", src)
    loaded = load_file(str(tmp_path / "model-00001-of-00001.safetensors"))
    assert loaded["x.bf16"].dtype == torch.bfloat16
    assert torch.equal(loaded["x.bf16"], torch.from_numpy(src).to(torch.bfloat16))
    assert torch.equal(loaded["x.f32"], torch.from_numpy(src))


def test_reserved_header_path_and_its_overflow_fallback(tmp_path, monkeypatch):
    """Big shards get their header written into reserved room (no copy); if it overflows, a copy."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    monkeypatch.setattr(st, "_SMALL_SHARD", 1024)
    monkeypatch.setattr(st, "_HEADER_RESERVE", 512)
    big = np.arange(4096, dtype=np.float32)
    with st.ShardedWriter(tmp_path / "fits", max_shard_bytes=1 << 30) as w:
        w.add("big", big)
    f = st.SafetensorsFile(tmp_path / "fits" / "model-00001-of-00001.safetensors")
    assert f._data_start == 512  # the header filled the reserved room exactly
    assert np.array_equal(f.raw("big"), big)
    assert torch.equal(load_file(str(f.path))["big"], torch.from_numpy(big))

    with st.ShardedWriter(tmp_path / "overflow", max_shard_bytes=1 << 30) as w:
        w.add("big", big)
        for i in range(40):  # header outgrows 512 bytes
            w.add(f"small.tensor.with.a.long.name.{i}", np.full(3, i, dtype=np.float32))
    f = st.SafetensorsFile(tmp_path / "overflow" / "model-00001-of-00001.safetensors")
    assert f._data_start > 512 and len(f) == 41
    assert np.array_equal(f.raw("big"), big)
    assert f.raw("small.tensor.with.a.long.name.39").tolist() == [39.0] * 3


def test_chunked_writing_keeps_memory_flat(tmp_path):
    """A 64 MB tensor written in 1 MB chunks never holds more than a few chunks in memory."""
    rows, cols = 64, 256 * 1024  # 64 MB of float32

    def chunks():
        for r in range(rows):
            yield np.full((1, cols), r, dtype=np.float32)

    tracemalloc.start()
    try:
        with st.ShardedWriter(tmp_path, max_shard_bytes=1 << 30) as w:
            w.add_chunked("big", (rows, cols), "F32", chunks())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"peak traced memory {peak} bytes"
    got = st.ShardedCheckpoint(tmp_path).raw("big")
    assert got.shape == (rows, cols) and got[37, 1000] == 37.0


# ------------------------------------------------------------------------------------------ atomicity
def test_exception_inside_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), st.ShardedWriter(tmp_path, max_shard_bytes=64) as w:
        for i in range(5):
            w.add(f"t{i}", np.zeros(16, dtype=np.float32))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_in_chunks_leaves_nothing(tmp_path):
    def chunks():
        yield np.zeros((1, 8), dtype=np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), st.ShardedWriter(tmp_path, max_shard_bytes=64) as w:
        w.add("done", np.zeros(32, dtype=np.float32))
        w.add_chunked("half", (2, 8), "F32", chunks())
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_wrong_chunk_sizes_and_duplicates(tmp_path):
    with pytest.raises(ValueError, match="needs"), st.ShardedWriter(tmp_path) as w:
        w.add_chunked("short", (4, 4), "F32", [np.zeros((2, 4), dtype=np.float32)])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="twice"), st.ShardedWriter(tmp_path) as w:
        w.add("a", np.zeros(2, dtype=np.float32))
        w.add("a", np.zeros(2, dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ corrupt input
def _good(tmp_path):
    path = tmp_path / "model.safetensors"
    _raw_file(
        path,
        {
            "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]},
        },
        bytes(24),
    )
    return path


def test_good_handmade_file_reads(tmp_path):
    f = st.SafetensorsFile(_good(tmp_path))
    assert f.keys() == ["a", "b"] and f.shape("b") == (4,)


@pytest.mark.parametrize(
    "header, data, problem",
    [
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(10), "truncated"),
        ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, bytes(16), "needs 24 bytes"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "unknown dtype"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), "gap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "accounts for 8"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "bad shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "bad data_offsets"),
        ({"a": [1, 2]}, b"", "not an object"),
    ],
)
def test_lying_or_broken_headers_raise_model_error(tmp_path, header, data, problem):
    path = tmp_path / "bad.safetensors"
    _raw_file(path, header, data)
    with pytest.raises(ModelError) as info:
        st.SafetensorsFile(path)
    assert_error(info, problem)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_real_file_raises(tmp_path):
    path = _good(tmp_path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ModelError) as raised:
        st.SafetensorsFile(path)
    assert_error(raised, "truncated")


@pytest.mark.parametrize(
    "blob, problem",
    [
        (b"\x01\x02", "shorter than"),
        (struct.pack("<Q", 10**9) + b"{}", "does not fit"),
        (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_garbage_files_raise(tmp_path, blob, problem):
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ModelError) as raised:
        st.SafetensorsFile(path)
    assert_error(raised, problem)


def test_missing_shard_and_wrong_index_raise(tmp_path):
    with st.ShardedWriter(tmp_path, max_shard_bytes=32) as w:
        w.add("a", np.zeros(8, dtype=np.float32))
        w.add("b", np.zeros(8, dtype=np.float32))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError) as raised:
        st.ShardedCheckpoint(tmp_path)
    assert_error(raised, "missing shard model-00002-of-00002.safetensors")

    index = json.loads((tmp_path / st.INDEX_NAME).read_text())
    shard = "model-00001-of-00002.safetensors"
    index["weight_map"] = {"a": shard, "ghost": shard}
    (tmp_path / st.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelError) as raised:
        st.ShardedCheckpoint(tmp_path)
    assert_error(raised, "'ghost'")

    (tmp_path / st.INDEX_NAME).write_text("{not json")
    with pytest.raises(ModelError) as raised:
        st.ShardedCheckpoint(tmp_path)
    assert_error(raised, "not valid JSON")


def test_folder_without_weights_and_unknown_tensor(tmp_path):
    with pytest.raises(ModelError) as raised:
        st.ShardedCheckpoint(tmp_path)
    assert_error(raised, "no model.safetensors.index.json or model.safetensors")
    with pytest.raises(ModelError) as raised:
        st.ShardedCheckpoint(tmp_path / "nope")
    assert_error(raised, "not a folder")
    _good(tmp_path)
    ckpt = st.ShardedCheckpoint(tmp_path)
    with pytest.raises(KeyError):
        ckpt.raw("nope")
    with pytest.raises(ModelError) as raised:
        ckpt.shape("nope")
    assert_error(raised, "no tensor named 'nope'")


def _with_gap(src, dst, gap: int = 0, tail: int = 0) -> None:
    """Copy a real safetensors file, inserting ``gap`` zero bytes after its first tensor's data and ``tail``
    bytes after the last tensor (offsets rewritten to match), as a buggy writer would."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    first_end = min(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    for key, entry in header.items():
        if key != "__metadata__" and entry["data_offsets"][0] >= first_end:
            entry["data_offsets"] = [o + gap for o in entry["data_offsets"]]
    h = json.dumps(header).encode()
    dst.write_bytes(
        struct.pack("<Q", len(h)) + h + data[:first_end] + bytes(gap) + data[first_end:] + bytes(tail)
    )


@pytest.mark.parametrize("gap, tail, words", [(8, 0, "gap of 8 bytes"), (0, 8, "8 bytes after the last")])
def test_doctor_and_convert_judge_a_gap_by_one_rule(tiny_checkpoint, tmp_path, gap, tail, words):
    """An 8-byte gap between tensors (or after the last one) is an error for ``qvq convert`` (raising mode)
    and for ``qvq doctor`` (findings mode), with the same message: the reference reader refuses both."""
    import shutil

    from qvq_local.integrity import check_model

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    shard = sorted(folder.glob("*.safetensors"))[0]
    _with_gap(sorted(tiny_checkpoint.glob("*.safetensors"))[0], shard, gap, tail)

    with pytest.raises(ModelError) as raised:
        st.ShardedCheckpoint(folder)
    assert_error(raised, words, path=shard)

    found = [f for f in check_model(folder) if f.path == str(shard)]
    assert [f.level for f in found] == ["error"], found
    assert found[0].message in str(raised.value) and words in found[0].message

    reference = pytest.importorskip("safetensors.numpy")
    with pytest.raises(Exception, match="invalid offset|not fully covered"):
        reference.load_file(str(shard))
