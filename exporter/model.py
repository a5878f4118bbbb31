"""The one export-friendly decoder: GPT-2 / nanoGPT / Llama-family in a single readable module.

Shapes: B batch, S new tokens this call, P past tokens, T = P + S, C hidden size, H query heads,
K kv heads, D head dim, V vocab. Parameter names are checkpoint-neutral; loaders map onto them:

    embed.weight [V, C]                pos_embed.weight [max_context, C]  (learned positions)
    layers.{i}.attn_norm.{weight,bias} layers.{i}.attn.qkv.{weight,bias}  [(H+2K)*D, C]
    layers.{i}.attn.out.{weight,bias}  [C, H*D]
    layers.{i}.mlp_norm.{weight,bias}  layers.{i}.mlp.up.{weight,bias}  [I, C]   (gelu)
                                       layers.{i}.mlp.gate_up.weight    [2I, C]  (swiglu: gate, then up)
    layers.{i}.mlp.down.{weight,bias}  [C, I]
    norm.{weight,bias}                 lm_head.weight [V, C]  (tied: the same tensor as embed)

RoPE uses HF's half-split layout; loaders of interleaved checkpoints (llama2.c) permute q/k rows.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from gptedge.runtime.bundle import Architecture

# Fits in fp16, so the graph survives FP16 conversion; in fp32 softmax it acts as -inf.
MASK_VALUE = -65504.0


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.eps) * self.weight


def make_norm(arch: Architecture) -> nn.Module:
    if arch.norm == "rmsnorm":
        return RMSNorm(arch.hidden_size, arch.norm_eps)
    return nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps, bias=arch.norm_bias)


def rope_inv_freq(arch: Architecture) -> torch.Tensor:
    """Inverse frequencies [D/2], with HF's ``linear`` and ``llama3`` scaling applied."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = arch.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_context / low, old_context / high
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        qkv_out = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.qkv = nn.Linear(arch.hidden_size, qkv_out, bias=arch.qkv_bias)
        self.out = nn.Linear(self.n_head * self.head_dim, arch.hidden_size, bias=arch.attn_out_bias)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        B, S, _ = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        q, k, v = self.qkv(x).split([H * D, K * D, K * D], dim=-1)
        q = q.view(B, S, H, D).transpose(1, 2)  # B, H, S, D
        k = k.view(B, S, K, D).transpose(1, 2)  # B, K, S, D
        v = v.view(B, S, K, D).transpose(1, 2)
        if cos is not None:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        k = torch.cat([past_k, k], dim=2)  # B, K, T, D
        v = torch.cat([past_v, v], dim=2)
        present_k, present_v = k, v
        if H != K:  # grouped-query attention: each kv head serves H/K query heads
            q = q.reshape(B, K, H // K * S, D)
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(D))  # B, K, H/K*S, T
        if H != K:
            scores = scores.view(B, H, S, -1)
        probs = F.softmax(scores + bias, dim=-1)  # B, H, S, T
        if H != K:
            probs = probs.reshape(B, K, H // K * S, -1)
        y = (probs @ v).reshape(B, H, S, D)
        y = y.transpose(1, 2).reshape(B, S, H * D)
        return self.out(y), present_k, present_v


class MLP(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.activation = arch.activation
        width = arch.intermediate_size
        if arch.activation == "swiglu":
            self.gate_up = nn.Linear(arch.hidden_size, 2 * width, bias=arch.mlp_bias)
        else:
            self.up = nn.Linear(arch.hidden_size, width, bias=arch.mlp_bias)
        self.down = nn.Linear(width, arch.hidden_size, bias=arch.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        return self.down(F.gelu(self.up(x), approximate=approximate))


class Block(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.attn_norm = make_norm(arch)
        self.attn = Attention(arch)
        self.mlp_norm = make_norm(arch)
        self.mlp = MLP(arch)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        attn_out, present_k, present_v = self.attn(self.attn_norm(x), cos, sin, bias, past_k, past_v)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return x, present_k, present_v


class Decoder(nn.Module):
    """Decoder-only transformer with an explicit KV cache.

    ``transposed_tied_table`` (export only) stores a tied embedding once, as the LM head's [C, V].
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.transposed_tied_table = False  # set while exporting; see forward()
        self.embed = nn.Embedding(arch.vocab_size, arch.hidden_size)
        if arch.position == "learned":
            self.pos_embed = nn.Embedding(arch.max_context, arch.hidden_size)
        else:
            self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)
        self.layers = nn.ModuleList(Block(arch) for _ in range(arch.num_layers))
        self.norm = make_norm(arch)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        """input_ids, position_ids [B, S]; attention_mask [B, T] (1 keeps a token);
        past_key_values: one (key, value) pair per layer, each [B, K, P, D].
        Returns logits [B, S, V] (or [B, 1, V]) and the presents, each [B, K, T, D]."""
        table_t = None
        if self.arch.tie_word_embeddings and self.transposed_tied_table:
            # One [C, V] table serves the lookup and the LM head, so the exporter folds a single
            # transposed constant instead of storing the tied matrix twice.
            table_t = self.embed.weight.t()  # C, V
            rows = torch.index_select(table_t, 1, input_ids.reshape(-1))  # C, B*S
            x = rows.t().reshape(*input_ids.shape, -1)  # B, S, C
        else:
            x = self.embed(input_ids)  # B, S, C
        cos = sin = None
        if self.arch.position == "learned":
            x = x + self.pos_embed(position_ids)
        else:
            angles = position_ids.unsqueeze(-1).float() * self.inv_freq  # B, S, D/2
            angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # B, 1, S, D
            cos, sin = angles.cos(), angles.sin()
        bias = attention_bias(attention_mask, input_ids.shape[1])  # B, 1, S, T
        presents = []
        for layer, (past_k, past_v) in zip(self.layers, past_key_values):
            x, present_k, present_v = layer(x, cos, sin, bias, past_k, past_v)
            presents.append((present_k, present_v))
        x = self.norm(x)
        logits = x @ table_t if table_t is not None else self.lm_head(x)  # B, S, V
        return logits, presents


def attention_bias(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Additive bias [B, 1, S, T]: 0 where query s may attend key t, MASK_VALUE elsewhere.

    Query s sits at cache index T - S + s; it sees keys at or before that index whose mask is 1.
    """
    total = attention_mask.shape[1]
    key_index = torch.arange(total, device=attention_mask.device)
    query_index = torch.arange(seq_len, device=attention_mask.device) + (total - seq_len)
    causal = key_index.unsqueeze(0) <= query_index.unsqueeze(1)  # S, T
    allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # B, S, T
    zero = torch.zeros((), dtype=torch.float32)
    masked = torch.full((), MASK_VALUE, dtype=torch.float32)
    return torch.where(allowed, zero, masked).unsqueeze(1)


def empty_past(arch: Architecture, batch: int, dtype: torch.dtype = torch.float32):
    shape = (batch, arch.num_kv_heads, 0, arch.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
            for _ in range(arch.num_layers)]
