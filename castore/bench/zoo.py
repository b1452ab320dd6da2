"""Model shapes the hot-load benchmark adds to its classic four, in plain torch (no download, no extra package):
a GPT-style decoder run with dynamic shapes over several sequence lengths, a Llama-style decoder (RMSNorm, rotary
embeddings, SwiGLU, grouped-query attention) for a training step, and a vision transformer. Sizes come in two
scales: ``small`` for a 2-core CPU, ``full`` for a GPU (the GPU ViT is ViT-B/16's shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderShape:
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    hidden: int


GPT_SHAPES = {"small": DecoderShape(2048, 128, 2, 4, 4, 512), "full": DecoderShape(50304, 768, 12, 12, 12, 3072)}
LLAMA_SHAPES = {"small": DecoderShape(2048, 128, 2, 4, 2, 352), "full": DecoderShape(32000, 1024, 6, 16, 4, 2816)}
# (image size, patch, dim, layers, heads, mlp): ViT-B/16 on a GPU, a 4-layer one on a CPU
VIT_SHAPES = {"small": (64, 8, 128, 4, 4, 256), "full": (224, 16, 768, 12, 12, 3072)}
# The sequence lengths a dynamic-shape model is run over, in order: the first compiles, the later ones reuse the
# dynamic graph (or recompile once where a length's guards do not hold).
DYNAMIC_LENGTHS = {"small": (32, 48, 80), "full": (128, 192, 320)}


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, *, causal: bool, rotary: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.causal, self.rotary = causal, rotary
        self.q = nn.Linear(dim, dim, bias=not rotary)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=not rotary)
        self.out = nn.Linear(dim, dim, bias=not rotary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.rotary:
            q, k = _rotate(q), _rotate(k)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of (batch, heads, time, head_dim)."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, *, llama: bool, causal: bool) -> None:
        super().__init__()
        self.llama = llama
        self.norm1 = RMSNorm(dim) if llama else nn.LayerNorm(dim)
        self.norm2 = RMSNorm(dim) if llama else nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, kv_heads, causal=causal, rotary=llama)
        if llama:  # SwiGLU
            self.gate = nn.Linear(dim, hidden, bias=False)
            self.up = nn.Linear(dim, hidden, bias=False)
            self.down = nn.Linear(hidden, dim, bias=False)
        else:
            self.fc = nn.Linear(dim, hidden)
            self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        if self.llama:
            return x + self.down(F.silu(self.gate(h)) * self.up(h))
        return x + self.proj(F.gelu(self.fc(h), approximate="tanh"))


class Decoder(nn.Module):
    """A GPT-style (learned positions, LayerNorm, GELU) or Llama-style decoder; returns logits."""

    def __init__(self, shape: DecoderShape, *, llama: bool, max_len: int = 1024) -> None:
        super().__init__()
        self.embed = nn.Embedding(shape.vocab, shape.dim)
        self.pos = None if llama else nn.Embedding(max_len, shape.dim)
        self.blocks = nn.ModuleList(
            Block(shape.dim, shape.heads, shape.kv_heads, shape.hidden, llama=llama, causal=True) for _ in range(shape.layers)
        )
        self.norm = RMSNorm(shape.dim) if llama else nn.LayerNorm(shape.dim)
        self.head = nn.Linear(shape.dim, shape.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class VisionTransformer(nn.Module):
    def __init__(self, image: int, patch: int, dim: int, layers: int, heads: int, hidden: int, classes: int = 1000) -> None:
        super().__init__()
        self.patchify = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, heads, hidden, llama=False, causal=False) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patchify(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def gpt(scale: str, layers: int | None, batch: int | None) -> tuple[nn.Module, list[torch.Tensor]]:
    """The GPT-style decoder and one token batch per dynamic length."""
    shape = GPT_SHAPES[scale]
    if layers:
        shape = DecoderShape(shape.vocab, shape.dim, layers, shape.heads, shape.kv_heads, shape.hidden)
    net = Decoder(shape, llama=False)
    b = batch or (2 if scale == "small" else 4)
    return net, [torch.randint(0, shape.vocab, (b, t)) for t in DYNAMIC_LENGTHS[scale]]


def llama(scale: str, layers: int | None, batch: int | None) -> tuple[nn.Module, torch.Tensor]:
    shape = LLAMA_SHAPES[scale]
    if layers:
        shape = DecoderShape(shape.vocab, shape.dim, layers, shape.heads, shape.kv_heads, shape.hidden)
    net = Decoder(shape, llama=True)
    t = 64 if scale == "small" else 512
    return net, torch.randint(0, shape.vocab, (batch or (2 if scale == "small" else 4), t))


def vit(scale: str, layers: int | None, batch: int | None) -> tuple[nn.Module, torch.Tensor]:
    image, patch, dim, depth, heads, hidden = VIT_SHAPES[scale]
    net = VisionTransformer(image, patch, dim, layers or depth, heads, hidden)
    return net, torch.randn(batch or (4 if scale == "small" else 16), 3, image, image)

