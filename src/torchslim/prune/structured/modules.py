"""Layers that head pruning produces.

``nn.MultiheadAttention`` insists that ``embed_dim == num_heads * head_dim``, so
it cannot hold fewer heads than its embedding has. Removing heads therefore
replaces it by :class:`PrunedMultiheadAttention`: the same parameters under the
same names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``), the same call
signature and results, but an inner width of ``num_heads * head_dim`` that may
be smaller than ``embed_dim``. It is built from plain ops, so it traces with
torch.fx, exports to ONNX and is pruned again like the original.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchslim.errors import ModelError


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention whose heads need not fill ``embed_dim``.

    Args:
        embed_dim: width of the query/key/value inputs and of the output.
        num_heads: heads kept (at least 1).
        head_dim: width of one head (that of the original layer).
        bias: projections have biases.
        batch_first: inputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        dropout: dropout on the attention weights (training only).

    Example:
        >>> attn = PrunedMultiheadAttention(embed_dim=16, num_heads=1, head_dim=8, batch_first=True)
        >>> x = torch.randn(2, 5, 16)
        >>> attn(x, x, x, need_weights=False)[0].shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ModelError(f"PrunedMultiheadAttention needs at least one head of width >= 1, got {num_heads} x {head_dim}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same arguments and results as ``nn.MultiheadAttention.forward`` (batched inputs, 2-D masks)."""
        if self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt_len, src_len = query.shape[0], key.shape[0]
        hd = self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        # (L, N, H*hd) -> (N*H, L, hd): head h of sample n sits at row n*H + h, as in torch.
        q = F.linear(query, w_q, b_q).reshape(tgt_len, -1, hd).transpose(0, 1)
        k = F.linear(key, w_k, b_k).reshape(src_len, -1, hd).transpose(0, 1)
        v = F.linear(value, w_v, b_v).reshape(src_len, -1, hd).transpose(0, 1)
        mask = self._additive_mask(attn_mask, key_padding_mask, is_causal, tgt_len, src_len, q)
        if not need_weights:
            # The fused kernel, as nn.MultiheadAttention uses when weights are not returned.
            shape = (-1, self.num_heads, tgt_len, hd)
            out = F.scaled_dot_product_attention(
                q.reshape(shape), k.reshape(-1, self.num_heads, src_len, hd), v.reshape(-1, self.num_heads, src_len, hd),
                attn_mask=mask if mask is None or mask.dim() == 2 else mask.view(-1, self.num_heads, tgt_len, src_len),
                dropout_p=self.dropout if self.training else 0.0,
            )
            out = out.reshape(-1, tgt_len, hd).transpose(0, 1).reshape(tgt_len, -1, self.num_heads * hd)
            weights = None
        else:
            scores = torch.bmm(q * (1.0 / math.sqrt(hd)), k.transpose(1, 2))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if self.training and self.dropout > 0:
                weights = F.dropout(weights, p=self.dropout)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len, -1, self.num_heads * hd)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        if weights is None:
            return out, None
        weights = weights.view(-1, self.num_heads, tgt_len, src_len)
        return out, weights.mean(dim=1) if average_attn_weights else weights

    def _additive_mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool,
                       tgt_len: int, src_len: int, like: torch.Tensor) -> torch.Tensor | None:
        """One float mask ``(N*H, L, S)`` or ``(L, S)`` to add to the scores (-inf where masked), or None."""
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=like.device).triu(1)
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ModelError("PrunedMultiheadAttention accepts 2-D attn_mask only (per-head masks no longer match the kept heads)")
            mask = _as_additive(attn_mask, like)
        if key_padding_mask is not None:
            pad = _as_additive(key_padding_mask, like).view(-1, 1, 1, src_len)
            pad = pad.expand(-1, self.num_heads, tgt_len, src_len).reshape(-1, tgt_len, src_len)
            mask = pad if mask is None else mask + pad
        return mask

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}")


def _as_additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = masked out, torch's convention) as 0 / -inf; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)
