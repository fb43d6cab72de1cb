"""The shared transformer trunk and its positional options.

One trunk serves every objective: post-LN blocks (wav2vec 2.0 / HuBERT base, RoBERTa) and pre-LN blocks
(wav2vec 2.0 large, ViT, MAE), attention through `F.scaled_dot_product_attention` with a key-padding mask,
every layer's output on request, layerdrop identical on every rank for a given update, optional activation
checkpointing per block.

Legend: B batch, N tokens, D width, L layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from omnissl.backbones.config import recorded
from omnissl.ops import Dropout, dropout, segment_runs, take_rows


class Attention(nn.Module):
    """Multi-head self-attention with one fused input projection.

    `explicit_cpu` (class switch, on by default): on the CPU the attention core is the plain math, softmax of
    q·kᵀ/√d with masked keys filled in place, `ops.dropout`, · v, where torch's SDPA measured slower:
    - in training with attention dropout, where SDPA has no fused CPU kernel and runs its math fallback, which
      adds a "safe" softmax (isneginf + all + where over B·H·N·N), scales k as well as q, copies q/k/v and,
      with a key-padding mask, builds an additive float mask (-11 % on the attention core fwd+bwd at 8 x 128);
    - in bf16 / fp16 (autocast) with gradients, with or without dropout, where SDPA takes its CPU flash kernel,
      whose backward is slow next to two AMX GEMMs and a softmax: SDPA's fwd+bwd of the core is 1.6-4.4x
      the explicit one's at the benches' shapes (trunk 8 x 128 and 2 x 512, wav2vec 2.0 4 x 249, MAE's encoder
      32 x 50 and decoder 32 x 197; `bench/cpu_kernels.py`). In fp32 without dropout SDPA stays (0.8-1.25x:
      its flash kernel wins at long N), and so it does without gradients (inference).
    CUDA always takes `F.scaled_dot_product_attention` (fused kernels), so this never changes a GPU run.

    Packed rows (`Transformer` segments) give a block-diagonal bool mask, computed over the full N x N scores
    on every device (on CUDA SDPA picks its memory-efficient kernel, which takes arbitrary masks). Kernels
    that skip the masked blocks exist in torch 2.11 (`torch.nn.attention.varlen.varlen_attn`: flash, CUDA,
    fp16/bf16, no attention dropout; `flex_attention` block masks, efficient only under torch.compile) but are
    not used: they were not runnable or testable on the CPU machine this was built on.
    """

    explicit_cpu = True

    def __init__(self, dim: int, heads: int, *, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None, queries: Tensor | None = None,
                layout: tuple[Tensor, int, int] | None = None) -> Tensor:
        """x (B, N, D), attn_mask (B, 1, 1, N) bool (True = attend; or (B, 1, N | Q, N) per query, packed
        rows' block-diagonal mask, see `Transformer` segments) -> (B, N, D). queries (B, Q) int64: only
        these positions query (their outputs are returned, (B, Q, D)); keys and values are still every token.
        layout (idx (T,), B, N): x is (T, D), the valid tokens of a padded batch at flat positions idx of
        (B·N): the projections run on those T rows only, the attention core on the padded (B, N) layout
        (padding as zeros, masked by attn_mask); returns (T, D)."""
        # split + views, not a (3, B, H, N, D) rearrange: split's backward writes the three gradients straight
        # into one (B, N, 3D) buffer (one cat), where unbinding a permuted view stacks them and then copies
        # the stack back into the Linear's layout (two passes over B·N·3D values per block).
        qkv = self.qkv(x)
        if layout is not None:
            idx, b, n = layout
            qkv = qkv.new_zeros(b * n, qkv.shape[-1]).index_copy(0, idx, qkv).view(b, n, -1)
        qkv = qkv.chunk(3, dim=-1)
        if queries is not None:
            qkv = (take_rows(qkv[0], queries),) + qkv[1:]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in qkv)
        p = self.dropout if self.training else 0.0
        half = q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
        if q.device.type == "cpu" and self.explicit_cpu and (p > 0.0 or half):
            s = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
            if attn_mask is not None:  # the lowest finite value, not -inf: a row with no key gives junk, not NaN
                s = s.masked_fill_(~attn_mask, torch.finfo(s.dtype).min)
            y = torch.matmul(dropout(s.softmax(-1), p), v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        y = y.transpose(1, 2).flatten(2)
        return self.out(y if layout is None else y.flatten(0, 1).index_select(0, layout[0]))


class Block(nn.Module):
    """A transformer block, post-LN (`x = LN(x + f(x))`) or pre-LN (`x = x + f(LN(x))`)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        *,
        pre_norm: bool,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        act_dropout: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = Attention(dim, heads, dropout=attn_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.drop = Dropout(dropout)
        self.act_drop = Dropout(act_dropout)

    def ffn(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act_drop(F.gelu(self.fc1(x)))))

    def forward(self, x: Tensor, attn_mask: Tensor | None, queries: Tensor | None = None,
                layout: tuple[Tensor, int, int] | None = None) -> tuple[Tensor, Tensor]:
        """x (B, N, D) -> (output (B, N, D), feed-forward output before its residual (B, N, D)).
        queries (B, Q) int64: compute the block's output only at these positions ((B, Q, D) each); they
        still attend to every token. The same values as the full block's rows, for less work.
        layout: x is the (T, D) valid tokens of a padded batch (see `Attention`); outputs are (T, D)."""
        if self.pre_norm:
            a = self.drop(self.attn(self.norm1(x), attn_mask, queries, layout))
            x = (x if queries is None else take_rows(x, queries)) + a
            h = self.ffn(self.norm2(x))
            return x + h, h
        a = self.drop(self.attn(x, attn_mask, queries, layout))
        x = self.norm1((x if queries is None else take_rows(x, queries)) + a)
        h = self.ffn(x)
        return self.norm2(x + h), h


@recorded
class Transformer(nn.Module):
    """A stack of blocks with the input LayerNorm (post-LN) or final LayerNorm (pre-LN) of fairseq/HF.

    Defaults are wav2vec 2.0 / HuBERT / RoBERTa base (Baevski et al. 2020, Table 1 / fairseq base configs):
    768 wide, 12 layers, 12 heads, FFN 3072, dropouts 0.1, post-LN.
    """

    def __init__(
        self,
        *,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        ffn_dim: int = 3072,
        pre_norm: bool = False,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        act_dropout: float = 0.0,
        layerdrop: float = 0.0,
        eps: float = 1e-5,
        checkpoint_activations: bool = False,
        layerdrop_seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= layerdrop < 1.0:
            raise ValueError(f"layerdrop must be in [0, 1), got {layerdrop}")
        self.dim, self.depth, self.pre_norm = dim, depth, pre_norm
        self.layerdrop, self.layerdrop_seed = layerdrop, layerdrop_seed
        self.checkpoint_activations = checkpoint_activations
        self.num_updates = 0
        self.blocks = nn.ModuleList(
            Block(dim, heads, ffn_dim, pre_norm=pre_norm, dropout=dropout, attn_dropout=attn_dropout,
                  act_dropout=act_dropout, eps=eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = Dropout(dropout)
        self.apply(init_bert_params)

    def set_num_updates(self, num_updates: int) -> None:
        """Called once per optimizer step by SSLModule: seeds layerdrop so every rank drops the same layers."""
        self.num_updates = num_updates

    def dropped_layers(self) -> Tensor:
        """(L,) bool: which blocks this update skips. Identical across ranks: seeded by (seed, update) only."""
        if not self.training or self.layerdrop == 0.0:
            return torch.zeros(self.depth, dtype=torch.bool)
        g = torch.Generator().manual_seed(self.layerdrop_seed * 1_000_003 + self.num_updates)
        return torch.rand(self.depth, generator=g) < self.layerdrop

    @staticmethod
    def document_layout(runs: Tensor, rows: Tensor, layout: tuple[Tensor, int, int],
                        mask: Tensor) -> tuple[tuple[Tensor, int, int], Tensor]:
        """Packed rows' attention core without cross-document scores: (layout, mask) placing the T valid tokens
        (flat indices `rows` of (B, N), `runs` (B, N) their documents 0, 1, ... per row, -1 at padding) one
        document per row, (idx (T,), S documents, L = the longest), with the key mask (S, 1, 1, L), when
        S·L² < B·N² scores; else the given row `layout` and block-diagonal `mask`. The same values either way
        (a document's attention sees exactly its tokens); only the amount of masked work differs."""
        b, n = layout[1], layout[2]
        run = runs.flatten().index_select(0, rows)  # (T,) document within its row
        per_row = runs.amax(1) + 1  # (B,) documents per row
        doc = (per_row.cumsum(0) - per_row).index_select(0, rows // n) + run  # (T,) document in the batch
        length = torch.bincount(doc, minlength=int(per_row.sum()))  # (S,)
        s, longest = length.numel(), int(length.max())
        if s * longest * longest >= b * n * n:
            return layout, mask
        pos = torch.arange(doc.numel(), device=doc.device) - (length.cumsum(0) - length).index_select(0, doc)
        keys = torch.arange(longest, device=doc.device)[None] < length[:, None]
        return (doc * longest + pos, s, longest), keys[:, None, None, :]

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, return_layers: bool | str = False,
        queries: Tensor | None = None, segments: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor] | None, list[Tensor] | None]:
        """x (B, N, D) with positions added, padding_mask (B, N) True at padding.

        segments (B, N) int64, packed rows (several documents per row): a token attends only to the tokens
        with its segment id (each id one contiguous run: `ops.segment_runs`, which the Encoder applies; padding
        gets its own id -1, so a padding query still has keys and stays finite). The attention mask is then
        block-diagonal (B, 1, N, N) bool instead of the key mask (B, 1, 1, N): SDPA / the explicit CPU path
        compute the full N x N scores and mask them (no kernel that skips masked blocks is used; see
        `Attention`). With queries, the unpadded blocks' attention core runs one document per row instead
        when that computes fewer scores (`document_layout`).

        Returns (last, layers, ffn): layers are L + 1 outputs when return_layers is truthy (a skipped block
        repeats its input so indices stay fixed); for a pre-LN trunk the last is after the final LayerNorm,
        except with return_layers="blocks" (every entry a raw block output, as data2vec averages them); ffn
        are the L feed-forward outputs when return_layers="ffn".

        queries (B, Q) int64 positions: only their outputs are wanted, so the last block computes only those
        rows (they still attend to every token) and last is (B, Q, D), the full trunk's rows at `queries`;
        e.g. MAE's decoder, whose loss reads the removed patches only. Not with return_layers. In a padded
        batch, no output at padding is returned then, so the blocks before the last run unpadded: their
        LayerNorms, projections and feed-forward layers on the valid tokens only (packed), attention on the
        padded layout with the key mask; valid rows are the same values, a queried padding row is junk (finite)
        as it is without unpadding.
        """
        if queries is not None:
            if return_layers:
                raise ValueError("queries (the last block at some positions only) cannot return every layer")
            if queries.dim() != 2 or queries.shape[0] != x.shape[0] or queries.dtype != torch.int64:
                raise ValueError(f"queries must be (B={x.shape[0]}, Q) int64 positions, got "
                                 f"{tuple(queries.shape)} {queries.dtype}")
        attn_mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        last_mask = attn_mask  # the last block's, whose queries may be a subset of the rows
        if segments is not None:
            if segments.shape != x.shape[:2] or segments.dtype != torch.int64:
                raise ValueError(f"segments must be (B, N) = {tuple(x.shape[:2])} int64, got "
                                 f"{tuple(segments.shape)} {segments.dtype}")
            segments = segment_runs(segments, padding_mask)[0]  # 0, 1, ... per run, -1 at padding
            attn_mask = (segments[:, :, None] == segments[:, None, :])[:, None]  # (B, 1, N, N) block-diagonal
            last_mask = attn_mask if queries is None else \
                (segments.gather(1, queries)[:, :, None] == segments[:, None, :])[:, None]  # (B, 1, Q, N)
        # unpadded blocks (all but the last, with queries): x is (T, D), the valid tokens; `rows` are their flat
        # indices in (B, N), `layout` where the attention core puts them: the padded rows (idx = rows, B, N,
        # with `unpadded_mask`), or for packed rows one row per document (idx, S documents, L the longest, key
        # mask) when that has fewer scores, S·L² < B·N² (rows much longer than their documents)
        layout, rows, unpadded_mask, shape = None, None, attn_mask, x.shape[:2]
        if queries is not None and self.depth > 1 and (padding_mask is not None or segments is not None):
            b, n = shape
            rows = (torch.arange(b * n, device=x.device) if padding_mask is None
                    else (~padding_mask).flatten().nonzero().squeeze(1))
            layout = (rows, b, n)
            if segments is not None:
                layout, unpadded_mask = self.document_layout(segments, rows, layout, attn_mask)
            if layout[0] is rows and padding_mask is None:  # nothing to unpad
                layout, rows = None, None
            else:
                x = x.flatten(0, 1).index_select(0, rows)  # (T, D)
        if not self.pre_norm:
            x = self.norm(x)
        x = self.drop(x)
        layers = [x] if return_layers else None
        ffn = [] if return_layers == "ffn" else None
        skip = self.dropped_layers().tolist()
        for i, (block, skipped) in enumerate(zip(self.blocks, skip)):
            q = queries if i == self.depth - 1 else None
            mask = attn_mask if q is None else last_mask
            if layout is not None and q is None:
                mask = unpadded_mask
            if q is not None and layout is not None:  # the last block: back to (B, N, D), zeros at padding
                b, n = shape
                x = x.new_zeros(b * n, x.shape[-1]).index_copy(0, rows, x)
                x, layout = x.view(b, n, -1), None
            if skipped:
                x = x if q is None else take_rows(x, q)
                h = torch.zeros_like(x)
            elif self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x, h = checkpoint(block, x, mask, queries=q, layout=layout, use_reentrant=False)
            else:
                x, h = block(x, mask, queries=q, layout=layout)  # keywords: a block's hooks see (x, mask)
            if layers is not None:
                layers.append(x)
            if ffn is not None:
                ffn.append(h)
        if queries is not None and self.depth == 0:
            x = take_rows(x, queries)
        if self.pre_norm:
            x = self.norm(x)
            if layers is not None and return_layers != "blocks":
                layers[-1] = x
        return x, layers, ffn


def init_bert_params(module: nn.Module) -> None:
    """BERT/fairseq initialization: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()


# ---------------------------------------------------------------------------------------------------------
# Positional options. Each maps x (B, N, D) -> x + positions, given the padding mask and the 2-D grid.


@recorded
class ConvPositions(nn.Module):
    """wav2vec 2.0's convolutional relative position embedding: a weight-normed grouped Conv1d (kernel 128,
    16 groups), same-padding, GELU, added to the input (Baevski et al. 2020, sec. 2)."""

    def __init__(self, dim: int, *, kernel: int = 128, groups: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4 * (1.0 - dropout) / (kernel * dim)))
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if kernel % 2 == 0 else 0

    relative = True

    def forward(self, x: Tensor, padding_mask: Tensor | None, grid: tuple[int, int] | None = None) -> Tensor:
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        h = self.conv(rearrange(x, "b n d -> b d n"))
        if self.trim:
            h = h[..., : -self.trim]
        return x + rearrange(F.gelu(h), "b d n -> b n d")


@recorded
class LearnedPositions(nn.Module):
    """Learned absolute positions (RoBERTa, BERT), N(0, 0.02) init.

    grid: (rows, cols) of a fixed patch layout (ViT's table, max_len = rows * cols): inputs must have exactly
    that grid, since the first N rows of a row-major table are not the positions of a smaller grid.
    frozen: the table is not trained (requires_grad False), e.g. a fixed sin-cos table imported as values
    (HF ViTMAE).
    """

    relative = False

    def __init__(self, dim: int, *, max_len: int = 512, grid: tuple[int, int] | None = None,
                 frozen: bool = False) -> None:
        super().__init__()
        if grid is not None:
            grid = (int(grid[0]), int(grid[1]))
            if grid[0] * grid[1] != max_len:
                raise ValueError(f"grid {grid} must hold max_len = {max_len} positions")
        self.max_len, self.grid = max_len, grid
        self.weight = nn.Parameter(torch.randn(max_len, dim) * 0.02, requires_grad=not frozen)

    def forward(self, x: Tensor, padding_mask: Tensor | None, grid: tuple[int, int] | None = None,
                ids: Tensor | None = None) -> Tensor:
        """ids (B, N) int64: each token's position (packed rows restart them per document); default 0..N-1."""
        n = x.shape[1]
        if self.grid is not None and (grid is None or tuple(grid) != self.grid):
            raise ValueError(f"these learned positions are for a {self.grid} patch grid, got {grid}")
        if n > self.max_len:
            raise ValueError(f"sequence of {n} tokens exceeds the {self.max_len} learned positions")
        if ids is not None:
            return x + F.embedding(ids, self.weight).to(x.dtype)
        return x + self.weight[:n].to(x.dtype)


@recorded
class SinCosPositions(nn.Module):
    """Fixed sin-cos positions: 1-D over the sequence (Vaswani et al. 2017), or 2-D over a (rows, cols)
    patch grid with half the channels per axis (MAE, He et al. 2022). Computed for any size.

    2-D layout: [sin | cos of the row index | sin | cos of the column index]; cols_first puts the column half
    first, the layout of MAE's released `get_2d_sincos_pos_embed` (its h/w naming swap) and so of HF ViTMAE
    checkpoints.
    """

    relative = False

    def __init__(self, dim: int, *, two_d: bool = False, cols_first: bool = False) -> None:
        super().__init__()
        if dim % (4 if two_d else 2):
            raise ValueError(f"sin-cos positions need a width divisible by {4 if two_d else 2}, got {dim}")
        if cols_first and not two_d:
            raise ValueError("cols_first only applies to 2-D sin-cos positions (two_d=True)")
        self.dim, self.two_d, self.cols_first = dim, two_d, cols_first

    @staticmethod
    def table(dim: int, pos: Tensor) -> Tensor:
        """pos (N,) float -> (N, dim) as [sin | cos] with frequencies 1 / 10000^(2i/dim)."""
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1).float()

    def forward(self, x: Tensor, padding_mask: Tensor | None, grid: tuple[int, int] | None = None,
                ids: Tensor | None = None) -> Tensor:
        """ids (B, N) int64 (1-D only): each token's position (packed rows restart them); default 0..N-1."""
        n = x.shape[1]
        if ids is not None:
            if self.two_d:
                raise ValueError("position ids (packed rows) are for 1-D sin-cos positions, not a 2-D grid")
            return x + self.table(self.dim, ids.flatten()).view(*ids.shape, self.dim).to(x.dtype)
        if not self.two_d:
            return x + self.table(self.dim, torch.arange(n, device=x.device)).to(x.dtype)
        if grid is None or grid[0] * grid[1] != n:
            raise ValueError(f"2-D sin-cos positions need a grid with rows*cols == {n} tokens, got {grid}")
        rows, cols = torch.meshgrid(
            torch.arange(grid[0], device=x.device), torch.arange(grid[1], device=x.device), indexing="ij"
        )
        half = self.dim // 2
        axes = (cols, rows) if self.cols_first else (rows, cols)
        pe = torch.cat([self.table(half, axes[0].flatten()), self.table(half, axes[1].flatten())], dim=1)
        return x + pe.to(x.dtype)
