"""The llama.cpp backend on the synthetic tiny checkpoint.

Parity is measured against transformers (Qwen2VLForConditionalGeneration, f32, CPU) fed the same prompt
text (tokenised by the checkpoint's own tokenizer.json) and the same image (preprocessed by transformers'
PIL/numpy Qwen2-VL image processor).  llama.cpp runs Qwen2-VL with an RMS-norm epsilon of 0 instead of the
config's 1e-6 and its own image preprocessing, so parity is close, not bit-exact: the tolerances below say
how close, and the measured errors are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from helpers import assert_error

pytestmark = pytest.mark.llama

llama_cpp = pytest.importorskip("llama_cpp")

from qvq_local.backends import llama_runtime, llamacpp
from qvq_local.backends.base import LoadedModel, Prompt, SamplingParams, Session
from qvq_local.errors import BackendUnavailable, ContextOverflow, InputError, ModelError
from qvq_local.families import DEFAULT_FAMILY
from qvq_local.prompt import build_prompt, load_chat_template

QUESTION = "Which bar is the tallest, and by how much?"
FORCED = "\n\nTime is up.\n\n**Final Answer**\n"

# Tolerances against transformers f32.  The tiny random model's logits have std ~0.3 and range ~[-1, 1].
# Measured (x86-64 CPU, llama-cpp-python 0.3.36): text-only 8.7e-4 (2.4e-4 when transformers also runs with
# RMS eps 0, so most of it is llama.cpp's eps); with the image 1.8e-3 after prefill and 1.9e-3 after steps
# and a forced feed; vision embeddings alone 4.9e-4 (aligned image) / 5.5e-4 (resized image).
TEXT_ATOL = 2e-3
IMAGE_ATOL = 5e-3


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def f32_model(tiny_gguf_f32):
    model = llamacpp.load(tiny_gguf_f32.model, tiny_gguf_f32.mmproj)
    yield model
    model.close()


@pytest.fixture(scope="module")
def image(sample_image):
    from PIL import Image

    with Image.open(sample_image) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def prompt(tiny_checkpoint, image) -> Prompt:
    text = build_prompt(load_chat_template(tiny_checkpoint), QUESTION, 1)
    return Prompt(text=text, images=[image])


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    """transformers' model, tokenizer and PIL image processor for the same checkpoint (the reference)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32
    ).eval()
    processor = Qwen2VLImageProcessorPil.from_pretrained(tiny_checkpoint)
    tokenizer = Tokenizer.from_file(str(Path(tiny_checkpoint) / "tokenizer.json"))
    return model, processor, tokenizer


def hf_logits(hf, text: str, images: list, extra_ids: list[int] = ()):
    """Last-position logits of transformers for ``text`` (+ ``extra_ids``) with ``images``."""
    import torch

    model, processor, tokenizer = hf
    kwargs = {}
    if images:
        pix = processor(images=images, return_tensors="pt")
        merge = processor.merge_size**2
        counts = [int(t * h * w) // merge for t, h, w in pix["image_grid_thw"].tolist()]
        pieces = text.split("<|image_pad|>")
        text = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:]))
        kwargs = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
    ids = tokenizer.encode(text, add_special_tokens=False).ids + list(extra_ids)
    if images:  # transformers 5 wants the modality of each position (1 = image) for M-RoPE
        pad = tokenizer.token_to_id("<|image_pad|>")
        kwargs["mm_token_type_ids"] = torch.tensor([[1 if t == pad else 0 for t in ids]])
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs
        )
    return out.logits[0, -1].float().numpy(), ids


def _session(model, prompt, sampling=None, new_tokens=64):
    n_ctx = model.context_needed(prompt, new_tokens=new_tokens)
    return model.new_session(sampling or SamplingParams(), n_ctx=n_ctx)


