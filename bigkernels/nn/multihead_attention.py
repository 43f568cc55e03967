"""bigkernels.nn.MultiheadAttention: torch.nn.MultiheadAttention with flash attention behind forward."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bigkernels.ops.attention import scaled_dot_product_attention


def _additive(mask: Optional[Tensor], dtype: torch.dtype, name: str) -> Optional[Tensor]:
    """MultiheadAttention's masks: bool True = NOT allowed to attend; float masks are added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention`: same constructor (embed_dim, num_heads,
    dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first), parameters and
    ``state_dict`` (``load_state_dict`` works both ways).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` with torch's shapes: (L, N, E) / (S, N, kdim|vdim)
    (or (N, L, E) with batch_first, or unbatched (L, E)). With ``need_weights=False`` the attention
    itself runs in bigkernels' flash-attention op (no L x S matrix, forward or backward), the
    projections in torch's linear; every option is honoured: key_padding_mask and attn_mask (bool or
    float, 2-D or 3-D), is_causal (torch's hint semantics: it needs attn_mask, which is then replaced
    by the causal window unless a key_padding_mask is given), add_bias_kv, add_zero_attn, kdim/vdim,
    dropout (in training mode). Returns ``(output, None)``.

    ``need_weights=True`` (torch's default) must return the L x S attention weights, which a flash
    kernel never forms: that call takes the stock path (``super().forward``) unchanged. Pass
    ``need_weights=False`` to get the fused kernel. Note also that a stock
    ``nn.TransformerEncoderLayer`` calls ``self_attn`` with ``need_weights=False`` (so it gets the
    fused path) except in its own inference fast path (eval mode, no autograd, batch_first, ...),
    where it skips ``self_attn.forward`` entirely and runs torch's fused encoder op on these same
    parameters.

    Devices and dtypes: those of :func:`bigkernels.nn.functional.scaled_dot_product_attention`.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if need_weights:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (L, E) or 3-D, got {query.dim()}-D")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must have the same number of dims, got {query.dim()}, "
                             f"{key.dim()}, {value.dim()}")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E), views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must have embed_dim = {self.embed_dim} features, got {query.shape[-1]}")

        batch, length_q, heads, head_dim = query.shape[0], query.shape[1], self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, self.embed_dim)], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, self.embed_dim)], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        length_k = k.shape[1]

        mask, causal = self._merged_mask(attn_mask, key_padding_mask, is_causal, q.dtype, batch, length_q, length_k)
        # (N, L, H * hd) -> (N, H, L, hd): views; the kernel takes any strides.
        q = q.view(batch, length_q, heads, head_dim).transpose(1, 2)
        k = k.view(batch, length_k, heads, head_dim).transpose(1, 2)
        v = v.view(batch, length_k, heads, head_dim).transpose(1, 2)
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=causal)
        # The op stores its output as (N, L, H, hd): merging the heads is a free view.
        out = out.transpose(1, 2).reshape(batch, length_q, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The input projections, (N, L|S, E) each."""
        bias = self.in_proj_bias
        b_q = b_k = b_v = None
        if bias is not None:
            b_q, b_k, b_v = bias.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one GEMM, q/k/v are strided views
                return F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _merged_mask(self, attn_mask, key_padding_mask, is_causal, dtype, batch, length_q, length_k):
        """attn_mask and key_padding_mask as one additive mask broadcastable to (N, H, L, S), and
        whether the kernel should apply the causal window instead (torch's is_causal hint rules)."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        kpm = _additive(key_padding_mask, dtype, "key_padding_mask")
        if kpm is not None and tuple(kpm.shape) != (batch, length_k):
            raise ValueError(f"key_padding_mask must have shape (N, S) = {(batch, length_k)}, got {tuple(kpm.shape)}")
        if is_causal and kpm is None:
            return None, True  # the hint: attn_mask is the causal mask, the kernel's window is exact
        mask = _additive(attn_mask, dtype, "attn_mask")
        if mask is not None:
            if mask.dim() == 2:
                if tuple(mask.shape) != (length_q, length_k):
                    raise ValueError(f"The shape of the 2D attn_mask is {tuple(mask.shape)}, but should be "
                                     f"{(length_q, length_k)}.")
            elif mask.dim() == 3:
                if tuple(mask.shape) != (batch * self.num_heads, length_q, length_k):
                    raise ValueError(f"The shape of the 3D attn_mask is {tuple(mask.shape)}, but should be "
                                     f"{(batch * self.num_heads, length_q, length_k)}.")
                mask = mask.view(batch, self.num_heads, length_q, length_k)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {mask.dim()}-D")
        if kpm is not None:
            kpm = kpm.view(batch, 1, 1, length_k)
            mask = kpm if mask is None else mask + kpm
        return mask, False
