"""Find out which format a SOURCE path is, from its content, and dispatch to its loader."""

from __future__ import annotations

from pathlib import Path

from gptedge.exporter.checkpoints import LoadedCheckpoint
from gptedge.exporter.config import ExportConfig
from gptedge.runtime.errors import InputError

ZIP_MAGIC = b"PK\x03\x04"
GGUF_MAGIC = b"GGUF"
LLAMA2C_V1_MAGIC = b"24ka"  # uint32 0x616b3432 ("ak42") as llama2.c's export.py writes it (little-endian)


def detect_format(source: Path) -> str:
    """``"hf"``, ``"nanogpt"``, ``"gguf"`` or ``"llama2c"`` for a path, judged by its content."""
    if not source.exists():
        raise InputError(f"{source}: does not exist; give an HF folder, a nanoGPT ckpt.pt, a llama2.c .bin or a .gguf file")
    if source.is_dir():
        if (source / "config.json").is_file():
            return "hf"
        if (source / "ckpt.pt").is_file():
            return "nanogpt"
        raise InputError(f"{source}: folder has neither config.json (HuggingFace) nor ckpt.pt (nanoGPT)")
    with open(source, "rb") as handle:
        head = handle.read(4)
    if head == GGUF_MAGIC:
        return "gguf"
    if source.suffix == ".gguf":
        raise InputError(f"{source}: named .gguf but does not start with the GGUF magic bytes; the file is corrupt")
    if head == ZIP_MAGIC or source.suffix in (".pt", ".pth"):
        return "nanogpt"
    if source.suffix == ".bin" or head == LLAMA2C_V1_MAGIC:
        return "llama2c"
    raise InputError(f"{source}: unknown checkpoint format; expected a torch zip (nanoGPT ckpt.pt), "
                     "a llama2.c .bin, a GGUF file, or an HF folder with config.json")


def load_checkpoint(source: Path, config: ExportConfig) -> LoadedCheckpoint:
    """Read ``source`` in whatever supported format it is."""
    kind = detect_format(Path(source))
    if kind == "hf":
        from gptedge.exporter.checkpoints.hf import load_hf
        return load_hf(Path(source), config)
    if kind == "nanogpt":
        from gptedge.exporter.checkpoints.nanogpt import load_nanogpt
        path = Path(source) / "ckpt.pt" if Path(source).is_dir() else Path(source)
        return load_nanogpt(path, config)
    if kind == "gguf":
        from gptedge.exporter.checkpoints.gguf import load_gguf
        return load_gguf(Path(source), config)
    from gptedge.exporter.checkpoints.llama2c import load_llama2c
    return load_llama2c(Path(source), config)
