r"""The MoRA layer: a frozen linear layer plus a square r^ x r^ matrix M between fixed maps (MoRA paper, Sec. 3).

    y = x W^T + c + f_decomp(M f_comp(dropout(x)))        x: (..., a), y: (..., b), M: (r^, r^) (`mora_M`)

The maps (the official code's `mora_type`, github.com/kongds/MoRA, `peft-mora/.../lora/layer.py`, `_apply_mora`
and `get_delta_weight`) are parameter-free, so the update is a fixed linear map of M and merges exactly:

- compression, types 1 and 4 (sharing, strided): x padded by its own first features to a multiple of r^, then
  f_comp(x)_j = sum_g x[g r^ + j]; types 2 and 3 (sharing, grouped): r^ consecutive groups, the first
  a - r^ floor(a/r^) of size floor(a/r^) + 1, the others floor(a/r^);
- decompression, types 1 and 3: the r^ outputs tiled to b (y_i = o_{i mod r^}); types 2 and 4: each output
  repeated over a consecutive group (sizes as above, for b);
- type 6 (rotation, paper eq. 9): the padded x is cut into G = ceil(a/r^) blocks x_g, each block rotated as RoPE
  at position g (R_g, frequencies 10000^(-2i/r^)) and multiplied by M; the G outputs are concatenated, cut to b,
  and tiled if shorter: dW is block-diagonal in blocks M R_g.

M starts at zero, so the adapter starts as a no-op; there is no alpha (the official code's scaling is 1).
"""

from __future__ import annotations

import torch
from torch import nn

from rasa_lora.baselines.common import DeltaLayer
from rasa_lora.baselines.mora.config import mora_rank


def _group_sizes(features: int, side: int) -> torch.Tensor:
    """Sizes of the `side` consecutive groups of types 2-4: the first `features mod side` one larger."""
    small, larger = divmod(features, side)
    return torch.tensor([small + 1] * larger + [small] * (side - larger))