def _generate(session, n):
    toks = []
    for _ in range(n):
        tok = session.step()
        toks.append(tok)
        if tok.is_eos:
            break
    return toks


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parity
def test_text_prompt_parity(f32_model, tiny_checkpoint, hf):
    """No image: isolates the language model (llama.cpp's RMS eps of 0 is the only known difference)."""
    import numpy as np

    text = build_prompt(load_chat_template(tiny_checkpoint), QUESTION, 0)
    session = _session(f32_model, Prompt(text=text, images=[]))
    try:
        session.prefill(Prompt(text=text, images=[]))
        ours = session.last_logits()
        ref, ref_ids = hf_logits(hf, text, [])
        assert session.prompt_text_ids == ref_ids, (
            "llama.cpp and tokenizer.json tokenise the prompt differently"
        )
        err = float(np.max(np.abs(ours - ref)))
        print(f"\ntext-only prompt: max |logit diff| vs transformers = {err:.3e} (tolerance {TEXT_ATOL})")
        assert err < TEXT_ATOL
        assert int(ours.argmax()) == int(ref.argmax())
    finally:
        session.close()


@pytest.mark.parity
def test_image_prompt_parity_and_positions_after_image(f32_model, prompt, hf):
    """With the image: next-token logits after prefill, then after 3 generated tokens and a forced feed.

    The second comparison checks the M-RoPE bookkeeping: text after an image continues at position
    ``n_pos + max(grid_h, grid_w)``, in step() and in feed() alike; ``n_past`` (the protocol's measure)
    counts KV cells, which is what ``n_ctx`` limits.
    """
    import numpy as np

    session = _session(f32_model, prompt)
    try:
        stats = session.prefill(prompt)
        ours = session.last_logits()
        ref, ref_ids = hf_logits(hf, prompt.text, prompt.images)
        # The text around the image is tokenised identically; the image takes the same number of tokens.
        pad = hf[2].token_to_id("<|image_pad|>")
        n_img = ref_ids.count(pad)
        assert stats.image_tokens == n_img == f32_model.image_token_estimate(*prompt.images[0].size)
        assert [t for t in ref_ids if t != pad] == session.prompt_text_ids
        err = float(np.max(np.abs(ours - ref)))
        print(
            f"\nimage prompt ({n_img} image tokens): max |logit diff| vs transformers = {err:.3e}"
            f" (tolerance {IMAGE_ATOL})"
        )
        assert err < IMAGE_ATOL
        assert int(ours.argmax()) == int(ref.argmax())

        generated = [tok.id for tok in _generate(session, 3)]
        assert len(generated) == 3
        forced = f32_model.tokenize(FORCED)
        assert session.feed(FORCED) == len(forced)
        ours2 = session.last_logits()
        ref2, _ = hf_logits(hf, prompt.text, prompt.images, extra_ids=generated + forced)
        err2 = float(np.max(np.abs(ours2 - ref2)))
        print(f"after 3 steps + forced feed: max |logit diff| = {err2:.3e}")
        assert err2 < IMAGE_ATOL
    finally:
        session.close()


@pytest.mark.parity
@pytest.mark.parametrize("size", [(224, 168), (301, 199)], ids=["no-resize", "resized"])
def test_vision_embeddings_parity(f32_model, tiny_checkpoint, hf, sample_image, size):
    """The image alone: mtmd's preprocessing + vision tower + merger vs transformers' ``model.visual``.

    224x168 is a multiple of 28 on both sides, so neither side resizes; 301x199 is resized (bicubic) by
    both, mtmd with its Pillow-compatible resampler, transformers with PIL itself.
    """
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(sample_image) as img:
        img = img.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    p = Prompt(text=build_prompt(load_chat_template(tiny_checkpoint), QUESTION, 1), images=[img])
    session = _session(f32_model, p, new_tokens=0)
    try:
        session.capture_image_embeddings = True
        session.prefill(p)
        (ours,) = session.image_embeddings
    finally:
        session.close()
    model, processor, _ = hf
    pix = processor(images=[img], return_tensors="pt")
    with torch.no_grad():
        out = model.model.visual(pix["pixel_values"], grid_thw=pix["image_grid_thw"])
    ref = (out.pooler_output if hasattr(out, "pooler_output") else out).float().numpy()
    assert ours.shape == ref.shape
    err = float(np.max(np.abs(ours - ref)))
    print(
        f"\nvision embeddings {size}: max |diff| = {err:.3e} (reference std {ref.std():.3f}, tolerance {IMAGE_ATOL})"
    )
    assert err < IMAGE_ATOL


# ---------------------------------------------------------------- session behaviour


