"""bigkernels.nn.LSTM: torch.nn.LSTM with one fused whole-sequence kernel per layer and direction."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from bigkernels.ops.lstm import lstm_layer
from bigkernels.ops.lstm_ext import lstm_layer_ext, zoneout_pair

State = tuple[Tensor, Tensor]
# The LayerNorm parameters of one layer and direction, in lstm_layer_ext's order, with their sizes
# in units of hidden_size.
_LAYER_NORM_PARAMS = (("ih_weight", 4), ("ih_bias", 4), ("hh_weight", 4), ("hh_bias", 4), ("cell_weight", 1),
                      ("cell_bias", 1))


class LSTM(torch.nn.RNNBase):
    """Drop-in for :class:`torch.nn.LSTM`: same constructor, parameters, ``state_dict``, inputs and outputs.

    It derives from :class:`torch.nn.RNNBase` (mode ``"LSTM"``) rather than ``torch.nn.LSTM`` because
    TorchDynamo refuses to trace any ``torch.nn.LSTM`` instance; RNNBase brings the same parameters
    (``weight_ih_l0``, ``weight_hh_l0_reverse``, ``bias_ih_l1``, ``weight_hr_l0``, ...),
    ``flatten_parameters`` and ``all_weights``, so ``state_dict`` loads both ways and
    ``isinstance(m, torch.nn.RNNBase)`` holds. So this module compiles with ``torch.compile(fullgraph=True)``.

    Args (as torch.nn.LSTM): input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0 (between layers, training only), bidirectional=False, proj_size=0 (must be < hidden_size),
    device=None, dtype=None.

    ``forward(input, hx=None) -> (output, (h_n, c_n))``, with D = 2 if bidirectional else 1, P =
    proj_size if proj_size > 0 else hidden_size, and H = hidden_size:

    - input: (L, N, input_size), (N, L, input_size) with batch_first, unbatched (L, input_size), or a
      :class:`~torch.nn.utils.rnn.PackedSequence`.
    - hx: ``(h_0, c_0)`` with h_0 (num_layers * D, N, P) and c_0 (num_layers * D, N, H)
      ((num_layers * D, P) / (num_layers * D, H) for unbatched input); zeros when omitted. For a
      PackedSequence, row i of the states belongs to sequence i of the batch as the user gave it
      (before sorting), exactly as in torch.
    - output: (L, N, D * P) ((N, L, D * P) with batch_first, (L, D * P) unbatched), or a PackedSequence
      with the input's batch_sizes and indices; h_n and c_n shaped like h_0 and c_0.

    An empty sequence (L = 0) returns an empty output and the initial state (torch raises instead).
    ``torch.compile(fullgraph=True)`` traces tensor input; a PackedSequence's batch_sizes are read on
    the host (the batch size, the per-step row counts), which breaks the graph there.

    Each layer and direction is one call of :func:`bigkernels.ops.lstm.lstm_layer` (the input
    projection of all steps is one GEMM, the recurrence runs in the kernel); see it for the devices and
    dtypes each backend supports (CPU float32/float64/bfloat16, CUDA float16/bfloat16/float32/float64).
    Weights, input and states must share one dtype and device.

    Beyond torch.nn.LSTM, two keyword-only options, both off by default (then the parameters and
    ``state_dict`` are exactly torch's):

    - ``layer_norm=True``: the layer-normalised LSTM of Ba et al. (2016). Per layer and direction,
      with LN(v) = gain * (v - mean(v)) / sqrt(var(v) + 1e-5) + bias over the last dimension:
      ``a = LN_ih(W_ih x_t) + LN_hh(W_hh h_{t-1}) + b_ih + b_hh`` (LN over the 4H gate vector of a
      row), ``i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of a``, ``c_t = f * c_{t-1} + i * g``,
      ``h_t = o * tanh(LN_c(c_t))`` (then ``W_hr h_t`` with proj_size). Extra parameters
      ``layer_norm_{ih,hh}_{weight,bias}_l{k}`` (4H) and ``layer_norm_cell_{weight,bias}_l{k}`` (H),
      ``_reverse`` suffixed for the reverse direction, initialised to gain 1, bias 0.
    - ``zoneout=p`` (a float in [0, 1), or a pair ``(p_cell, p_hidden)``): zoneout of Krueger et al.
      (2016). In training each unit keeps its previous value with probability p, a Bernoulli mask per
      step, unit and row drawn from torch's generator (``torch.manual_seed`` reproduces it; the
      backward uses the same mask): ``c_t = m_c * c_{t-1} + (1 - m_c) * c~_t`` and
      ``h_t = m_h * h_{t-1} + (1 - m_h) * h~_t``, where c~_t, h~_t are the cell's new values (h~ from
      c~, as in the paper). In eval mode m is replaced by its expectation p. The output at step t is
      the zoned-out h_t. With proj_size, h is the projected state.

    Both work with packed sequences, bidirectional and multi-layer models and proj_size; they run
    :func:`bigkernels.ops.lstm_ext.lstm_layer_ext` (fused C++ on CPU, Triton on GPU).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        layer_norm: bool = False,
        zoneout: Union[float, tuple[float, float]] = 0.0,
    ) -> None:
        if not isinstance(layer_norm, bool):
            raise TypeError(f"layer_norm must be a bool, got {type(layer_norm).__name__}")
        self.zoneout = zoneout_pair(zoneout)  # raises on a value outside [0, 1)
        self.layer_norm = layer_norm
        self._layer_norm_names: list[str] = []
        super().__init__(
            "LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device=device, dtype=dtype,
        )
        if layer_norm:
            factory = {"device": device, "dtype": dtype}
            for layer in range(num_layers):
                for direction in range(2 if bidirectional else 1):
                    suffix = f"_l{layer}" + ("_reverse" if direction else "")
                    for what, units in _LAYER_NORM_PARAMS:
                        name = f"layer_norm_{what}{suffix}"
                        self.register_parameter(name, torch.nn.Parameter(torch.empty(units * hidden_size, **factory)))
                        self._layer_norm_names.append(name)
            self._reset_layer_norm()
        self._extended = layer_norm or self.zoneout != (0.0, 0.0)

    def _reset_layer_norm(self) -> None:
        with torch.no_grad():
            for name in self._layer_norm_names:
                getattr(self, name).fill_(1.0 if "weight" in name else 0.0)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # uniform for every parameter, the LayerNorm ones included
        self._reset_layer_norm()

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.layer_norm:
            text += ", layer_norm=True"
        if self.zoneout != (0.0, 0.0):
            text += f", zoneout={self.zoneout}"
        return text

    def _current_weights(self) -> list[Tensor]:
        """The weights in `_flat_weights_names` order, read fresh on every call.

        RNNBase caches them in `_flat_weights`, which torch.func.functional_call bypasses (it swaps
        entries of `_parameters`); torch re-validates that cache with weakrefs at ~1 us a weight. A
        dict lookup is as cheap as the cache and never stale; getattr covers weights that are no
        longer plain parameters (parametrizations, weight_norm)."""
        params = self._parameters
        return [params[name] if name in params else getattr(self, name) for name in self._flat_weights_names]

    def _layer_norm_params(self, k: int) -> Optional[tuple[Tensor, ...]]:
        """The six LayerNorm parameters of layer-and-direction k, or None without layer_norm."""
        if not self.layer_norm:
            return None
        per = len(_LAYER_NORM_PARAMS)
        return tuple(getattr(self, name) for name in self._layer_norm_names[k * per:(k + 1) * per])

    def _check_input(self, data: Tensor, w_ih: Tensor) -> None:
        # Same checks and messages as torch.nn.RNNBase.check_input; dtype is not checked under
        # autocast, where the op casts for itself.
        if data.dtype != w_ih.dtype and not torch.is_autocast_enabled(data.device.type):
            raise ValueError(
                f"LSTM input dtype ({data.dtype}) does not match weight dtype ({w_ih.dtype}). "
                f"Convert input: input.to({w_ih.dtype}), or convert model: model.to({data.dtype})"
            )
        if data.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {data.shape[-1]}"
            )

    def _check_state(self, name: str, index: int, state: Tensor, expected: tuple[int, int, int], data: Tensor) -> None:
        if tuple(state.shape) != expected:
            # Keeps torch's wording ("Expected hidden[0] size ...") for code that matches on it.
            size = "proj_size or hidden_size" if index == 0 else "hidden_size"
            raise RuntimeError(
                f"Expected hidden[{index}] size {expected}, got {list(state.shape)}: hx[{index}] ({name}) must have "
                f"shape (num_layers * num_directions, batch, {size})"
            )
        if state.device != data.device:
            raise RuntimeError(f"hx[{index}] ({name}) must be on the input's device ({data.device}), got {state.device}")
        if state.dtype != data.dtype and not torch.is_autocast_enabled(data.device.type):
            raise ValueError(f"hx[{index}] ({name}) must have the input's dtype ({data.dtype}), got {state.dtype}")

    def forward(
        self, input: Union[Tensor, PackedSequence], hx: Optional[State] = None
    ) -> tuple[Union[Tensor, PackedSequence], State]:
        # Bring every input form to the op's layout: time-major (L, N, I), or packed data + batch_sizes.
        is_packed = isinstance(input, PackedSequence)
        if is_packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batched = True
            batch = int(batch_sizes[0]) if batch_sizes.numel() else 0
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"LSTM: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            batch_sizes = sorted_indices = unsorted_indices = None
            if not batched:
                data = input.unsqueeze(1)  # (L, 1, I), whatever batch_first says
            elif self.batch_first:
                data = input.transpose(0, 1)  # a view; the op takes strided input
            else:
                data = input
            batch = data.shape[1]

        weights = self._current_weights()
        self._check_input(data, weights[0])
        directions = 2 if self.bidirectional else 1
        layers_x_dirs = self.num_layers * directions
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size

        if hx is None:
            # One zero state serves every layer and direction: the op only reads it.
            h_zero = data.new_zeros((batch, out_size))
            c_zero = data.new_zeros((batch, self.hidden_size))
            h_0 = [h_zero] * layers_x_dirs
            c_0 = [c_zero] * layers_x_dirs
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError("LSTM: hx must be a tuple (h_0, c_0) of two tensors")
            h, c = hx
            state_dim = 3 if batched else 2
            if not isinstance(h, Tensor) or not isinstance(c, Tensor) or h.dim() != state_dim or c.dim() != state_dim:
                what = "batched 3-D" if batched else "unbatched 2-D"
                dims = tuple(t.dim() if isinstance(t, Tensor) else type(t).__name__ for t in (h, c))
                raise RuntimeError(
                    f"For {what} input, hx and cx should also be {state_dim}-D but got ({dims[0]}-D, {dims[1]}-D) tensors"
                )
            if not batched:
                h, c = h.unsqueeze(1), c.unsqueeze(1)
            self._check_state("h_0", 0, h, (layers_x_dirs, batch, out_size), data)
            self._check_state("c_0", 1, c, (layers_x_dirs, batch, self.hidden_size), data)
            if sorted_indices is not None:
                # Row i of the user's state belongs to sequence i; the packed data holds them sorted.
                h, c = h.index_select(1, sorted_indices), c.index_select(1, sorted_indices)
            h_0, c_0 = h.unbind(0), c.unbind(0)

        # _flat_weights_names lists, per layer and direction: w_ih, w_hh, [b_ih, b_hh], [w_hr].
        per_cell = len(weights) // layers_x_dirs
        has_proj = self.proj_size > 0
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        layer_input = data
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                k = layer * directions + direction
                w = weights[k * per_cell:(k + 1) * per_cell]
                b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
                w_hr = w[-1] if has_proj else None
                if self._extended:
                    out, h_k, c_k = lstm_layer_ext(
                        layer_input, batch_sizes, h_0[k], c_0[k], w[0], w[1], b_ih, b_hh, w_hr, direction == 1,
                        layer_norm=self._layer_norm_params(k), zoneout=self.zoneout, training=self.training,
                    )
                else:
                    out, h_k, c_k = lstm_layer(
                        layer_input, batch_sizes, h_0[k], c_0[k], w[0], w[1], b_ih, b_hh, w_hr, reverse=direction == 1
                    )
                outputs.append(out)
                h_n.append(h_k)
                c_n.append(c_k)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            # As torch: dropout on every layer's output but the last, in training only.
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        output = layer_input
        h_out, c_out = torch.stack(h_n), torch.stack(c_n)

        if is_packed:
            if unsorted_indices is not None:
                h_out, c_out = h_out.index_select(1, unsorted_indices), c_out.index_select(1, unsorted_indices)
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), (h_out, c_out)
        if not batched:
            return output.squeeze(1), (h_out.squeeze(1), c_out.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_out, c_out)
