"""File formats, one reader per format with its constants beside it (as gguf-py keeps its ``Keys`` beside
its reader).  The bottom floor of the package: these modules import only :mod:`qvq_local.errors`,
:mod:`qvq_local.atomic` and the standard library (gguf-py and numpy inside the functions that need them),
so the converter, the resolver, the integrity checks, the fit estimate and the backends all read a file
through the same code.

* :mod:`~qvq_local.formats.gguf`: the GGUF header reader (key/values and tensor records, never tensor
  data), metadata lookup, file-type names and the ``general.sampling.*`` key table;
* :mod:`~qvq_local.formats.safetensors`: the torch-free safetensors reader and streaming writer;
* :mod:`~qvq_local.formats.manifest`: ``qvq-manifest.json`` and the one spelling of a quantization;
* :mod:`~qvq_local.formats.names`: what a model file's name says (a GGUF projector, a part of a split
  GGUF, a pickle checkpoint).
"""
