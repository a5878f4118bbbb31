"""checkpoint → bundle: load, build the decoder, trace to ONNX, write atomically, check parity."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from gptedge.exporter.chat_template import TEMPLATE_NAME, template_tokenizer_info
from gptedge.exporter.checkpoints import LoadedCheckpoint
from gptedge.exporter.checkpoints.detect import load_checkpoint
from gptedge.exporter.config import ExportConfig
from gptedge.exporter.model import Decoder
from gptedge.exporter.onnx_export import last_position_graph, trace_to_onnx
from gptedge.exporter.preflight import preflight
from gptedge.exporter.stages import stage
from gptedge.quantize.graph_io import release_freed_memory
from gptedge.runtime import contract
from gptedge.runtime.bundle import MODEL_NAME, Bundle, Manifest, check_output_dir, load_bundle
from gptedge.runtime.bundle_writer import LAST_MODEL_NAME, BundleWriter, source_role, tokenizer_role
from gptedge.runtime.errors import InputError
from gptedge.runtime.onnx_io import SharedWeightsWriter

log = logging.getLogger(__name__)


def export(source: str | os.PathLike[str], config: ExportConfig, out_dir: str | os.PathLike[str]) -> Bundle:
    """Export the checkpoint at ``source`` to a bundle folder ``out_dir`` and return it.

    ``source`` is an HF folder, a nanoGPT ``ckpt.pt`` (or its folder), a llama2.c ``.bin`` or a GGUF file.
    The bundle is built in a temporary sibling folder and renamed at the end, so a failure or an
    interrupt leaves nothing behind. With ``config.validate`` the parity report is in the manifest
    and a mismatch raises :class:`~gptedge.runtime.errors.ParityError` (and writes no bundle).
    """
    preflight(source, config, out_dir)  # refuse before minutes of loading and tracing
    # no local reference: export_loaded frees the torch weights before its onnxruntime checks
    return export_loaded(_load(Path(source), config), config, out_dir)


def _load(source: Path, config: ExportConfig) -> LoadedCheckpoint:
    with stage("load checkpoint"):
        checkpoint = load_checkpoint(source, config)
        release_freed_memory()  # the loader's temporaries
        return checkpoint


def export_loaded(checkpoint: LoadedCheckpoint, config: ExportConfig,
                  out_dir: str | os.PathLike[str]) -> Bundle:
    """Export an already loaded checkpoint (see :func:`export`)."""
    check_output_dir(out_dir, config.overwrite)
    arch = checkpoint.arch
    if config.max_context is not None:
        arch = _with_context(arch, config.max_context)
    _check_tokenizer_fits(checkpoint, arch)
    decoder = build_decoder(arch, checkpoint.state_dict, checkpoint.source.get("path", "checkpoint"))
    pruned = None
    if config.prune_method:  # the exported (and parity-checked) model is the pruned, fine-tuned one
        from gptedge.exporter.training.finetune import prune_and_recover
        decoder, pruned = prune_and_recover(decoder, checkpoint.tokenizer, config)
        arch = decoder.arch
    with BundleWriter.create(out_dir, overwrite=config.overwrite) as writer:
        _write_graphs(decoder, config, writer)
        manifest = writer.manifest = _manifest(checkpoint, arch, config, writer)
        if pruned:
            manifest.history.append(pruned)
            manifest.precision["sparsity"] = {"method": config.prune_method, "fraction": config.sparsity}
        reference: Any = None  # the source's own model is built only after onnxruntime's check
        if config.validate:
            reference = checkpoint.reference if checkpoint.reference and not pruned else decoder
        del checkpoint, decoder  # the ONNX graph is on disk; free what parity does not need
        release_freed_memory()
        if reference is not None:
            from gptedge.exporter.validate import check_parity
            with stage("parity"):
                manifest.parity = check_parity(writer.folder, reference, arch, config.parity_noise_ratio,
                                               config.parity_noise_floor)
            del reference
            release_freed_memory()  # before the variant's child interpreter starts beside this one
        if config.ort_variant:  # in a fresh interpreter: torch.export keeps ~2x the weights alive here
            with stage("onnxruntime variant"):
                writer.attach_ort_variant(isolated=True)
    return load_bundle(out_dir)


def _with_context(arch, max_context: int):
    if arch.position == "learned" and max_context > arch.max_context:
        raise InputError(f"--max-context {max_context}: this model learned positions for only "
                         f"{arch.max_context} tokens; use at most {arch.max_context}")
    return dataclasses.replace(arch, max_context=max_context)


def _check_tokenizer_fits(checkpoint: LoadedCheckpoint, arch) -> None:
    tokenizer = checkpoint.tokenizer
    if tokenizer and tokenizer.info.vocab_size and tokenizer.info.vocab_size > arch.vocab_size:
        raise InputError(f"tokenizer has {tokenizer.info.vocab_size} tokens but the model only "
                         f"{arch.vocab_size}; pass the tokenizer that belongs to this checkpoint (--tokenizer)")


def build_decoder(arch, state_dict: dict[str, torch.Tensor], where: str) -> Decoder:
    """A :class:`Decoder` in eval mode holding ``state_dict`` (fp32); shape errors name the tensor."""
    with torch.device("meta"):  # no second copy of the weights: the state dict's tensors are assigned
        decoder = Decoder(arch)
    expected = decoder.state_dict()
    if arch.position == "learned" and "pos_embed.weight" in state_dict:
        state_dict = dict(state_dict)
        state_dict["pos_embed.weight"] = state_dict["pos_embed.weight"][: arch.max_context]
    missing = sorted(set(expected) - set(state_dict) - _tied(arch))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
            "shape mismatch " + ", ".join(wrong[:5]) if wrong else ""]))
        raise InputError(f"{where}: weights do not match the model config ({details}); "
                         "the checkpoint is corrupt or its config does not belong to it")
    weights = {k: v.to(torch.float32).contiguous() for k, v in state_dict.items()}
    if arch.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed.weight"]
    decoder.load_state_dict(weights, strict=True, assign=True)
    if arch.tie_word_embeddings:
        decoder.lm_head.weight = decoder.embed.weight
    if arch.position == "rope":  # non-persistent buffers: rebuild them off the meta device
        decoder.reset_rope()
    return decoder.eval()


def _tied(arch) -> set[str]:
    return {"lm_head.weight"} if arch.tie_word_embeddings else set()


def _write_graphs(decoder: Decoder, config: ExportConfig, bundle: BundleWriter) -> None:
    # One trace: the last-position graph is cut from the full one (a second trace took as long).
    with SharedWeightsWriter(bundle.folder) as writer:
        with stage(f"trace {MODEL_NAME}"):
            model = trace_to_onnx(decoder, config.opset, writer)
        with stage(f"save {MODEL_NAME}"):
            writer.save(model, bundle.add_standard("model").name)
        bundle.add_standard("weights")
        if config.last_logits_variant:
            with stage(f"save {LAST_MODEL_NAME}"):
                writer.save(last_position_graph(model), bundle.add_standard("model_last").name)
        del model
        release_freed_memory()


def _manifest(checkpoint: LoadedCheckpoint, arch, config: ExportConfig, bundle: BundleWriter) -> Manifest:
    """The manifest (without files) and the side files: tokenizer, source extras, chat template."""
    side = checkpoint.tokenizer.files if checkpoint.tokenizer else {}
    for name, data in side.items():
        bundle.add(tokenizer_role(name), name, "tokenizer", data=data)
    for name, data in checkpoint.extra_files.items():
        bundle.add(source_role(name), name, "copied from the source", data=data)
    manifest = Manifest(architecture=arch, source=dict(checkpoint.source),
                        io=contract.io_description(arch.num_layers, arch.num_kv_heads, arch.head_dim,
                                                   arch.vocab_size),
                        tools=tool_versions(), history=[{"step": "export", "opset": config.opset}])
    if checkpoint.tokenizer is not None:
        manifest.tokenizer = checkpoint.tokenizer.info
    template = checkpoint.chat_template
    if template:
        tok_cfg = json.loads(side["tokenizer_config.json"]) if "tokenizer_config.json" in side else {}
        manifest.tokenizer = template_tokenizer_info(manifest.tokenizer, template, side.get("tokenizer.json"),
                                                     tok_cfg if isinstance(tok_cfg, dict) else {})
        bundle.add(tokenizer_role(TEMPLATE_NAME), TEMPLATE_NAME, "Jinja chat template",
                   data=template.encode("utf-8"))
    return manifest


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from gptedge.runtime import __version__
    return {"gptedge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
