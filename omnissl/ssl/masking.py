"""Masks drawn by vectorized torch code on the objective's device from an explicit generator.

Legend: B batch, N tokens. Every mask is (B, N) bool, True = masked (`span_mask`) or kept (`random_keep`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _valid_lengths(padding_mask: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    if padding_mask is None:
        return torch.full((b,), n, dtype=torch.long, device=device)
    return (~padding_mask).sum(1)


def _lowest_k(scores: Tensor, k: Tensor) -> Tensor:
    """(B, N) scores, (B,) counts -> bool (B, N) marking each row's k[b] lowest scores."""
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < k[:, None]


def _max_spans(lengths: Tensor, mask_prob: float, span: int, min_spans: int) -> Tensor:
    """The most span starts `span_mask` can draw for rows of valid `lengths`: max(min_spans, int(p·T/span + u))
    with u < 1 is at most max(min_spans, floor(p·T/span) + 1)."""
    return torch.clamp(torch.floor(mask_prob * lengths.double() / span).long() + 1, min=min_spans)


def check_span_args(mask_prob: float, span: int, min_spans: int, *, min_frames: int | None = None) -> int:
    """Check an objective's `span_mask` settings when it is built (0 < mask_prob < 1, span >= 1) and return the
    fewest valid frames a row needs to be masked: the fewest T that `span_mask` accepts (T - span larger than
    the most spans it can draw, so that no row can be masked whole), and at least max(min_spans + 1,
    min_frames), min_frames defaulting to `span` (feed it to ShortUtteranceFilter)."""
    if not 0.0 < mask_prob < 1.0 or span < 1:
        raise ValueError(f"need 0 < mask_prob < 1 and mask_length >= 1, got {mask_prob}, {span}")
    fewest = span + 1
    while fewest - span <= int(_max_spans(torch.tensor([fewest]), mask_prob, span, min_spans)):
        fewest += 1  # T - span grows by 1 per frame and the span count by mask_prob / span < 1: this ends
    return max(min_spans + 1, span if min_frames is None else min_frames, fewest)


