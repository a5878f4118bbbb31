"""Independent reference implementations, used only by tests to prove exported bundles right.

They are written from the source projects' semantics and share no code with gptedge:

- :func:`nanogpt_forward`: karpathy/nanoGPT model.py's GPT forward in plain torch, on a nanoGPT
  state dict (its own names): learned positions, pre-LayerNorm (eps 1e-5, optional bias),
  causal self-attention from the fused c_attn, exact-erf GELU MLP, LM head tied to wte.
- :class:`Llama2cReference`: a numpy port of karpathy/llama2.c run.c's ``forward(token, pos)``
  with its KV cache: RMSNorm (eps 1e-5), interleaved (adjacent-pair) RoPE with
  ``freq = 1 / 10000^(i/head_size)``, grouped-query attention (``h / kv_mul``), SwiGLU
  ``w2(silu(w1 x) * w3 x)``, float32 throughout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F


def nanogpt_forward(state: dict[str, torch.Tensor], n_layer: int, n_head: int, idx: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of nanoGPT's GPT for token ids ``idx`` [B, T] (positions 0..T-1)."""
    B, T = idx.shape
    wte = state["transformer.wte.weight"]
    C = wte.shape[1]
    hs = C // n_head

    def layer_norm(x, prefix):
        return F.layer_norm(x, (C,), state[f"{prefix}.weight"], state.get(f"{prefix}.bias"), 1e-5)

    def linear(x, prefix):
        return F.linear(x, state[f"{prefix}.weight"], state.get(f"{prefix}.bias"))

    x = wte[idx] + state["transformer.wpe.weight"][torch.arange(T)]  # B, T, C
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        q, k, v = linear(layer_norm(x, f"{p}.ln_1"), f"{p}.attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))  # B, nh, T, hs
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = F.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + linear(y, f"{p}.attn.c_proj")
        h = F.gelu(linear(layer_norm(x, f"{p}.ln_2"), f"{p}.mlp.c_fc"))  # exact erf GELU (nn.GELU())
        x = x + linear(h, f"{p}.mlp.c_proj")
    x = layer_norm(x, "transformer.ln_f")
    head = state.get("lm_head.weight", wte)
    return x @ head.T


class Llama2cReference:
    """run.c's transformer on llama2.c-named float32 arrays: ``token_embedding`` [V, dim],
    ``rms_att``/``rms_ffn`` [L, dim], ``wq`` [L, dim, dim], ``wk``/``wv`` [L, kv_dim, dim],
    ``wo`` [L, dim, dim], ``w1``/``w3`` [L, hidden, dim], ``w2`` [L, dim, hidden], ``rms_final``
    [dim], and ``wcls`` [V, dim] (absent = shared with the embedding)."""

    def __init__(self, weights: dict[str, np.ndarray], n_heads: int, n_kv_heads: int, seq_len: int):
        self.w = weights
        self.n_layers, _, self.dim = weights["wq"].shape
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_size = self.dim // n_heads
        kv_dim = n_kv_heads * self.head_size
        self.key_cache = np.zeros((self.n_layers, seq_len, kv_dim), np.float32)
        self.value_cache = np.zeros((self.n_layers, seq_len, kv_dim), np.float32)

    @staticmethod
    def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        ss = np.float32(np.dot(x, x) / np.float32(x.size) + np.float32(1e-5))
        return (weight * (x * np.float32(1.0 / np.sqrt(ss)))).astype(np.float32)

    def rope(self, vec: np.ndarray, pos: int) -> None:
        """Rotate adjacent pairs (vec[i], vec[i+1]) in place, as run.c does for q and k."""
        for i in range(0, vec.size, 2):
            head_dim = i % self.head_size
            freq = np.float32(1.0) / np.power(np.float32(10000.0), np.float32(head_dim) / np.float32(self.head_size))
            val = np.float32(pos) * freq
            fcr, fci = np.cos(val), np.sin(val)
            v0, v1 = vec[i], vec[i + 1]
            vec[i] = v0 * fcr - v1 * fci
            vec[i + 1] = v0 * fci + v1 * fcr

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits [V] for ``token`` at position ``pos`` (call with pos = 0, 1, 2, ... in order)."""
        w, hs = self.w, self.head_size
        kv_mul = self.n_heads // self.n_kv_heads
        x = w["token_embedding"][token].astype(np.float32).copy()
        for layer in range(self.n_layers):
            xb = self.rmsnorm(x, w["rms_att"][layer])
            q = w["wq"][layer] @ xb
            k = w["wk"][layer] @ xb
            v = w["wv"][layer] @ xb
            self.rope(q, pos)
            self.rope(k, pos)
            self.key_cache[layer, pos] = k
            self.value_cache[layer, pos] = v
            out = np.zeros(self.dim, np.float32)
            for h in range(self.n_heads):
                qh = q[h * hs:(h + 1) * hs]
                kv = (h // kv_mul) * hs
                keys = self.key_cache[layer, :pos + 1, kv:kv + hs]  # pos+1, hs
                att = keys @ qh / np.float32(np.sqrt(hs))
                att = np.exp(att - att.max())
                att = att / att.sum()
                out[h * hs:(h + 1) * hs] = att @ self.value_cache[layer, :pos + 1, kv:kv + hs]
            x = x + w["wo"][layer] @ out
            xb = self.rmsnorm(x, w["rms_ffn"][layer])
            hb = w["w1"][layer] @ xb
            hb2 = w["w3"][layer] @ xb
            hb = hb * (np.float32(1.0) / (np.float32(1.0) + np.exp(-hb))) * hb2  # silu(w1 x) * w3 x
            x = x + w["w2"][layer] @ hb
        x = self.rmsnorm(x, w["rms_final"])
        return w.get("wcls", w["token_embedding"]) @ x

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits [T, V] of a prompt, fed one token at a time through the KV cache."""
        return np.stack([self.forward(token, pos) for pos, token in enumerate(tokens)])