def _count_encoder_runs(monkeypatch) -> list[str]:
    """Wrap every mtmd entry point that runs the vision encoder; returns the log of calls (by name).

    The session looks these up on the ``mtmd_cpp`` module at call time, so patching the module attribute
    sees each real call (the session's own ``images_encoded`` counter is not evidence: only prefill
    increments it).
    """
    from llama_cpp import mtmd_cpp

    calls: list[str] = []
    for name in (
        "mtmd_encode_chunk",
        "mtmd_encode",
        "mtmd_batch_encode",
        "mtmd_helper_eval_chunks",
        "mtmd_helper_eval_chunk_single",
    ):
        real = getattr(mtmd_cpp, name, None)
        if real is None:
            continue

        def counted(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(mtmd_cpp, name, counted)
    return calls


def test_feed_does_not_reencode_image(f32_model, prompt, monkeypatch):
    encoder_runs = _count_encoder_runs(monkeypatch)
    session = _session(f32_model, prompt)
    try:
        stats = session.prefill(prompt)
        assert encoder_runs == ["mtmd_encode_chunk"]  # one image, encoded once, by the call we time
        assert session.images_encoded == 1
        assert stats.image_tokens_per_image == [stats.image_tokens] and stats.image_tokens > 0
        assert stats.prompt_tokens == session.n_cells == f32_model.context_needed(prompt)
        # M-RoPE: positions advance less than cells after the image.
        gw, gh = llamacpp.image_grid(*prompt.images[0].size)
        assert session.n_pos == session.n_cells - gw * gh + max(gw, gh)
        assert session.n_past == session.n_cells
        assert 0 < stats.image_encode_s <= stats.prefill_s

        _generate(session, 4)
        past, pos = session.n_past, session.n_pos
        t0 = time.perf_counter()
        n = session.feed(FORCED)
        feed_s = time.perf_counter() - t0
        assert n == session.count_tokens(FORCED) > 0
        assert session.n_past == past + n and session.n_pos == pos + n
        after = _generate(session, 3)
        assert after and encoder_runs == ["mtmd_encode_chunk"]  # feed and steps never ran the encoder
        assert session.images_encoded == 1
        print(
            f"\nfirst prefill {stats.prefill_s * 1000:.1f} ms (image encode {stats.image_encode_s * 1000:.1f} ms,"
            f" {stats.prompt_tokens} tokens); forced feed of {n} tokens {feed_s * 1000:.1f} ms"
        )
    finally:
        session.close()


def test_same_seed_same_text(f32_model, prompt):
    def run(seed):
        sampling = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.05, seed=seed)
        session = _session(f32_model, prompt, sampling)
        try:
            session.prefill(prompt)
            return [t.id for t in _generate(session, 24)]
        finally:
            session.close()

    first, again, other = run(7), run(7), run(8)
    assert first == again
    assert first != other  # the seed reaches the sampler


def test_greedy_defaults_follow_penalised_argmax(f32_model, prompt):
    """The model's near-greedy defaults pick the top token of the logits after its repetition penalty.

    As in transformers, the prompt's own tokens count as repetitions (here: the last 64 text tokens).
    """
    import numpy as np

    session = _session(f32_model, prompt)
    try:
        session.prefill(prompt)
        logits = session.last_logits()
        seen = np.array(sorted(set(session.prompt_text_ids[-llama_runtime.PENALTY_LAST_N :])))
        penalty = f32_model.generation_config["repetition_penalty"]
        penalised = logits.copy()
        penalised[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        tok = session.step()
        assert tok.id == int(penalised.argmax())
        plain = f32_model.new_session(SamplingParams(repetition_penalty=1.0), n_ctx=session.n_ctx)
        try:
            plain.prefill(prompt)
            assert plain.step().id == int(logits.argmax())  # same prefill, no penalty: plain argmax
        finally:
            plain.close()
    finally:
        session.close()


def test_multibyte_characters_stream_whole(f32_model, prompt):
    text = "naïve 日本語 😀 ok"
    ids = f32_model.tokenize(text)
    session = _session(f32_model, prompt)
    try:
        pieces = [session.text.piece(t) for t in ids]
        # the byte-level vocabulary really splits some character across tokens
        assert any(_not_utf8(p) for p in pieces)
        streamed = [session.text.push(t) for t in ids]
        assert "".join(streamed) == text
        assert all("\ufffd" not in s for s in streamed)

        # and in generation: whatever the model writes, the streamed texts join to the decoded bytes
        session.prefill(prompt)
        session.sampling = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=3)
        session.sampler = llama_runtime.Sampler(session.sampling, f32_model.n_vocab)  # many byte tokens
        toks = _generate(session, 40)
        raw = b"".join(session.text.piece(t.id) for t in toks if not t.is_eos)
        assert "".join(t.text for t in toks) == raw.decode("utf-8", "replace")
    finally:
        session.close()


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_q4_loads_and_generates(tiny_gguf_q4, prompt, hf):
    import numpy as np

    model = llamacpp.load(tiny_gguf_q4.model, tiny_gguf_q4.mmproj)
    try:
        assert model.quantization == "Q4_K_M"
        session = _session(model, prompt)
        stats = session.prefill(prompt)
        logits = session.last_logits()
        ref, _ = hf_logits(hf, prompt.text, prompt.images)
        corr = float(np.corrcoef(logits, ref)[0, 1])
        print(
            f"\nQ4_K_M: max |logit diff| vs transformers f32 = {np.max(np.abs(logits - ref)):.3e},"
            f" correlation {corr:.4f}"
        )
        assert corr > 0.9
        toks = _generate(session, 8)
        assert toks and all(0 <= t.id < model.n_vocab for t in toks)
        assert stats.image_tokens > 0 and session.images_encoded == 1
        session.close()
    finally:
        model.close()


