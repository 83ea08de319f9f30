"""Why an export failed. Every error the CLI shows is one of these, as one line.

ExportError              base: the CLI prints str(exc) and exits non-zero
+-- UnknownModel         a model name not in the zoo
+-- BadOption            a --set, --checkpoint or --out argument that cannot work
+-- CheckpointError      missing, unreadable, or mismatched checkpoint
+-- ExportFailed         torch -> ONNX conversion or the ONNX checks failed
+-- ParityFailed         onnxruntime disagrees with torch beyond the tolerance
+-- OutputError          the output directory cannot be written
"""

from __future__ import annotations


class ExportError(Exception):
    """Base of every export failure."""


class UnknownModel(ExportError):
    pass


class BadOption(ExportError):
    pass


class CheckpointError(ExportError):
    pass


class ExportFailed(ExportError):
    pass


class ParityFailed(ExportError):
    pass


class OutputError(ExportError):
    pass
