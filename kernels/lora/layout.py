"""Plain data the multi-adapter LoRA kernel needs: where each adapter's rank rows live in the
packed buffers (``LoRALayout``), and which tokens belong to which adapter (``Routing``).

Both are built once (the layout when adapters change, the routing once per batch) and keep
their device copies cached, so the per-layer launch does no host->device traffic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

# Token chunks of the weight-gradient reductions (LoRA dA/dB, DoRA dg): a segment of one adapter
# is cut into chunks of rows, each reduced by its own programs into fp32 partials, which a second
# kernel sums in chunk order (deterministic, no atomics). One adapter at Qwen3-8B shapes (T=16384,
# K=4096, rank 16) had 1 x 64 tile programs for 132 SMs, each looping over 16k rows; in chunks of
# 1024 rows it has 16 x 64. The partials of a split segment take n_chunks*R*K*4 bytes, 2R/C of its
# bf16 [T, K] input: C >= 8R keeps them under a quarter of it (32 MiB at rank 256, T=16384, K=4096).
CHUNK_MIN_ROWS = 1024


def token_chunk_rows(rank: int, block_t: int) -> int:
    """Rows per token chunk for an adapter of ``rank`` (1 for DoRA's dg): max(1024, 8 * rank),
    rounded up to a multiple of ``block_t``. It depends on the adapter's own rank only, so an
    adapter's gradient is the same bits whichever other adapters share the batch."""
    rows = max(CHUNK_MIN_ROWS, 8 * rank)
    return -(-rows // block_t) * block_t


class TokenChunks(NamedTuple):
    """Chunks of every segment (int32 device tensors) and the reduction plan of split segments."""

    chunk_seg: torch.Tensor    # [n] segment of each chunk
    chunk_start: torch.Tensor  # [n] first routed row
    chunk_end: torch.Tensor    # [n] one past the last routed row
    chunk_prow: torch.Tensor   # [n] first partial row of the chunk, or -1: its segment is one chunk
    red_seg: torch.Tensor      # [M] the segments cut into more than one chunk
    red_prow: torch.Tensor     # [M] first partial row of the segment's first chunk
    red_n: torch.Tensor        # [M] its number of chunks (chunk j at red_prow + j * width)
    part_rows: int             # rows of the fp32 partial buffer


@dataclass(eq=False)
class LoRALayout:
    """Adapters packed along the rank axis: adapter ``a`` owns rows ``offsets[a] : offsets[a] + ranks[a]``
    of ``A_all [sum R, K]`` and the same columns of ``B_all [N, sum R]``. Rank 0 = adapter not
    applied to this module. ``scales[a]`` multiplies adapter a's update (alpha/r or alpha/sqrt(r)).
    """

    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    offsets: tuple[int, ...] = field(init=False)
    _dev: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.ranks = tuple(int(r) for r in self.ranks)
        self.scales = tuple(float(s) for s in self.scales)
        if len(self.ranks) != len(self.scales):
            raise ValueError(f"LoRALayout: {len(self.ranks)} ranks but {len(self.scales)} scales; "
                             "give one scale per adapter")
        if any(r < 0 for r in self.ranks):
            raise ValueError(f"LoRALayout: ranks must be >= 0 (0 = adapter not on this module), got {self.ranks}")
        offs, o = [], 0
        for r in self.ranks:
            offs.append(o)
            o += r
        self.offsets = tuple(offs)

    @property
    def num_adapters(self) -> int:
        return len(self.ranks)

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    def device_tensors(self, device):
        """(ranks int32 [A], offsets int32 [A], scales fp32 [A]) on ``device``, cached."""
        key = str(device)
        if key not in self._dev:
            self._dev[key] = (
                torch.tensor(self.ranks, dtype=torch.int32, device=device),
                torch.tensor(self.offsets, dtype=torch.int32, device=device),
                torch.tensor(self.scales, dtype=torch.float32, device=device),
            )
        return self._dev[key]


@dataclass(eq=False)
class Routing:
    """Tokens grouped by adapter. ``token_idx[seg_start[s]:seg_start[s+1]]`` are the rows (of the
    flattened [T, K] input) of adapter ``seg_adapter[s]``; each present adapter has exactly one
    segment (a stable sort keeps the rows in order). Rows of adapter -1 (base only) are in no
    segment. Build it with ``lora_engine.engine.routing.build_routing``.
    """

    num_tokens: int
    token_idx: torch.Tensor          # int64 [T_routed], on the compute device
    seg_start: tuple[int, ...]       # host, len S+1
    seg_adapter: tuple[int, ...]     # host, len S
    _dev: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def num_segments(self) -> int:
        return len(self.seg_adapter)

    @property
    def num_routed(self) -> int:
        return self.seg_start[-1] if self.seg_start else 0

    def segment_tensors(self):
        """(seg_start int32 [S+1], seg_adapter int32 [S]) on the routing's device, cached."""
        if "seg" not in self._dev:
            dev = self.token_idx.device
            self._dev["seg"] = (torch.tensor(self.seg_start, dtype=torch.int32, device=dev),
                                torch.tensor(self.seg_adapter, dtype=torch.int32, device=dev))
        return self._dev["seg"]

    def flag_tensor(self, flags: tuple[bool, ...]) -> torch.Tensor:
        """int32 [A] on the routing's device, 1 where ``flags`` is true (DoRA's scaled slots), cached."""
        key = ("flags", tuple(bool(f) for f in flags))
        if key not in self._dev:
            self._dev[key] = torch.tensor([int(f) for f in key[1]], dtype=torch.int32, device=self.token_idx.device)
        return self._dev[key]

    def token_tiles(self, block_t: int):
        """(tile_seg int32 [n], tile_start int32 [n]): every BLOCK_T-row tile of every segment,
        so a launch has exactly as many programs as tiles, whatever the segment sizes."""
        key = ("tiles", block_t)
        if key not in self._dev:
            seg, start = [], []
            for s in range(self.num_segments):
                for t0 in range(self.seg_start[s], self.seg_start[s + 1], block_t):
                    seg.append(s)
                    start.append(t0)
            dev = self.token_idx.device
            self._dev[key] = (torch.tensor(seg, dtype=torch.int32, device=dev),
                              torch.tensor(start, dtype=torch.int32, device=dev))
        return self._dev[key]

    def token_chunks(self, seg_rows: tuple[int, ...], seg_width: tuple[int, ...]) -> TokenChunks:
        """Segment s cut into chunks of ``seg_rows[s]`` rows (the last one shorter; an empty
        segment has none). Each chunk of a segment with more than one chunk owns ``seg_width[s]``
        consecutive rows of the partial buffer (the adapter's rank; 1 for DoRA's dg). Cached."""
        key = ("chunks", tuple(seg_rows), tuple(seg_width))
        if key not in self._dev:
            c_seg, c_start, c_end, c_prow, r_seg, r_prow, r_n = [], [], [], [], [], [], []
            prow = 0
            for s in range(self.num_segments):
                t0, t1, rows = self.seg_start[s], self.seg_start[s + 1], seg_rows[s]
                n = -(-(t1 - t0) // rows)
                if n > 1:
                    r_seg.append(s)
                    r_prow.append(prow)
                    r_n.append(n)
                for start in range(t0, t1, rows):
                    c_seg.append(s)
                    c_start.append(start)
                    c_end.append(min(start + rows, t1))
                    c_prow.append(prow if n > 1 else -1)
                    prow += seg_width[s] if n > 1 else 0
            dev = self.token_idx.device
            cols = (c_seg, c_start, c_end, c_prow, r_seg, r_prow, r_n)
            self._dev[key] = TokenChunks(*(torch.tensor(c, dtype=torch.int32, device=dev) for c in cols),
                                         part_rows=prow)
        return self._dev[key]

    def segments(self):
        """Yield (adapter, rows) per segment: host-side iteration for the reference path."""
        for s, a in enumerate(self.seg_adapter):
            yield a, self.token_idx[self.seg_start[s]:self.seg_start[s + 1]]


def check_lora_inputs(x, weight, bias, lora_a, lora_b, layout, routing):
    """Shape/dtype checks shared by both paths; raises ValueError with the fix."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, K]; got shape {tuple(x.shape)}: flatten leading dims first")
    T, K = x.shape
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must be [N, K={K}]; got {tuple(weight.shape)}: pass the nn.Linear weight "
                         "whose in_features match x")
    N = weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [N={N}]; got {tuple(bias.shape)}")
    R = layout.total_rank
    if lora_a.shape != (R, K):
        raise ValueError(f"lora_a must be [sum R={R}, K={K}]; got {tuple(lora_a.shape)}: pack A_a rows in "
                         "layout order")
    if lora_b.shape != (N, R):
        raise ValueError(f"lora_b must be [N={N}, sum R={R}]; got {tuple(lora_b.shape)}: pack B_a columns in "
                         "layout order")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} dtype {t.dtype} != x dtype {x.dtype}: cast it with .to(x.dtype)")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move it to x's device")
    if routing.num_tokens != T:
        raise ValueError(f"routing covers {routing.num_tokens} tokens but x has T={T}: rebuild the routing "
                         "for this batch")
    if routing.seg_adapter and max(routing.seg_adapter) >= layout.num_adapters:
        raise ValueError(f"routing uses adapter {max(routing.seg_adapter)} but the layout has "
                         f"{layout.num_adapters} adapters: use ids in [-1, {layout.num_adapters - 1}]")
    bad = [r for r in layout.ranks if r > min(K, N)]
    if bad:
        raise ValueError(f"rank(s) {bad} exceed min(K={K}, N={N}): choose rank <= {min(K, N)}")


def check_column_scale_inputs(y, bias, scale, scaled, routing):
    """Shape/dtype checks of the DoRA column-scale epilogue; raises ValueError with the fix."""
    if y.dim() != 2:
        raise ValueError(f"y must be 2-D [T, N]; got shape {tuple(y.shape)}: flatten leading dims first")
    T, N = y.shape
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [N={N}]; got {tuple(bias.shape)}")
    if scale.dim() != 2 or scale.shape[1] != N:
        raise ValueError(f"scale must be [A, N={N}] (one row per adapter slot); got {tuple(scale.shape)}")
    if len(scaled) != scale.shape[0]:
        raise ValueError(f"scaled has {len(scaled)} flags but scale has {scale.shape[0]} rows: give one flag "
                         "per adapter slot")
    if not scale.dtype.is_floating_point:
        raise ValueError(f"scale must be a float tensor, got {scale.dtype}")
    for name, t in (("bias", bias), ("scale", scale)):
        if t is not None and t.device != y.device:
            raise ValueError(f"{name} is on {t.device} but y is on {y.device}: move it to y's device")
    if routing.num_tokens != T:
        raise ValueError(f"routing covers {routing.num_tokens} tokens but y has T={T}: rebuild the routing "
                         "for this batch")
    if routing.seg_adapter and max(routing.seg_adapter) >= len(scaled):
        raise ValueError(f"routing uses adapter {max(routing.seg_adapter)} but only {len(scaled)} slots are "
                         "described: give one scale row and flag per adapter slot")