def _sampling(session) -> dict:
    return {k: getattr(session.sampling, k) for k in DEFAULT_FAMILY.sampling}


def test_sampling_defaults_are_the_models_own(f32_model, tiny_gguf_f32, tiny_checkpoint, tmp_path):
    """Unset sampling values come from the model: a generation_config.json beside the GGUF, then the GGUF's
    ``general.sampling.*`` keys, then QVQ's published values.

    The synthetic values differ from every fallback value, so a loader that ignored them fails here.
    """
    import shutil

    from qvq_local.convert.to_gguf import convert_to_gguf

    shipped = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    wanted = {k: shipped[k] for k in DEFAULT_FAMILY.sampling}
    assert all(wanted[k] != DEFAULT_FAMILY.sampling[k] for k in DEFAULT_FAMILY.sampling)
    assert not (Path(tiny_gguf_f32.model).parent / "generation_config.json").exists()  # from the GGUF alone
    session = f32_model.new_session(SamplingParams(), n_ctx=64)
    assert _sampling(session) == wanted
    session.close()
    session = f32_model.new_session(SamplingParams(top_k=0), n_ctx=64)  # an explicit value wins, alone
    assert _sampling(session) == {**wanted, "top_k": 0}
    session.close()

    def defaults(folder: Path) -> dict:
        mmproj = next(folder.glob("mmproj-*.gguf"))
        text = next(p for p in folder.glob("*.gguf") if p != mmproj)
        model = llamacpp.load(text, mmproj)
        try:
            session = model.new_session(SamplingParams(), n_ctx=64)
            try:
                return _sampling(session)
            finally:
                session.close()
        finally:
            model.close()

    beside = tmp_path / "with-sidecar"  # a file beside the GGUF overrides its metadata, key by key
    shutil.copytree(Path(tiny_gguf_f32.model).parent, beside)
    (beside / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 5}))
    assert defaults(beside) == {**wanted, "temperature": 0.3, "top_k": 5}

    source = tmp_path / "src"  # a model without sampling values anywhere: QVQ's published ones
    shutil.copytree(tiny_checkpoint, source)
    (source / "generation_config.json").unlink()
    pair = convert_to_gguf(source, tmp_path / "bare", quant="f32", mmproj_quant="f32")
    # the session really uses the fallback
    assert defaults(Path(pair.model).parent) == DEFAULT_FAMILY.sampling


def test_metadata(f32_model, tiny_checkpoint):
    assert f32_model.backend == "llama"
    assert f32_model.quantization == "F32"
    assert f32_model.context_length == 32768
    assert f32_model.chat_template and "<|im_start|>" in f32_model.chat_template
    assert f32_model.gpu_offload == bool(llama_cpp.llama_supports_gpu_offload())
    assert isinstance(f32_model, LoadedModel)
    session = f32_model.new_session(SamplingParams(), n_ctx=64)
    try:
        assert isinstance(session, Session) and session.n_ctx == 64 and session.n_past == 0
    finally:
        session.close()
    session.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        session.step()


