"""The one bundle writer: file roles and names, the file table, the ORT variant and the manifest.

``gptedge export`` and ``gptedge quantize`` both finish a bundle here::

    with BundleWriter.create(out_dir, overwrite=False) as writer:
        ...save graphs into writer.folder...
        writer.add_standard("model"); writer.add_standard("weights")
        writer.manifest = Manifest(architecture, ...)   # without files: the writer owns the table
        writer.attach_ort_variant()
    # here manifest.json was validated and written once, and the folder renamed into place

Everything is written into a temporary sibling folder that replaces ``out_dir`` only when the block
ends without an exception (:func:`~gptedge.runtime.bundle.atomic_output_dir`), so an error or an
interrupt leaves no half-written bundle. ``manifest.json`` is written exactly once, by
:meth:`BundleWriter.finish`, after it was checked against ``manifest.schema.json``; checks that
need the bundle before that (quantize's quality gate) open :meth:`BundleWriter.bundle`, an
in-memory view of the folder and the manifest so far.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from gptedge.runtime import contract
from gptedge.runtime.bundle import (
    MANIFEST_NAME,
    MODEL_NAME,
    SCHEMA_PATH,
    Bundle,
    Manifest,
    atomic_output_dir,
    check_relative_path,
    checked_bundle,
    write_manifest,
)
from gptedge.runtime.errors import BundleError
from gptedge.runtime.onnx_io import EXTERNAL_DATA_NAME

if TYPE_CHECKING:
    from gptedge.runtime.ort.variant import VariantResult

LAST_MODEL_NAME = "model_last.onnx"
ORT_ROLE = contract.ORT_VARIANT_ROLE
GRAPH_ROLES = ("model", "model_last")  # the portable graphs, in the order they are saved
SIZE_ROLES = ("model", "model_last", "weights", ORT_ROLE)  # what a bundle's size counts
STANDARD_FILES: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "model": MappingProxyType({"path": MODEL_NAME, "portable": True,
                               "purpose": "full-logits graph of the contract (parity, scoring, TensorRT)"}),
    "weights": MappingProxyType({"path": EXTERNAL_DATA_NAME, "portable": True,
                                 "purpose": "external weight data shared by the graphs"}),
    "model_last": MappingProxyType({"path": LAST_MODEL_NAME, "portable": True,
                                    "purpose": "LM head on the last position only (generation)"}),
})


def tokenizer_role(name: str) -> str:
    """The file-table role of tokenizer file ``name``."""
    return f"tokenizer:{name}"


def source_role(name: str) -> str:
    """The file-table role of file ``name`` copied from the source checkpoint."""
    return f"source:{name}"


class BundleWriter:
    """Builds one bundle in ``folder`` (normally the temporary folder of :meth:`create`).

    ``manifest``: the manifest to write, set by the caller with an empty ``files``; the writer's
    file table (:attr:`files`) becomes its ``files`` when the bundle is viewed or finished.
    ``manifest_writes`` counts writes of ``manifest.json`` (one per finished bundle).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.manifest: Manifest | None = None
        self.manifest_writes = 0
        self._files: dict[str, dict[str, Any]] = {}
        self._finished = False

    @classmethod
    @contextmanager
    def create(cls, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Iterator[BundleWriter]:
        """A writer on a temporary sibling of ``out_dir``; when the block succeeds the manifest is
        written (:meth:`finish`, unless the block did) and the folder replaces ``out_dir``."""
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            writer = cls(tmp)
            yield writer
            if not writer._finished:
                writer.finish()

    @property
    def files(self) -> Mapping[str, Mapping[str, Any]]:
        """The file table so far (role -> entry), read only."""
        return MappingProxyType(self._files)

    def path(self, role: str) -> Path:
        """Where the file of ``role`` lives (its table entry, else its standard name)."""
        entry = self._files.get(role) or STANDARD_FILES.get(role)
        if entry is None:
            raise KeyError(f"no file for role {role!r} in this bundle")
        return self.folder / entry["path"]

    def add_standard(self, role: str) -> Path:
        """Record the graph/weights file of a standard role (``model``, ``model_last``, ``weights``)."""
        return self.add_entry(role, STANDARD_FILES[role])

    def add(self, role: str, name: str, purpose: str, portable: bool = True, data: bytes | None = None) -> Path:
        """Record file ``name`` under ``role``, writing ``data`` into the folder when given."""
        path = self.add_entry(role, {"path": name, "portable": portable, "purpose": purpose})
        if data is not None:
            path.write_bytes(data)
        return path

    def add_entry(self, role: str, entry: Mapping[str, Any]) -> Path:
        """Record a whole table entry (a copy) under ``role``; the file itself is the caller's."""
        check_relative_path(str(entry.get("path", "")), f"{self.folder}: files.{role}")
        if entry["path"] == MANIFEST_NAME:
            raise BundleError(f"files.{role}: {MANIFEST_NAME} is the manifest, not a bundle file; rename it")
        self._files[role] = dict(entry)
        return self.folder / entry["path"]

    def attach_ort_variant(self, isolated: bool = False) -> VariantResult | None:
        """Build and check ``model_ort.onnx`` from the last-position graph and record it (see
        :func:`gptedge.runtime.ort.variant.attach`); ``isolated`` runs it in a child interpreter.
        Returns the variant's result, or None when this bundle gets none."""
        from gptedge.runtime.ort import variant

        manifest = self._require_manifest()
        self._files.pop(ORT_ROLE, None)
        build = variant.attach_isolated if isolated else variant.attach
        result = build(self.folder, self.files, manifest.architecture, manifest.precision)
        if result is not None:
            for role, entry in result.entries.items():
                self.add_entry(role, entry)
        return result

    def bundle(self) -> Bundle:
        """The bundle as it stands, with the manifest in memory (``manifest.json`` is not written
        until :meth:`finish`): for checks that run before the bundle is finished."""
        return checked_bundle(self.folder, self._with_files())

    def finish(self) -> Manifest:
        """Check the manifest against ``manifest.schema.json`` and write it, once; returns it."""
        if self._finished:
            raise BundleError(f"{self.folder}: the bundle is already finished; a manifest is written once")
        manifest = self._with_files()
        data = manifest.to_dict()
        where = str(self.folder / MANIFEST_NAME)
        _check_against_schema(data, where)
        Manifest.from_dict(data, where)  # the reader's own rules too: what is written can be read back
        checked_bundle(self.folder, manifest)
        write_manifest(self.folder, manifest)
        self.manifest_writes += 1
        self._finished = True
        return manifest

    def _with_files(self) -> Manifest:
        manifest = self._require_manifest()
        return dataclasses.replace(manifest, files={role: dict(e) for role, e in self._files.items()})

    def _require_manifest(self) -> Manifest:
        if self.manifest is None:
            raise BundleError(f"{self.folder}: no manifest set on the bundle writer (writer.manifest = ...)")
        if self.manifest.files:
            raise BundleError(f"{self.folder}: the manifest given to the writer lists files; record them "
                              "with writer.add*/add_standard instead (the writer owns the file table)")
        return self.manifest


def _check_against_schema(data: dict[str, Any], where: str) -> None:
    """Validate with the jsonschema package where it is installed (export and dev installs have it);
    a lean runtime install keeps the reader's structural checks, which run in every case."""
    try:
        import jsonschema
    except ImportError:
        return
    errors = sorted(jsonschema.Draft202012Validator(manifest_schema()).iter_errors(data), key=str)
    if errors:
        problems = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or 'manifest'}: {e.message}"
                             for e in errors[:8])
        raise BundleError(f"{where}: the manifest does not match manifest.schema.json ({problems}); "
                          "this is a gptedge bug, please report it")


@functools.lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The published schema, parsed once."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
