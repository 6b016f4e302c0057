"""Split a GGUF file the way llama.cpp's ``gguf-split`` does, for tests of split downloads.

gguf's own ``GGUFWriter`` writes the parts (``<stem>-00001-of-0000N.gguf``, ``split.no`` / ``split.count``
/ ``split.tensors.count`` in each, the metadata in the first), so llama.cpp loads them with its own split
loading; the key/values and tensors are copied from the source as gguf's ``gguf_new_metadata`` script does.
"""

from __future__ import annotations

from pathlib import Path


def split_gguf(src: Path, out_dir: Path, stem: str, parts: int) -> list[Path]:
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    per_part = -(-len(reader.tensors) // parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out_dir / f"{stem}.gguf", arch, split_max_tensors=per_part)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    found = sorted(out_dir.glob(f"{stem}-*-of-*.gguf"))
    assert len(found) == parts, found
    return found