def test_closing_the_model_closes_its_sessions(tiny_gguf_f32, prompt):
    model = llamacpp.load(tiny_gguf_f32.model, tiny_gguf_f32.mmproj)
    session = _session(model, prompt)
    session.prefill(prompt)
    model.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.step()
    with pytest.raises(RuntimeError, match="closed"):
        model.new_session(SamplingParams())
    model.close()


@pytest.mark.parametrize("size", [(224, 168), (500, 300), (30, 30), (1000, 90)])
def test_image_token_estimate_matches_mtmd(f32_model, tiny_checkpoint, size):
    from PIL import Image

    img = Image.new("RGB", size, (120, 30, 200))
    p = Prompt(text=build_prompt(load_chat_template(tiny_checkpoint), "What colour?", 1), images=[img])
    session = _session(f32_model, p, new_tokens=0)
    try:
        stats = session.prefill(p)
        assert stats.image_tokens == f32_model.image_token_estimate(*size)
        assert stats.prompt_tokens == f32_model.context_needed(p)
    finally:
        session.close()


# ---------------------------------------------------------------- context overflow


def test_context_overflow(f32_model, prompt):
    need = f32_model.context_needed(prompt)
    small = f32_model.new_session(SamplingParams(), n_ctx=need - 1)
    try:
        with pytest.raises(ContextOverflow):
            small.prefill(prompt)
    finally:
        small.close()

    exact = f32_model.new_session(SamplingParams(), n_ctx=need + 2)
    try:
        exact.prefill(prompt)
        exact.step()
        exact.step()
        with pytest.raises(ContextOverflow):
            exact.step()
        with pytest.raises(ContextOverflow):
            exact.feed(FORCED)
    finally:
        exact.close()

    with pytest.raises(ContextOverflow):
        f32_model.new_session(SamplingParams(), n_ctx=f32_model.context_length + 1)


def test_prompt_image_mismatch(f32_model, prompt):
    session = _session(f32_model, prompt)
    try:
        with pytest.raises(InputError):
            session.prefill(Prompt(text=prompt.text, images=[]))
    finally:
        session.close()


# ---------------------------------------------------------------- load errors


