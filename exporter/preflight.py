"""What an export can refuse before torch is imported.

Importing torch and loading weights take seconds to minutes; a wrong output path, a missing source
or an HF ``config.json`` asking for a model the decoder does not implement (an unsupported
``model_type``, sliding windows, unknown RoPE scaling ...) is known from a few small files. ``gptedge
export`` runs :func:`preflight` before it imports the export pipeline, and
:func:`gptedge.exporter.export` runs it first too; the errors are the ones the loaders raise.
"""

from __future__ import annotations

import os
from pathlib import Path

from gptedge.exporter.checkpoints.detect import detect_format
from gptedge.exporter.checkpoints.hf_config import architecture_from_config, read_config
from gptedge.exporter.config import ExportConfig
from gptedge.runtime.bundle import check_output_dir


def preflight(source: str | os.PathLike[str], config: ExportConfig, out_dir: str | os.PathLike[str]) -> None:
    """Raise what exporting ``source`` to ``out_dir`` would raise before any weights are read.

    :class:`~gptedge.runtime.errors.OutputExistsError` for the output folder,
    :class:`~gptedge.runtime.errors.InputError` for a missing or unrecognised source and
    :class:`~gptedge.runtime.errors.UnsupportedModelError` for an HF config the decoder does not
    implement. Imports no torch.
    """
    check_output_dir(out_dir, config.overwrite)
    source = Path(source)
    if detect_format(source) == "hf":
        architecture_from_config(read_config(source), source / "config.json", config.max_context)
