"""File formats qvq-local reads and writes, one module per format with its constants beside it (as
gguf-py keeps its constants beside its reader).  Leaves of the package: nothing here imports from the
rest of qvq-local."""