def _write_gguf(path: Path, arch: str, kv: dict) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tensor("dummy.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_files(tiny_gguf_f32, tmp_path):
    with pytest.raises(ModelError) as err:
        llamacpp.load(tmp_path / "nope.gguf", tiny_gguf_f32.mmproj)
    assert_error(err, "not found")
    assert "nope.gguf" in str(err.value)
    with pytest.raises(ModelError) as err:
        llamacpp.load(tiny_gguf_f32.model, tmp_path / "no-mmproj.gguf")
    assert_error(err, "mmproj")
    assert "no-mmproj.gguf" in str(err.value)
    with pytest.raises(ModelError) as raised:
        llamacpp.load(tiny_gguf_f32.model, None)
    assert_error(raised, "mmproj")


def test_corrupt_gguf(tiny_gguf_f32, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model at all" * 100)
    with pytest.raises(ModelError) as err:
        llamacpp.load(junk, tiny_gguf_f32.mmproj)
    assert_error(err, "not a GGUF")
    assert "junk.gguf" in str(err.value)

    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelError) as raised:
        llamacpp.load(empty, tiny_gguf_f32.mmproj)
    assert_error(raised, "not a GGUF")

    data = Path(tiny_gguf_f32.model).read_bytes()
    header_cut = tmp_path / "header-cut.gguf"
    header_cut.write_bytes(data[:200])
    with pytest.raises(ModelError) as err:
        llamacpp.load(header_cut, tiny_gguf_f32.mmproj)
    assert_error(err, "truncated|corrupt")
    assert "header-cut.gguf" in str(err.value)

    half = tmp_path / "half.gguf"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as err:  # not llama.cpp's "failed to load model"
        llamacpp.load(half, tiny_gguf_f32.mmproj)
    assert_error(err, "truncated")
    assert "half.gguf" in str(err.value) and len(str(err.value).splitlines()) == 1

    bad_version = tmp_path / "v99.gguf"
    bad_version.write_bytes(b"GGUF" + struct.pack("<I", 99) + data[8:4096])
    with pytest.raises(ModelError) as raised:
        llamacpp.load(bad_version, tiny_gguf_f32.mmproj)
    assert_error(raised, "version")

    proj = Path(tiny_gguf_f32.mmproj).read_bytes()
    bad_proj = tmp_path / "mmproj-half.gguf"
    bad_proj.write_bytes(proj[: len(proj) // 2])
    with pytest.raises(ModelError) as err:
        llamacpp.load(tiny_gguf_f32.model, bad_proj)
    assert "mmproj-half.gguf" in str(err.value)


def test_wrong_architecture(tiny_gguf_f32, tmp_path):
    other = _write_gguf(tmp_path / "llama-arch.gguf", "llama", {"llama.context_length": 2048})
    with pytest.raises(ModelError) as err:
        llamacpp.load(other, tiny_gguf_f32.mmproj)
    assert_error(err, "architecture is 'llama'")
    assert "llama-arch.gguf" in str(err.value)
    # the two files swapped
    with pytest.raises(ModelError) as raised:
        llamacpp.load(tiny_gguf_f32.mmproj, tiny_gguf_f32.model)
    assert_error(raised, "mmproj")
    with pytest.raises(ModelError) as raised:
        llamacpp.load(tiny_gguf_f32.model, tiny_gguf_f32.model)
    assert_error(raised, "not an mmproj")


def test_mismatched_mmproj(tiny_gguf_f32, tmp_path):
    wrong_kind = _write_gguf(tmp_path / "mmproj-llava.gguf", "clip", {"clip.projector_type": "mlp"})
    with pytest.raises(ModelError) as err:
        llamacpp.load(tiny_gguf_f32.model, wrong_kind)
    assert_error(err, "projector type")
    assert "mmproj-llava.gguf" in str(err.value)
    wrong_width = _write_gguf(
        tmp_path / "mmproj-7b.gguf",
        "clip",
        {"clip.projector_type": "qwen2vl_merger", "clip.vision.projection_dim": 3584},
    )
    with pytest.raises(ModelError) as err:
        llamacpp.load(tiny_gguf_f32.model, wrong_width)
    assert_error(err, "another model")
    assert "mmproj-7b.gguf" in str(err.value)


def test_load_reads_each_header_once_and_no_tensor_data(monkeypatch, tiny_gguf_q4):
    """The pre-load checks parse each file's header once, with the fast reader (not GGUFReader, which maps
    every tensor and took seconds on a real vocabulary), and the checks still ran: both files were seen."""
    import gguf

    from qvq_local.formats import gguf as gguf_format

    seen: list[tuple[str, bool]] = []
    real = gguf_format.read_gguf_header

    def counting(path, **kw):
        seen.append((Path(path).name, kw.get("tensors", True)))
        return real(path, **kw)

    def no_reader(*_a, **_k):
        raise AssertionError("GGUFReader must not be used on the load path")

    monkeypatch.setattr(gguf_format, "read_gguf_header", counting)
    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    model = llamacpp.load(tiny_gguf_q4.model, tiny_gguf_q4.mmproj)
    try:
        assert sorted(seen) == sorted(
            [(Path(tiny_gguf_q4.model).name, True), (Path(tiny_gguf_q4.mmproj).name, True)]
        )
        assert model.n_embd > 0 and model.patch_size == 14
    finally:
        model.close()


def test_missing_llama_cpp_is_backend_unavailable(monkeypatch, tiny_gguf_f32):
    import sys

    monkeypatch.setattr(llama_runtime, "_LIBS", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.setitem(sys.modules, "llama_cpp.mtmd_cpp", None)
    with pytest.raises(BackendUnavailable) as raised:
        llamacpp.load(tiny_gguf_f32.model, tiny_gguf_f32.mmproj)
    assert_error(raised, r"qvq-local\[llama\]")


def test_interrupt_inside_log_callback_is_kept_and_reraised():
    """Ctrl-C that lands in the ctypes log callback (during mtmd encoding) must not be swallowed."""
    from qvq_local.backends import llama_runtime

    sink = llama_runtime.LogSink()

    class Boom(bytes):
        def decode(self, *a, **k):  # the signal handler fires while Python runs inside the callback
            raise KeyboardInterrupt

    sink(2, Boom(b"encoding image slice..."), None)  # must not raise across the C boundary
    assert isinstance(sink.pending, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        sink.reraise()
    assert sink.pending is None
    sink.reraise()  # nothing pending: no-op