def span_mask(
    shape: tuple[int, int],
    *,
    padding_mask: Tensor | None = None,
    mask_prob: float = 0.65,
    span: int = 10,
    min_spans: int = 2,
    same_count: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """fairseq's `compute_mask_indices` (static spans, overlap allowed), vectorized over the batch.

    Per utterance of valid length T: num_spans = max(min_spans, int(mask_prob * T / span + U[0, 1))); span
    starts are drawn without replacement from [0, T - span); each covers `span` frames (clipped to T).
    Spans overlap, so p = 0.65, span = 10 masks about 1 - (1 - 0.065)^10 = 49 % of frames. With
    `same_count`, every row is subsampled at random to the smallest masked count in the batch, so masked
    frames reshape to (B, M, D). Padding is never masked. Defaults: wav2vec 2.0 base (REFERENCE §B.2).

    Rows too short to hold their spans (T - span not above the most spans they can draw, see
    `check_span_args` for the fewest frames) are a ValueError naming them. NOTE(ref): fairseq draws the starts
    of such rows from num_spans + 1 positions instead, which can mask the whole row; it then raises "the
    entire sequence is masked" at random (for T = 12, span 10, 2 spans: one draw in three). We refuse those
    rows up front, deterministically; a row we accept keeps at least its last frame unmasked (as fairseq's).
    """
    b, n = shape
    device = torch.device(device) if device is not None else (
        padding_mask.device if padding_mask is not None else torch.device("cpu"))
    lengths = _valid_lengths(padding_mask, b, n, device)
    too_short = lengths - span <= _max_spans(lengths, mask_prob, span, min_spans)
    if bool(too_short.any()):
        bad = too_short.nonzero().flatten().tolist()
        fewest = check_span_args(mask_prob, span, min_spans, min_frames=1)
        raise ValueError(
            f"rows {bad} have {lengths[too_short].tolist()} frames, too few for {min_spans}+ spans of {span} "
            f"at mask_prob {mask_prob} without masking a whole row (need at least {fewest}); filter shorter "
            "utterances (min_samples) or lower min_spans / mask_length"
        )
    u = torch.rand(b, generator=generator, device=device)
    num = torch.clamp((mask_prob * lengths.double() / span + u.double()).long(), min=min_spans)
    starts_range = lengths - span  # > num for every accepted row
    pos = torch.arange(n, device=device)[None]
    scores = torch.rand(b, n, generator=generator, device=device)
    scores = scores.masked_fill(pos >= starts_range[:, None], 2.0)  # out of range: never among the lowest
    starts = _lowest_k(scores, num)
    c = torch.cumsum(starts.long(), dim=1)
    shifted = torch.nn.functional.pad(c, (span, 0))[:, :n]
    mask = (c - shifted) > 0
    mask &= pos < lengths[:, None]
    if same_count:
        counts = mask.sum(1)
        target = counts.min()
        scores = torch.rand(b, n, generator=generator, device=device).masked_fill(~mask, 2.0)
        mask = _lowest_k(scores, target.expand(b))
    return mask


def block_mask_1d(
    shape: tuple[int, int],
    *,
    padding_mask: Tensor | None = None,
    mask_prob: float = 0.5,
    span: int = 5,
    adjust: float = 0.05,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """data2vec 2.0's 1-D block masks (fairseq `compute_block_mask_1d` with `require_same_masks`), vectorized.

    Per row of valid length T: int(T·(mask_prob + adjust) / span) centres drawn uniformly with replacement,
    each masking `span` frames around it (offsets -span//2 .. span - 1 - span//2, clipped to the row); then
    excess masked frames are unmasked at random, or missing ones masked at random, so that every row masks
    exactly int(T·mask_prob) of its frames, as fairseq. span 1 is a uniform random subset of that size
    (MAE-style `random_masking`, data2vec 2.0 text). Padding is never masked; `equal_keep` then gives every
    row of a padded batch the same number of kept tokens.
    Returns (B, N) bool, True = masked. Defaults: data2vec 2.0 audio base (p 0.5, length 5, adjust 0.05).
    """
    b, n = shape
    device = torch.device(device) if device is not None else (
        padding_mask.device if padding_mask is not None else torch.device("cpu"))
    lengths = _valid_lengths(padding_mask, b, n, device)
    pos = torch.arange(n, device=device)[None]
    valid = pos < lengths[:, None]
    num = int(int(lengths.max()) * (mask_prob + adjust) / span)
    mask = torch.zeros(b, n, dtype=torch.bool, device=device)
    if num > 0:
        # centres uniform over each row's valid frames; rows with fewer centres than the longest get theirs
        # from a per-row count (the extra draws are dropped)
        per_row = (lengths.double() * (mask_prob + adjust) / span).long()
        u = torch.rand(b, num, generator=generator, device=device)
        centres = (u * lengths[:, None]).long().clamp(max=n - 1)
        used = torch.arange(num, device=device)[None] < per_row[:, None]
        offsets = torch.arange(span, device=device) - span // 2
        idx = centres[..., None] + offsets  # (B, C, span)
        idx = torch.minimum(idx.clamp(min=0), (lengths - 1).clamp(min=0)[:, None, None])
        hit = used[..., None].expand_as(idx)
        mask.scatter_(1, idx.masked_fill(~hit, 0).flatten(1), hit.flatten(1))
    target = (lengths.double() * mask_prob).long()
    # exactly `target` per row: already-masked frames first (a random subset of them when too many), then
    # random unmasked valid frames; padding last, never chosen
    scores = torch.rand(b, n, generator=generator, device=device) + (~mask).float()
    scores = scores.masked_fill(~valid, 3.0)
    return _lowest_k(scores, target) & valid


def equal_keep(mask: Tensor, padding_mask: Tensor | None) -> Tensor:
    """The tokens a student that encodes kept tokens only is given: every unmasked valid token, plus each
    row's first padding positions so that every row keeps the same number (the longest row's count; rows
    masked in proportion to their length always have enough padding). Returns keep (B, N) bool."""
    if padding_mask is None:
        keep = ~mask
    else:
        keep = ~mask & ~padding_mask
        need = int(keep.sum(1).max()) - keep.sum(1)
        pad_rank = torch.cumsum(padding_mask.long(), dim=1)  # 1, 2, ... over each row's padding
        keep |= padding_mask & (pad_rank <= need[:, None])
    counts = keep.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"masks leave rows too little padding to keep equal counts: {counts.tolist()}")
    return keep


def random_keep(
    shape: tuple[int, int],
    *,
    mask_ratio: float = 0.75,
    padding_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """MAE's random masking: keep int(T·(1 - mask_ratio)) of each row's T valid tokens, chosen uniformly
    (MAE `random_masking`). Returns keep (B, N) bool; the masked (predicted) tokens are `~keep & ~padding_mask`.
    In a padded batch every row is masked at the rate of its own length, and shorter rows also keep their first
    padding positions (`equal_keep`), so that every row keeps the same number of tokens, the longest row's, as
    an encoder of kept tokens needs (padding stays padding there). Default ratio: MAE (He et al. 2022)."""
    b, n = shape
    device = torch.device(device) if device is not None else (
        padding_mask.device if padding_mask is not None else torch.device("cpu"))
    lengths = _valid_lengths(padding_mask, b, n, device)
    n_keep = (lengths.double() * (1.0 - mask_ratio)).long()
    if bool((n_keep < 1).any()):
        raise ValueError(f"mask_ratio {mask_ratio} keeps no token of a {int(lengths.min())}-token row")
    noise = torch.rand(b, n, generator=generator, device=device)
    if padding_mask is not None:
        noise = noise.masked_fill(padding_mask, 2.0)
    keep = _lowest_k(noise, n_keep)
    return equal_keep(~keep, padding_mask)


def _block_select(
    grid: tuple[int, int], batch: int, n_select: int, block: int, adjust: float,
    generator: torch.Generator | None, device: torch.device,
) -> Tensor:
    """Exactly `n_select` patches per row of a (rows, cols) grid, chosen in `block` x `block` squares: draw
    block centres to cover about n_select·(1 + adjust) patches, grow them into squares, then take the
    covered patches first (in random order) and fill up / cut down at random to exactly n_select."""
    rows, cols = grid
    n = rows * cols
    centres = max(1, int(round(n_select * (1.0 + adjust) / (block * block))))
    scores = torch.rand(batch, n, generator=generator, device=device)
    seeds = _lowest_k(scores, torch.full((batch,), centres, device=device)).float().view(batch, 1, rows, cols)
    pad_lo = (block - 1) // 2
    grown = torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(seeds, (pad_lo, block - 1 - pad_lo, pad_lo, block - 1 - pad_lo)), block, stride=1
    ).view(batch, n) > 0
    scores = torch.rand(batch, n, generator=generator, device=device) + (~grown).float() * 2.0
    return _lowest_k(scores, torch.full((batch,), n_select, device=device))


def _check_grid_counts(mask_prob: float, n: int) -> int:
    n_mask = int(round(mask_prob * n))
    if not 1 <= n_mask < n:
        raise ValueError(f"mask_prob {mask_prob} keeps {n - n_mask} of {n} patches; need at least one of each")
    return n_mask


def inverse_block_mask(
    grid: tuple[int, int],
    batch: int,
    *,
    mask_prob: float = 0.8,
    block: int = 3,
    adjust: float = 0.07,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """data2vec 2.0's inverse block masking for a (rows, cols) patch grid (Baevski et al. 2023; fairseq
    `compute_block_mask_2d` with `inverse_mask`): draw block centres, grow each into a `block` x `block`
    square of *kept* patches covering about (1 - mask_prob)·(1 + adjust) of the grid, then make every row
    keep exactly round((1 - mask_prob)·N) patches (`require_same_masks`): surplus kept patches are dropped
    at random, missing ones added at random. Returns keep (B, N) bool (row-major over the grid); the masked
    (predicted) patches are ~keep. Defaults: image base (mask_prob 0.8, 3 x 3 blocks, adjust 0.07).
    """
    n = grid[0] * grid[1]
    n_keep = n - _check_grid_counts(mask_prob, n)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _block_select(grid, batch, n_keep, block, adjust, generator, device)


def block_mask(
    grid: tuple[int, int],
    batch: int,
    *,
    mask_prob: float = 0.6,
    block: int = 3,
    adjust: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Block-wise masking of a patch grid (data2vec v1 vision, which uses BEiT's masking at 60 %): exactly
    round(mask_prob·N) *masked* patches per row, drawn in `block` x `block` squares. Returns mask (B, N) bool,
    True at masked patches.

    NOTE(ref): BEiT's generator grows rectangles of random area (>= 16 patches) and aspect ratio (0.3-3.3)
    one at a time until the budget is met; we draw fixed squares in one vectorized pass (no Python loop per
    sample) and make the count exact, as data2vec 2.0's `compute_block_mask_2d` does.
    """
    n = grid[0] * grid[1]
    n_mask = _check_grid_counts(mask_prob, n)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _block_select(grid, batch, n_mask, block, adjust, generator, device)


# ---------------------------------------------------------------------------------------------------------
# Masked language modelling (token ids)


def word_starts(ids: Tensor, *, starts: Tensor, special: Tensor) -> Tensor:
    """Where each word of token rows `ids` (B, N) begins, from per-vocabulary tables (V,) bool: `starts[v]`
    token v begins a word (byte-level BPE: its text begins with whitespace, the "Ġ" space marker; WordPiece:
    no "##"), `special[v]` a special token (a word of its own, and the token after it begins one). The first
    token of a row always begins a word. -> (B, N) bool."""
    tok_special = special[ids]
    after = torch.nn.functional.pad(tok_special[:, :-1], (1, 0), value=True)
    return starts[ids] | tok_special | after

def mlm_select(
    candidates: Tensor,
    *,
    mask_prob: float = 0.15,
    unit_starts: Tensor | None = None,
    span: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Which tokens a masked LM predicts: (B, N) bool, a subset of `candidates` (B, N) bool (the tokens that may
    be selected: not special, not padding).

    Tokens are grouped into units: single tokens, or whole words when `unit_starts` (B, N) bool marks where
    each word begins (`word_starts`). Per row, num = int(mask_prob · U / span + u), u ~ U[0, 1), of its U
    candidate units are drawn without replacement as span starts (fairseq `MaskTokensDataset`: an exact count
    per sequence, `mask_multiple_length` = span), and each start selects itself and the next span - 1 units
    (overlapping spans select fewer, as in fairseq; a span stops at a special token, padding or the row end).
    With span 1 the expected fraction of units selected is exactly mask_prob; the selected tokens are those of
    selected units that are candidates (a unit never crosses a special token or padding).
    """
    if not 0.0 < mask_prob < 1.0 or span < 1:
        raise ValueError(f"need 0 < mask_prob < 1 and span >= 1, got {mask_prob}, {span}")
    b, n = candidates.shape
    device = candidates.device
    if unit_starts is None:
        starts = torch.ones_like(candidates)
    else:  # a non-candidate is a unit of its own, and the token after it begins one
        if unit_starts.shape != candidates.shape:
            raise ValueError(f"unit_starts {tuple(unit_starts.shape)} and candidates {(b, n)} disagree")
        starts = unit_starts | ~candidates | torch.nn.functional.pad(~candidates[:, :-1], (1, 0), value=True)
    uid = starts.long().cumsum(1) - 1  # (B, N) unit index of every token
    first = starts & candidates  # one position per candidate unit
    units = first.sum(1)
    u = torch.rand(b, generator=generator, device=device, dtype=torch.float64)
    num = torch.minimum((mask_prob * units.double() / span + u).long(), units)
    scores = torch.rand(b, n, generator=generator, device=device).masked_fill(~first, 2.0)
    chosen = _lowest_k(scores, num)  # (B, N) positions of the chosen starts
    zeros = torch.zeros(b, n, dtype=torch.long, device=device)
    in_units = zeros.scatter_add(1, uid, chosen.long()) > 0  # (B, N) indexed by unit
    if span > 1:  # grow each start over the next span - 1 units, stopping at a special token or padding
        ordinary = zeros.scatter_add(1, uid, first.long()) > 0
        cur = in_units
        for _ in range(span - 1):
            cur = torch.nn.functional.pad(cur[:, :-1], (1, 0), value=False) & ordinary
            in_units = in_units | cur
    return in_units.gather(1, uid) & candidates


def mlm_corrupt(
    ids: Tensor,
    selected: Tensor,
    *,
    mask_id: int,
    random_ids: Tensor,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """BERT / RoBERTa corruption of the selected tokens: each independently becomes `mask_id` with probability
    `mask_frac`, a token drawn uniformly from `random_ids` (1-D: the ordinary, non-special ids; fairseq zeroes
    the specials' weights) with probability `random_frac`, and stays unchanged otherwise (80 / 10 / 10).
    ids, selected (B, N) -> corrupted ids (B, N); unselected tokens are never changed."""
    if mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
        raise ValueError(f"need mask_frac, random_frac >= 0 with a sum <= 1, got {mask_frac}, {random_frac}")
    if random_frac > 0 and random_ids.numel() == 0:
        raise ValueError("random replacement needs at least one ordinary (non-special) token id")
    u = torch.rand(ids.shape, generator=generator, device=ids.device)
    out = torch.where(selected & (u < mask_frac), torch.full_like(ids, mask_id), ids)
    if random_frac > 0:
        pick = torch.randint(0, random_ids.numel(), ids.shape, generator=generator, device=ids.device)
        rand = selected & (u >= mask_frac) & (u < mask_frac + random_frac)
        out = torch.where(rand, random_ids.to(ids.device)[pick], out)
    return out
