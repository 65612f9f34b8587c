"""Vision transformers with a linearisable module structure: ViT_B, ViT_ETT (METHOD 3.4).

Sequential: patch_embed (conv + class token prepended; generalized layer 0), pos_embed (learned,
added out of place), encoder (nn.Sequential of EncoderBlock, one generalized layer each), ln
(LayerNorm eps 1e-6), token_mean (mean over all tokens including the class token), head (Linear,
zero-initialised). Tokens are (B, T, D) with T = 1 + (image_size / patch)^2.

Unlike the reference (METHOD 4.1 item 7, 12.11) the position embedding is added out of place, so
the recorded gen-layer-0 feature is the patch tokens *without* position embedding in training
and in analysis alike.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from common.models.chain import ChainModel

from common.errors import ConfigError

LN_EPS = 1e-6


class PatchEmbedding(nn.Module):
    """Conv2d(in, D, kernel=stride=patch) -> (B, N, D) tokens, learnable zero class token prepended.

    Init (METHOD 3.4): truncated normal, std sqrt(1 / fan_in), zero bias.
    """

    is_generalized_layer = True

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        fan_in = in_channels * patch * patch
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)


class PositionEmbedding(nn.Module):
    """Learned (1, T, D) embedding, init N(0, 0.02), added out of place (a captured gen-layer-0
    tensor must not change afterwards)."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, num_tokens, dim).normal_(std=0.02))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos_embedding


class EncoderBlock(nn.Module):
    """Pre-LN transformer block as torchvision's: x + MHSA(LN1(x)), then + MLP(LN2(.)).

    MLP = Linear-GELU-Dropout-Linear-Dropout (keys mlp.0 / mlp.3) with Xavier-uniform weights and
    N(0, 1e-6) biases. Atomic generalized layer; its feature is the residual stream after it.
    """

    def __init__(self, heads: int, dim: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class TokenMean(nn.Module):
    """Mean over all tokens, class token included (the reference's AvgTokens = true)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def default_patch(image_size: int) -> int:
    """METHOD 3: patch 4 for images up to 32 px (CIFAR), 8 above (Tiny ImageNet)."""
    return 4 if image_size <= 32 else 8


def scale_dims(dim: int, mlp_dim: int, heads: int, width: float) -> tuple[int, int]:
    """Width rule: head_dim = max(1, round(dim * width / heads)), dim = heads * head_dim (so the
    heads always divide it); mlp_dim = max(1, round(mlp_dim * width))."""
    head_dim = max(1, int(round(dim * width / heads)))
    return heads * head_dim, max(1, int(round(mlp_dim * width)))


class VisionTransformer(ChainModel):
    """ViT (METHOD 3.4), sequential by construction; see the module docstring."""

    def __init__(
        self,
        *,
        image_size: int,
        patch: int,
        in_channels: int,
        depth: int,
        heads: int,
        dim: int,
        mlp_dim: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ConfigError(
                f"ViT patch size {patch} does not divide image size {image_size}; "
                f"pick a dataset.image_size that is a multiple of {patch}"
            )
        grid = image_size // patch
        self.patch_embed = PatchEmbedding(in_channels, dim, patch)
        self.pos_embed = PositionEmbedding(1 + grid * grid, dim)
        self.encoder = nn.Sequential(
            OrderedDict((f"encoder_layer_{i}", EncoderBlock(heads, dim, mlp_dim)) for i in range(depth))
        )
        self.ln = nn.LayerNorm(dim, eps=LN_EPS)
        self.token_mean = TokenMean()
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)



def vit(
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    width: float = 1.0,
    depth: int,
    heads: int,
    dim: int,
    mlp_dim: int,
    patch: int | None = None,
) -> VisionTransformer:
    """Generic ViT builder; `dim`/`mlp_dim` are scaled by `width` (see `scale_dims`), `patch`
    defaults to `default_patch(image_size)`."""
    dim, mlp_dim = scale_dims(dim, mlp_dim, heads, width)
    return VisionTransformer(
        image_size=image_size,
        patch=patch or default_patch(image_size),
        in_channels=in_channels,
        depth=depth,
        heads=heads,
        dim=dim,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
    )


def vit_b(**kwargs) -> VisionTransformer:
    """ViT_B teacher: 12 blocks, 12 heads, dim 768, MLP 3072; 13 generalized layers."""
    return vit(depth=12, heads=12, dim=768, mlp_dim=3072, **kwargs)


def vit_ett(**kwargs) -> VisionTransformer:
    """ViT_ETT student: 8 blocks, 6 heads, dim 192, MLP 576; 9 generalized layers."""
    return vit(depth=8, heads=6, dim=192, mlp_dim=576, **kwargs)
