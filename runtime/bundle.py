"""The bundle: a folder holding ``model.onnx``, a versioned ``manifest.json`` and tokenizer files.

The manifest is the only contract between the exporter, the quantizer and the runtime. Its JSON
Schema is published as ``manifest.schema.json`` next to this module so apps in other languages can
read bundles too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gptedge.runtime.arch_checks import family_problems
from gptedge.runtime.errors import BundleError, OutputExistsError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope", "alibi")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "geglu_tanh", "relu", "relu2")


@dataclass(frozen=True)
class Architecture:
    """Everything that describes a decoder-only transformer, in checkpoint-neutral terms.

    Sizes are counts (not bytes). ``max_context`` is the longest sequence (prompt + generated
    tokens) the bundle supports. ``rope_scaling`` follows HF's dict (``{"rope_type": "llama3",
    "factor": ..., ...}`` or ``{"rope_type": "linear", "factor": ...}``) or is None.

    Family switches (defaults: GPT-2 / Llama behaviour): ``sliding_window`` W makes a query attend
    to its W most recent cache entries (itself included) in the layers ``sliding_layers`` (None: all),
    whose RoPE base is ``rope_local_theta`` when set (Gemma 3); ``nope_layers`` use no position
    encoding at all (SmolLM3); ``rotary_dim`` rotates only the first features of each head (None:
    all). ``parallel_residual`` adds attention and MLP outputs to the same input (``shared_norm``:
    one norm feeds both, Phi; ``two_norms``: GPT-NeoX); ``lm_head_bias`` gives the head a bias. ``qk_norm`` RMS-normalises q and k
    per head (``"head"``, Qwen3) or over all heads (``"all"``, OLMo 2). ``norm_offset`` is added to
    norm weights (Gemma's ``1 + w``); ``norm_placement`` ``"pre_post"`` also normalises each
    sub-block's output (Gemma 2/3), ``"post"`` only its output (OLMo 2). ``embed_scale`` multiplies
    the embeddings, ``residual_scale`` each sub-block's output (Granite); ``attn_scale`` replaces
    1/sqrt(head_dim); ``attn_softcap`` / ``logit_softcap`` apply ``c * tanh(x / c)`` to attention
    scores / logits; logits are divided by ``logit_divisor``.

    ``position="alibi"`` adds ALiBi's per-head ``slope * key position`` (positions counted from the
    attention mask, as transformers does) to the scores instead of rotating q/k; ``alibi_scaled``
    adds it before the ``attn_scale`` multiply (Falcon) rather than after (BLOOM). ``embed_norm``
    normalises the embeddings (BLOOM's ``word_embeddings_layernorm``). ``rope_interleaved`` rotates
    adjacent feature pairs (GPT-J, Cohere) instead of the two halves. ``qk_norm="per_head"`` is a
    norm of kind ``norm`` over each head's features with a weight per head (Cohere). ``norm_offset``
    applies to LayerNorm too (Nemotron's LayerNorm1P); ``relu2`` is ``relu(x)**2`` (Nemotron).
    ``norm_affine`` false: norms without weight or bias (OLMo); ``final_norm`` false: none before
    the head; ``embed_proj_dim`` E: embeddings and head are E wide, projected to/from the hidden size
    (OPT); ``qkv_clip`` clamps q, k, v to +-c (OLMo); ``norm_placement`` ``"post_residual"``
    normalises the residual sum after each sub-block (OPT-350m).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_context: int
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    position: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    activation: str = "gelu"
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    sliding_layers: list[int] | None = None
    rope_local_theta: float | None = None
    nope_layers: list[int] | None = None
    rotary_dim: int | None = None
    parallel_residual: str = "none"
    lm_head_bias: bool = False
    qk_norm: str = "none"
    norm_offset: float = 0.0
    norm_placement: str = "pre"
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    attn_scale: float | None = None
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    logit_divisor: float = 1.0
    alibi_scaled: bool = False
    embed_norm: bool = False
    rope_interleaved: bool = False
    norm_affine: bool = True
    final_norm: bool = True
    embed_proj_dim: int | None = None
    qkv_clip: float | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        if self.norm not in NORMS:
            problems.append(f"norm={self.norm!r} must be one of {NORMS}")
        if self.position not in POSITIONS:
            problems.append(f"position={self.position!r} must be one of {POSITIONS}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation={self.activation!r} must be one of {ACTIVATIONS}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                problems.append(f"{name}={value!r} must be a positive number")
        for name in ("norm_bias", "qkv_bias", "attn_out_bias", "mlp_bias", "tie_word_embeddings", "lm_head_bias"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be true or false")
        problems += family_problems(self)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            problems.append(f"rope_scaling={self.rope_scaling!r} must be an object or null")
        if not problems and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if problems:
            raise BundleError("invalid model architecture: " + "; ".join(problems))

    def window_of(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (tokens), or None when it attends to the whole cache."""
        if self.sliding_window is None or (self.sliding_layers is not None and layer not in self.sliding_layers):
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"manifest architecture has unknown keys {unknown}; upgrade gptedge")
        try:
            return cls(**data)
        except TypeError as exc:
            raise BundleError(f"manifest architecture is incomplete: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Bytes of KV cache one token occupies across all layers (keys and values)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class TokenizerInfo:
    """How to turn text into ids for this bundle.

    ``kind``: ``"hf"`` (a ``tokenizers`` ``tokenizer.json``), ``"char"`` (nanoGPT char-level,
    ``vocab.json`` with ``itos``), ``"llama2c"`` (``tokenizer.llama2c.json`` converted from
    llama2.c's ``tokenizer.bin``) or ``"none"``. ``eos_ids`` may hold several ids (Llama 3).
    ``chat_template`` names the bundle's Jinja chat template file (None: no template);
    ``bos_token``/``eos_token`` are the special token strings the template uses.
    """

    kind: str = "none"
    file: str | None = None
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None
    add_bos: bool = False
    vocab_size: int | None = None
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerInfo:
        data = dict(data)
        data["eos_ids"] = tuple(data.get("eos_ids") or ())
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["eos_ids"] = list(self.eos_ids)
        return out


@dataclass
class Manifest:
    """The parsed ``manifest.json``. ``files`` maps a role (``"model"``, ``"model_last"``, ...) to
    ``{"path": str, "purpose": str, "portable": bool}``; ``precision`` holds at least ``weights``
    and ``kv_cache_dtype`` (``"float32"`` or ``"float16"``) and ``cpu_only``."""

    architecture: Architecture
    tokenizer: TokenizerInfo = field(default_factory=TokenizerInfo)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    io: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, Any] = field(default_factory=lambda: {
        "weights": "float32", "kv_cache_dtype": "float32", "cpu_only": False})
    source: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "architecture": self.architecture.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "files": self.files,
            "io": self.io,
            "precision": self.precision,
            "source": self.source,
            "tools": self.tools,
            "parity": self.parity,
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        _validate_manifest_dict(data, where)
        try:
            return cls(
                architecture=Architecture.from_dict(data["architecture"]),
                tokenizer=TokenizerInfo.from_dict(data.get("tokenizer") or {}),
                files=dict(data.get("files") or {}),
                io=dict(data.get("io") or {}),
                precision=dict(data.get("precision") or {}),
                source=dict(data.get("source") or {}),
                tools=dict(data.get("tools") or {}),
                parity=data.get("parity"),
                history=list(data.get("history") or []),
                format_version=data["format_version"],
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{where}: malformed manifest ({exc}); re-export the bundle") from exc

    @property
    def kv_cache_dtype(self) -> str:
        return str(self.precision.get("kv_cache_dtype", "float32"))

    @property
    def cpu_only(self) -> bool:
        return bool(self.precision.get("cpu_only", False))


def _validate_manifest_dict(data: Any, where: str) -> None:
    """Structural checks that need no jsonschema package (the runtime stays lean)."""
    if not isinstance(data, dict):
        raise BundleError(f"{where}: the manifest must be a JSON object; re-export the bundle")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{where}: missing integer 'format_version'; re-export the bundle")
    if version > FORMAT_VERSION:
        raise BundleError(f"{where}: format_version {version} is newer than this gptedge reads "
                          f"({FORMAT_VERSION}); upgrade gptedge (pip install -U gptedge)")
    if version < 1:
        raise BundleError(f"{where}: format_version {version} is invalid; re-export the bundle")
    if not isinstance(data.get("architecture"), dict):
        raise BundleError(f"{where}: missing 'architecture' object; re-export the bundle")
    for key in ("tokenizer", "files", "io", "precision", "source", "tools"):
        if key in data and data[key] is not None and not isinstance(data[key], dict):
            raise BundleError(f"{where}: '{key}' must be a JSON object; re-export the bundle")
    for role, entry in (data.get("files") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise BundleError(f"{where}: files.{role} needs a 'path' string; re-export the bundle")
        check_relative_path(entry["path"], where)


def check_relative_path(path: str, where: str) -> None:
    """Refuse paths that could escape the bundle folder (absolute, ``..``, drive letters)."""
    parts = Path(path).parts
    if not path or Path(path).is_absolute() or ".." in parts or ":" in path or "\\" in path:
        raise BundleError(f"{where}: path {path!r} escapes the bundle folder; only plain relative "
                          "file names inside the bundle are allowed")


@dataclass
class Bundle:
    """A bundle folder on disk and its manifest."""

    path: Path
    manifest: Manifest

    def file(self, role: str) -> Path | None:
        """Absolute path of the file listed under ``role`` in the manifest, or None."""
        entry = self.manifest.files.get(role)
        return None if entry is None else self.path / entry["path"]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_NAME


def read_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``manifest.json`` of a bundle folder."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path}: no manifest.json; is {bundle_dir} a gptedge bundle? "
                          "Create one with `gptedge export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: malformed JSON ({exc}); re-export the bundle") from exc
    return Manifest.from_dict(data, str(path))


def load_bundle(bundle_dir: str | os.PathLike[str]) -> Bundle:
    """Open a bundle folder: validate the manifest and check every listed file exists."""
    root = Path(bundle_dir)
    if not root.exists():
        raise BundleError(f"{root}: bundle folder does not exist")
    if not root.is_dir():
        raise BundleError(f"{root}: is a file, expected a bundle folder made by `gptedge export`")
    return checked_bundle(root, read_manifest(root))


def checked_bundle(root: Path, manifest: Manifest) -> Bundle:
    """``root`` with ``manifest`` as a :class:`Bundle`, once every listed file is there and every
    graph's external data stays inside ``root`` (the checks :func:`load_bundle` runs)."""
    for role, entry in manifest.files.items():
        if not (root / entry["path"]).is_file():
            raise BundleError(f"{root / entry['path']}: file for '{role}' listed in manifest.json is "
                              "missing; copy the whole bundle folder again")
    if not (root / MODEL_NAME).is_file():
        raise BundleError(f"{root / MODEL_NAME}: missing; copy the whole bundle folder again")
    from gptedge.runtime.onnx_io import check_external_data  # lazy: onnx costs ~0.25 s to import

    graphs = {MODEL_NAME} | {e["path"] for e in manifest.files.values() if e["path"].endswith(".onnx")}
    for name in sorted(graphs):  # before any runtime opens a graph: its data must stay in the bundle
        check_external_data(root / name, root)
    return Bundle(root, manifest)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` into ``bundle_dir`` (a temporary name first, then a rename, so a
    reader never sees half a manifest). Bundles are finished by
    :class:`~gptedge.runtime.bundle_writer.BundleWriter`, which checks the manifest first."""
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False)
    path = Path(bundle_dir) / MANIFEST_NAME
    partial = path.with_name(MANIFEST_NAME + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)


def check_output_dir(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Refuse an output path that exists (unless ``overwrite``) or is not a folder, before any work
    is done; returns the absolute path."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder; choose another output path")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputExistsError(f"{out}: cannot create the output folder ({blocker} is a file, not a folder); "
                                "choose a writable path")
    return out


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out_dir`` atomically.

    With ``overwrite`` the old folder is moved aside first and deleted only after the new one is in
    place, so that path always holds a complete bundle. On any exception (KeyboardInterrupt too)
    the temporary folder is removed and ``out_dir`` is untouched.
    """
    out = check_output_dir(out_dir, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else exc.strerror
        raise OutputExistsError(f"{out}: cannot create the output folder ({why}); "
                                "choose a writable path") from exc
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
