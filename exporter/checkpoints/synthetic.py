"""Random-weight checkpoints built from an :class:`Architecture` (tests and benchmarks; no hub)."""

from __future__ import annotations

import torch

from gptedge.exporter.checkpoints import LoadedCheckpoint
from gptedge.exporter.model import Decoder
from gptedge.runtime.bundle import Architecture


def random_state_dict(arch: Architecture, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """GPT-2-style init (normal, std 0.02); norm weights and biases are randomised too, so no two
    tensors are identical and parity checks exercise every parameter."""
    generator = torch.Generator().manual_seed(seed)
    decoder = Decoder(arch)
    state = {}
    for name, tensor in decoder.state_dict().items():
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        if "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            value = std * torch.randn(tensor.shape, generator=generator)
        state[name] = value
    return state


def random_checkpoint(arch: Architecture, seed: int = 0) -> LoadedCheckpoint:
    """A :class:`LoadedCheckpoint` with random weights and no tokenizer."""
    return LoadedCheckpoint(arch=arch, state_dict=random_state_dict(arch, seed),
                            source={"format": "random", "seed": seed, "path": f"random(seed={seed})"})
