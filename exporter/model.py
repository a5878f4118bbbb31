"""The one export-friendly decoder: GPT-2 / nanoGPT / Llama-family in a single readable module.

Shapes: B batch, S new tokens this call, P past tokens, T = P + S, C hidden size, H query heads,
K kv heads, D head dim, V vocab. Parameter names are checkpoint-neutral; loaders map onto them:

    embed.weight [V, C]                pos_embed.weight [max_context, C]  (learned positions)
    embed_norm.{weight,bias}           (embed_norm: BLOOM)
    layers.{i}.attn_norm.{weight,bias} layers.{i}.attn.qkv.{weight,bias}  [(H+2K)*D, C]
    layers.{i}.attn.out.{weight,bias}  [C, H*D]
    layers.{i}.mlp_norm.{weight,bias}  layers.{i}.mlp.up.{weight,bias}  [I, C]   (gelu, relu2)
                                       layers.{i}.mlp.gate_up.weight    [2I, C]  (swiglu: gate, then up)
    layers.{i}.mlp.down.{weight,bias}  [C, I]
    norm.{weight,bias}                 lm_head.{weight,bias} [V, C]  (tied: the same tensor as embed)
    layers.{i}.attn.{q,k}_norm.weight  [D] or [H*D] / [K*D] or [H, D] / [K, D]  (qk_norm head / all / per_head)
    layers.{i}.{attn,mlp}_post_norm.weight  (norm_placement pre_post / post)
    project_in.weight [C, E]  project_out.weight [E, C]  (embed_proj_dim E: embed [V, E], lm_head [V, E])

RoPE uses HF's half-split layout unless ``rope_interleaved`` (GPT-J, Cohere, Helium: the KV cache
holds keys as transformers does, so it is a graph switch); llama2.c's loader permutes q/k rows
instead. ALiBi (``position="alibi"``) adds its per-head bias to the attention mask's bias.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from gptedge.exporter.rope import attention_factor, rope_inv_freq, rope_kind
from gptedge.runtime.bundle import Architecture

# Fits in fp16, so the graph survives FP16 conversion; in fp32 softmax it acts as -inf.
MASK_VALUE = -65504.0


class RMSNorm(nn.Module):
    """RMSNorm over the last ``size`` features; ``offset`` is added to the weight (Gemma's ``1 + w``)."""

    def __init__(self, size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        weight = self.weight + self.offset if self.offset else self.weight
        return x * torch.rsqrt(variance + self.eps) * weight


class OffsetLayerNorm(nn.LayerNorm):
    """LayerNorm whose weight is used as ``weight + offset`` (Nemotron's LayerNorm1P: offset 1)."""

    def __init__(self, size: int, eps: float, bias: bool, offset: float):
        super().__init__(size, eps=eps, bias=bias)
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + self.offset, self.bias, self.eps)


class PerHeadNorm(nn.Module):
    """A norm over each head's D features with its own weight per head, weight [heads, D]; input
    [B, S, heads, D] (Cohere's q/k LayerNorm; ``rms`` for an RMSNorm of the same shape)."""

    def __init__(self, heads: int, head_dim: int, eps: float, rms: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.eps, self.rms = eps, rms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


def make_norm(arch: Architecture, size: int | None = None) -> nn.Module:
    size = size or arch.hidden_size
    if arch.norm == "rmsnorm":
        return RMSNorm(size, arch.norm_eps, arch.norm_offset)
    if arch.norm_offset:
        return OffsetLayerNorm(size, arch.norm_eps, arch.norm_bias, arch.norm_offset)
    return nn.LayerNorm(size, eps=arch.norm_eps, elementwise_affine=arch.norm_affine, bias=arch.norm_bias)


def rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """(-x2, x1) for the halves x1, x2 of the last dim; ``interleaved``: for each adjacent pair."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))  # ..., D/2, 2
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of each head (all of them unless partial rotary)."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x, interleaved) * sin
    turned, kept = x[..., :rotary], x[..., rotary:]
    return torch.cat([turned * cos + rotate_half(turned, interleaved) * sin, kept], dim=-1)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's soft capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


class Attention(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.scale = arch.attn_scale if arch.attn_scale is not None else 1.0 / math.sqrt(arch.head_dim)
        self.softcap, self.qk_norm = arch.attn_softcap, arch.qk_norm
        self.clip, self.interleaved = arch.qkv_clip, arch.rope_interleaved
        qkv_out = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.qkv = nn.Linear(arch.hidden_size, qkv_out, bias=arch.qkv_bias)
        self.out = nn.Linear(self.n_head * self.head_dim, arch.hidden_size, bias=arch.attn_out_bias)
        if arch.qk_norm == "per_head":  # a weight per head (Cohere)
            rms = arch.norm == "rmsnorm"
            self.q_norm: nn.Module = PerHeadNorm(self.n_head, self.head_dim, arch.norm_eps, rms)
            self.k_norm: nn.Module = PerHeadNorm(self.n_kv, self.head_dim, arch.norm_eps, rms)
        elif arch.qk_norm != "none":  # per head (Qwen3) or over all heads' features (OLMo 2)
            per_head = arch.qk_norm == "head"
            size = self.head_dim if per_head else self.n_head * self.head_dim
            self.q_norm = RMSNorm(size, arch.norm_eps, arch.norm_offset)
            self.k_norm = RMSNorm(self.head_dim if per_head else self.n_kv * self.head_dim, arch.norm_eps,
                                  arch.norm_offset)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        B, S, _ = x.shape
        H, K, D = self.n_head, self.n_kv, self.head_dim
        qkv = self.qkv(x)
        if self.clip is not None:  # OLMo's clip_qkv
            qkv = qkv.clamp(-self.clip, self.clip)
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        if self.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, S, H, D), k.view(B, S, K, D)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # B, H, S, D
        k = k.transpose(1, 2)  # B, K, S, D
        v = v.view(B, S, K, D).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin, self.interleaved), apply_rope(k, cos, sin, self.interleaved)
        k = torch.cat([past_k, k], dim=2)  # B, K, T, D
        v = torch.cat([past_v, v], dim=2)
        present_k, present_v = k, v
        if H != K:  # grouped-query attention: each kv head serves H/K query heads
            q = q.reshape(B, K, H // K * S, D)
        scores = softcap(q @ k.transpose(-1, -2) * self.scale, self.softcap)  # B, K, H/K*S, T
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
        if arch.activation in ("swiglu", "geglu_tanh"):
            self.gate_up = nn.Linear(arch.hidden_size, 2 * width, bias=arch.mlp_bias)
        else:
            self.up = nn.Linear(arch.hidden_size, width, bias=arch.mlp_bias)
        self.down = nn.Linear(width, arch.hidden_size, bias=arch.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        if self.activation == "geglu_tanh":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.gelu(gate, approximate="tanh") * up)
        if self.activation == "relu2":
            h = F.relu(self.up(x))
            return self.down(h * h)
        if self.activation == "relu":
            return self.down(F.relu(self.up(x)))
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        return self.down(F.gelu(self.up(x), approximate=approximate))


class Block(nn.Module):
    """One layer. ``norm_placement``: ``pre`` normalises each sub-block's input, ``post`` its output,
    ``pre_post`` both; each output is scaled by ``residual_scale`` before it joins the residual.
    ``post_residual`` normalises the sum instead, ``x = norm(x + f(x))`` (OPT-350m)."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.residual_scale, self.parallel = arch.residual_scale, arch.parallel_residual
        self.norm_after_add = arch.norm_placement == "post_residual"
        if arch.norm_placement != "post":
            self.attn_norm = make_norm(arch)
            if arch.parallel_residual != "shared_norm":
                self.mlp_norm = make_norm(arch)
        if arch.norm_placement in ("pre_post", "post"):
            self.attn_post_norm = make_norm(arch)
            self.mlp_post_norm = make_norm(arch)
        self.attn = Attention(arch)
        self.mlp = MLP(arch)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        if self.norm_after_add:
            h, present_k, present_v = self.attn(x, cos, sin, bias, past_k, past_v)
            x = self.attn_norm(x + h)
            return self.mlp_norm(x + self.mlp(x)), present_k, present_v
        h = self.attn_norm(x) if hasattr(self, "attn_norm") else x
        if self.parallel != "none":  # attention and MLP both read the block's input (Phi, GPT-NeoX)
            mlp_out = self.mlp(self.mlp_norm(x) if hasattr(self, "mlp_norm") else h)
            h, present_k, present_v = self.attn(h, cos, sin, bias, past_k, past_v)
            return x + h + mlp_out, present_k, present_v
        h, present_k, present_v = self.attn(h, cos, sin, bias, past_k, past_v)
        x = x + self._finish(h, "attn_post_norm")
        h = self.mlp(self.mlp_norm(x) if hasattr(self, "mlp_norm") else x)
        x = x + self._finish(h, "mlp_post_norm")
        return x, present_k, present_v

    def _finish(self, h: torch.Tensor, post_norm: str) -> torch.Tensor:
        if hasattr(self, post_norm):
            h = getattr(self, post_norm)(h)
        return h * self.residual_scale if self.residual_scale != 1.0 else h


class Decoder(nn.Module):
    """Decoder-only transformer with an explicit KV cache.

    ``transposed_tied_table`` (export only) stores a tied embedding once, as the LM head's [C, V].
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.transposed_tied_table = False  # set while exporting; see forward()
        width = arch.embed_proj_dim or arch.hidden_size
        self.embed = nn.Embedding(arch.vocab_size, width)
        if arch.embed_proj_dim is not None:  # OPT's word_embed_proj_dim
            self.project_in = nn.Linear(width, arch.hidden_size, bias=False)
            self.project_out = nn.Linear(arch.hidden_size, width, bias=False)
        if arch.embed_norm:
            self.embed_norm = make_norm(arch)
        if arch.position == "learned":
            self.pos_embed = nn.Embedding(arch.max_context, arch.hidden_size)
        elif arch.position == "rope":
            self.reset_rope()
        self.layers = nn.ModuleList(Block(arch) for _ in range(arch.num_layers))
        self.norm = make_norm(arch) if arch.final_norm else nn.Identity()
        self.lm_head = nn.Linear(width, arch.vocab_size, bias=arch.lm_head_bias)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_rope(self) -> None:
        """(Re)build the non-persistent RoPE buffers: ``inv_freq`` and, when the model has them,
        ``inv_freq_long`` (longrope past its original context) and ``inv_freq_local`` (Gemma 3)."""
        arch = self.arch
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)
        if rope_kind(arch) == "longrope" and arch.max_context > arch.rope_scaling["original_max_position_embeddings"]:
            self.register_buffer("inv_freq_long", rope_inv_freq(arch, long=True), persistent=False)
        if arch.rope_local_theta is not None:
            self.register_buffer("inv_freq_local", rope_inv_freq(arch, theta=arch.rope_local_theta),
                                 persistent=False)

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
        if self.arch.embed_scale != 1.0:
            x = x * self.arch.embed_scale
        if self.arch.embed_proj_dim is not None:
            x = self.project_in(x)
        if self.arch.embed_norm:
            x = self.embed_norm(x)
        if self.arch.position == "learned":
            x = x + self.pos_embed(position_ids)
        rope = self._rope_tables(position_ids)
        biases = {window: attention_bias(attention_mask, input_ids.shape[1], window)
                  for window in {self.arch.window_of(i) for i in range(self.arch.num_layers)}}  # B, 1, S, T
        if self.arch.position == "alibi":
            alibi = alibi_bias(attention_mask, self.arch)  # B, H, 1, T
            biases = {window: bias + alibi for window, bias in biases.items()}  # B, H, S, T
        presents = []
        for i, (layer, (past_k, past_v)) in enumerate(zip(self.layers, past_key_values)):
            local = self.arch.rope_local_theta is not None and self.arch.window_of(i) is not None
            cos, sin = rope["local" if local else "global"] if i not in (self.arch.nope_layers or ()) else (None, None)
            x, present_k, present_v = layer(x, cos, sin, biases[self.arch.window_of(i)], past_k, past_v)
            presents.append((present_k, present_v))
        x = self.norm(x)
        if self.arch.embed_proj_dim is not None:
            x = self.project_out(x)
        logits = x @ table_t if table_t is not None else self.lm_head(x)  # B, S, V
        if table_t is not None and self.lm_head.bias is not None:
            logits = logits + self.lm_head.bias
        if self.arch.logit_divisor != 1.0:
            logits = logits / self.arch.logit_divisor
        return softcap(logits, self.arch.logit_softcap), presents

    def _rope_tables(self, position_ids: torch.Tensor) -> dict[str, tuple]:
        """(cos, sin) [B, 1, S, D] per RoPE kind in use ("global", and "local" for Gemma 3)."""
        if self.arch.position != "rope":
            return {"global": (None, None)}
        inv_freq = self.get_buffer("inv_freq")
        if hasattr(self, "inv_freq_long"):  # longrope: the long factors once the sequence outgrows the original context
            original = (self.arch.rope_scaling or {})["original_max_position_embeddings"]
            inv_freq = torch.where(position_ids.max() + 1 > original, self.get_buffer("inv_freq_long"), inv_freq)
        interleaved = self.arch.rope_interleaved
        tables = {"global": _cos_sin(position_ids, inv_freq, attention_factor(self.arch), interleaved)}
        if hasattr(self, "inv_freq_local"):
            tables["local"] = _cos_sin(position_ids, self.get_buffer("inv_freq_local"), 1.0, interleaved)
        return tables


def _cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, factor: float, interleaved: bool = False) -> tuple:
    angles = position_ids.unsqueeze(-1).float() * inv_freq  # B, S, D/2
    if interleaved:  # each frequency serves one adjacent pair
        angles = torch.stack([angles, angles], dim=-1).flatten(-2).unsqueeze(1)  # B, 1, S, D
    else:
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # B, 1, S, D
    if factor != 1.0:
        return angles.cos() * factor, angles.sin() * factor
    return angles.cos(), angles.sin()


def attention_bias(attention_mask: torch.Tensor, seq_len: int, window: int | None = None) -> torch.Tensor:
    """Additive bias [B, 1, S, T]: 0 where query s may attend key t, MASK_VALUE elsewhere.

    Query s sits at cache index T - S + s; it sees keys at or before that index whose mask is 1 and,
    with a sliding ``window`` W, only the W most recent of those indices (itself included), as
    transformers' sliding-window mask does. The band is on cache indices, so it holds in decode steps.
    """
    total = attention_mask.shape[1]
    key_index = torch.arange(total, device=attention_mask.device)
    query_index = torch.arange(seq_len, device=attention_mask.device) + (total - seq_len)
    causal = key_index.unsqueeze(0) <= query_index.unsqueeze(1)  # S, T
    if window is not None:
        causal = causal & (key_index.unsqueeze(0) > query_index.unsqueeze(1) - window)
    allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # B, S, T
    zero = torch.zeros((), dtype=torch.float32)
    masked = torch.full((), MASK_VALUE, dtype=torch.float32)
    return torch.where(allowed, zero, masked).unsqueeze(1)


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's per-head slopes, as transformers' ``build_alibi_tensor`` computes them (heads beyond
    the largest power of two take every other slope of the next power's sequence)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, 1 + closest)]
    if closest != num_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 1 + 2 * min(closest, num_heads - closest), 2)]
    return slopes


def alibi_bias(attention_mask: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """ALiBi bias [B, H, 1, T]: slope(h) * key position, positions counted over the mask's kept
    tokens (transformers' ``(cumsum(mask) - 1) * mask``), so left padding and decode steps see the
    positions transformers sees. Adding ``slope * key position`` instead of ``-slope * distance``
    changes each query row by a constant, which softmax ignores. Falcon (``alibi_scaled``) scales the
    bias with the scores."""
    slopes = torch.tensor(alibi_slopes(arch.num_heads), dtype=torch.float32)
    if arch.alibi_scaled:
        slopes = slopes * (arch.attn_scale if arch.attn_scale is not None else 1.0 / math.sqrt(arch.head_dim))
    kept = attention_mask.to(torch.float32)
    positions = (kept.cumsum(-1) - 1.0) * kept  # B, T
    return slopes.view(1, -1, 1, 1) * positions[:, None, None, :]


def empty_past(arch: Architecture, batch: int, dtype: torch.dtype = torch.float32):
    shape = (batch, arch.num_kv_heads, 0, arch.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
            for _ in range(arch.num_layers)]