def compress_index(features: int, side: int, mora_type: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature, slot) pairs: f_comp(x)_slot = sum over pairs of x_feature (types 1-4)."""
    if mora_type in (1, 4):
        position = torch.arange(-(-features // side) * side)  # padded by the first features again
        return position % features, position % side
    return torch.arange(features), torch.repeat_interleave(torch.arange(side), _group_sizes(features, side))


def decompress_index(features: int, side: int, mora_type: int) -> torch.Tensor:
    """slot of each output: y_i = o_slot(i) (types 1-4)."""
    if mora_type in (1, 3):
        return torch.arange(features) % side
    return torch.repeat_interleave(torch.arange(side), _group_sizes(features, side))


def rope_tables(blocks: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (blocks, side): block g rotated at position g, as the official code's RoPE."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, side, 2, dtype=torch.float32) / side))
    freqs = torch.outer(torch.arange(blocks, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


class MoraLayer(DeltaLayer):
    adapter_layer_names = ("mora_M",)
    other_param_names = ("r", "mora_rank", "mora_type", "mora_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_delta_layer(base_layer)
        self.r: dict[str, int] = {}
        self.mora_rank: dict[str, int] = {}
        self.mora_type: dict[str, int] = {}
        self.mora_dropout = nn.ModuleDict({})
        self.mora_M = nn.ParameterDict({})
        self._tables: dict[tuple, torch.Tensor] = {}
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config) -> None:
        side = mora_rank(self.in_features, self.out_features, config.r, config.mora_type)
        if side < 2:
            raise ValueError(f"MoRA's square matrix would have side {side} on a ({self.in_features} -> "
                             f"{self.out_features}) layer at r={config.r}; use a larger r or leave this layer out.")
        self.r[adapter_name] = config.r
        self.mora_rank[adapter_name] = side
        self.mora_type[adapter_name] = config.mora_type
        self.mora_dropout[adapter_name] = nn.Dropout(config.mora_dropout) if config.mora_dropout else nn.Identity()
        matrix = torch.zeros(side, side, **self.adapter_factory())
        if not config.init_weights:
            nn.init.normal_(matrix, std=0.02)
        self.mora_M[adapter_name] = nn.Parameter(matrix)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # --- fixed maps ------------------------------------------------------------------------------------
    def _table(self, key: tuple, make) -> torch.Tensor:
        """Index and RoPE tables, made once per (kind, adapter shape, device, dtype)."""
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = make()
        return table

    def _rope(self, name: str, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        side = self.mora_rank[name]
        blocks = -(-self.in_features // side)
        cos = self._table(("cos", side, device, dtype), lambda: rope_tables(blocks, side)[0].to(device, dtype))
        sin = self._table(("sin", side, device, dtype), lambda: rope_tables(blocks, side)[1].to(device, dtype))
        return cos, sin

    def _compress(self, name: str, x: torch.Tensor) -> torch.Tensor:
        side, kind, features = self.mora_rank[name], self.mora_type[name], self.in_features
        if kind in (1, 4, 6):
            pad = -features % side
            if pad:
                x = torch.cat([x, x[..., :pad]], dim=-1)  # the official code pads with the first features
            blocks = x.reshape(*x.shape[:-1], -1, side)
            if kind != 6:
                return blocks.sum(dim=-2)
            cos, sin = self._rope(name, x.device, x.dtype)
            half = side // 2
            rotated = torch.cat((-blocks[..., half:], blocks[..., :half]), dim=-1)
            return blocks * cos + rotated * sin
        if features % side == 0:
            return x.reshape(*x.shape[:-1], side, -1).sum(dim=-1)
        slot = self._table(("compress", side, kind, x.device),
                           lambda: compress_index(features, side, kind)[1].to(x.device))
        return x.new_zeros(*x.shape[:-1], side).index_add_(x.dim() - 1, slot, x)

    def _decompress(self, name: str, out: torch.Tensor) -> torch.Tensor:
        kind, features = self.mora_type[name], self.out_features
        if kind == 6:
            out = out.reshape(*out.shape[:-2], -1)
        if kind in (1, 3, 6):
            repeats = -(-features // out.shape[-1])
            return (out.repeat(*([1] * (out.dim() - 1)), repeats) if repeats > 1 else out)[..., :features]
        index = self._table(("decompress", self.mora_rank[name], kind, out.device),
                            lambda: decompress_index(features, self.mora_rank[name], kind).to(out.device))
        return out.index_select(-1, index)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        matrix = self.mora_M[name]
        x = self.mora_dropout[name](self._cast_input_dtype(x, matrix.dtype))
        return self._decompress(name, self._compress(name, x) @ matrix.t())

    # --- the update as a matrix --------------------------------------------------------------------------
    def delta_weight_float(self, name: str) -> torch.Tensor:
        """dW (b, a) built from M without loops: a count matrix for the sharing types, blocks M R_g for type 6."""
        matrix = self.mora_M[name]
        matrix = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
        side, kind = self.mora_rank[name], self.mora_type[name]
        a, b, device = self.in_features, self.out_features, matrix.device
        if kind != 6:
            feature, slot = compress_index(a, side, kind)
            counts = torch.zeros(side, a, device=device, dtype=matrix.dtype)
            counts.index_put_((slot.to(device), feature.to(device)), torch.ones((), device=device,
                                                                                 dtype=matrix.dtype), accumulate=True)
            return (matrix @ counts)[decompress_index(b, side, kind).to(device)]
        blocks = -(-a // side)
        cos, sin = (table.to(device, matrix.dtype) for table in rope_tables(blocks, side))
        half = side // 2
        swapped = torch.cat((matrix[:, half:], -matrix[:, :half]), dim=1)  # M applied after rotate_half
        per_block = matrix[None] * cos[:, None, :] + swapped[None] * sin[:, None, :]  # (G, r^, r^) = M R_g
        columns = (torch.arange(blocks * side, device=device) % a).reshape(blocks, 1, side).expand(-1, side, -1)
        padded = torch.zeros(blocks, side, a, device=device, dtype=matrix.dtype)
        padded.scatter_add_(2, columns, per_block)
        rows = torch.arange(b, device=device) % (blocks * side)
        return padded.reshape(blocks * side, a)[rows]


class Linear(nn.Module, MoraLayer):
    """MoRA on an `nn.Linear` or a transformers `Conv1D`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        MoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.delta_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "mora." + super().__repr__()
