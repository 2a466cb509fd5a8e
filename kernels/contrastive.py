"""Fused Triton kernels of the DeepCUT contrastive loss (docs/spec.md, section 2).

Forward: one program per block of anchors streams over candidate tiles and keeps, per anchor,
an online log-sum-exp over the contrast set A(i) and another over the positives P(i) (for the
"logsumexp" forget pull). The mean similarity over P(i) and |P(i)| need no pairwise pass: they
come from per-class sums of the rows positives are drawn from (``positive_statistics``), which
halves the forward's per-pair instructions. Only O(M) statistics are written; the M x N
similarity matrix never exists.

Backward: dL/ds is computed once per pair, from similarities recomputed tile by tile with the
saved log-sum-exps, and written for one block of candidate columns at a time into a bounded
scratch (DS_SCRATCH_BYTES, in the inputs' dtype); two plain tiled products then take it to the
rows: dL/du += dS @ c and dL/dc += dS^T @ u, accumulated in fp32 in place. That is three
GEMM-equivalents (2MND each) at any D, against 2 (ceil(D / chunk) + 1) for kernels that
recompute S for every chunk of output features (a register-resident output caps the chunk near
256), and the mask and exp work is done once per pair instead of twice. No atomics: each
program owns its output tile, so the result is deterministic.

Logits are kept in base 2 (s2 = s * log2(e)) so the kernels use exp2/log2. The saved
log-sum-exps stay in base 2 too: they go back only to this module's backward, which subtracts
them from the same recomputed s2. A round trip through natural units would round them again,
and with large unnormalised logits (|s| ~ 1e5 and more) that rounding alone moves exp2(s2 - lse2)
by percents.

The masks are computed on the fly from labels, forget flags, instance ids and row indices.
"""
import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

# Read when the kernels are decorated, like Triton itself does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# With unit rows every similarity is at most 1, so base-2 logits are at most qk_scale and
# exp2(s2 - qk_scale) can serve as the shifted exponential of both sums (one exp per pair, no
# running maximum). The smallest value, at s = -1, is 2^(-2 qk_scale): it stays a normal fp32
# number (and the rescale 2^(qk_scale - lse) finite) while 2 log2(e) / temperature <= 58, i.e.
# for temperatures from 0.05 up; below that the kernels keep the running maximum.
FIXED_SHIFT_MIN_TEMPERATURE = 0.05

# The backward scales dS so that its largest possible magnitude is this (see backward): large
# enough that tiny coefficients stay normal numbers in fp16, small enough never to overflow it.
DS_SCALE = 2.0 ** 14

# constexpr globals may be read inside jitted code
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

def _config(block_m, block_n, block_k, warps, stages):
    tiles = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    if block_k:  # the narrow backward kernels hold whole rows: no chunk of D
        tiles["BLOCK_K"] = block_k
    return triton.Config(tiles, num_warps=warps, num_stages=stages)


# Tile configs a GPU may pick (autotuned: TUNE_KEY below), per kernel, architecture family (90:
# sm_90 and newer, wgmma; 80: sm_80/86/89, mma.sync, whose operand fragments take registers) and
# dtype group. Each compiles without register spills in every variant (benchmarks.kernel_cost;
# the ahead-of-time compile test builds them all). fp32 dots without TF32 run on the FMA pipes
# with both operands in registers, so fp32 takes small tiles. score_grad has tiles of its own: its
# dots match the forward's whatever the tile (the accumulation over D runs in the same order).
GPU_CONFIGS = {
    "forward": {
        (90, "half"): [_config(128, 64, 64, 8, 3), _config(64, 64, 64, 4, 3)],
        (80, "half"): [_config(64, 64, 32, 8, 2), _config(32, 64, 64, 4, 3)],
        (90, "fp32"): [_config(32, 64, 16, 4, 2)],
        (80, "fp32"): [_config(32, 64, 16, 4, 2)],
    },
    "score_grad": {
        (90, "half"): [_config(128, 64, 64, 8, 3), _config(64, 64, 64, 4, 3), _config(128, 128, 32, 8, 3)],
        (80, "half"): [_config(128, 64, 64, 8, 3), _config(64, 64, 64, 4, 3), _config(64, 64, 32, 4, 3)],
        (90, "fp32"): [_config(32, 64, 16, 4, 2)],
        (80, "fp32"): [_config(32, 64, 16, 4, 2)],
    },
    # narrow fp16/bf16 rows (resident_width): a resident block and an fp32 [block, BLOCK_D] accumulator
    "anchor_grad": {
        (90, "half"): [_config(128, 64, 0, 8, 2), _config(64, 64, 0, 4, 2), _config(64, 32, 0, 4, 3)],
        (80, "half"): [_config(64, 64, 0, 8, 2), _config(64, 32, 0, 8, 2)],
    },
    "candidate_grad": {
        (90, "half"): [_config(128, 64, 0, 8, 2), _config(32, 128, 0, 8, 2), _config(32, 64, 0, 4, 2)],
        (80, "half"): [_config(32, 64, 0, 4, 2), _config(32, 32, 0, 4, 2)],
    },
    "product": {
        (90, "half"): [_config(128, 128, 64, 8, 3), _config(128, 64, 64, 4, 4), _config(64, 128, 64, 4, 4)],
        (80, "half"): [_config(128, 128, 64, 8, 3), _config(128, 64, 64, 4, 4), _config(64, 128, 64, 4, 4)],
        (90, "fp32"): [_config(64, 64, 32, 8, 2), _config(64, 64, 16, 4, 2), _config(32, 64, 16, 4, 2)],
        (80, "fp32"): [_config(64, 64, 16, 4, 2), _config(32, 64, 16, 4, 2)],
    },
}


def gpu_configs(kernel, arch, dtype):
    """The configs ``kernel`` may take on sm_<arch> (e.g. 90) for inputs of ``dtype`` (a torch
    dtype or "fp32"/"fp16"/"bf16")."""
    group = "fp32" if dtype in (torch.float32, "fp32") else "half"
    return GPU_CONFIGS[kernel][90 if arch >= 90 else 80, group]


@functools.lru_cache(maxsize=None)
def device_arch(device_index):
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


# The interpreter runs one config only (autotune over several fails there); small GPU-legal
# tiles keep it quick and still exercise ragged edges at test sizes.
INTERPRET_FORWARD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64})]
INTERPRET_SCORE_GRAD_CONFIGS = INTERPRET_FORWARD_CONFIGS
INTERPRET_PRODUCT_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})]
INTERPRET_ROW_GRAD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})]

# The backward's dL/ds scratch: [M, columns] in the inputs' dtype, columns a power of two such that
# it holds at most this many bytes (at least MIN_SCRATCH_COLUMNS; never more than N needs). At
# 32k anchors in bf16: 2,048 columns. Wider blocks re-read and re-write dL/du fewer times
# (fp32, once per block), narrower ones keep the loss's memory near O((M + N) D).
DS_SCRATCH_BYTES = 128 << 20
MIN_SCRATCH_COLUMNS = 256
# Columns of one block that one score_grad program walks (the grid's second axis splits the rest)
SCORE_GRAD_SPAN = 1024
# float64 scratch of the per-class positive sums, per chunk of rows
POSITIVE_CHUNK_BYTES = 64 << 20


@triton.jit
def _similarity(x_ptr, x_rows, x_ok, x_stride, y_ptr, y_rows, y_ok, y_stride, D,
                BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """x[x_rows] @ y[y_rows]^T in fp32, looping over D in chunks of BLOCK_K."""
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    x_base = x_ptr + x_rows.to(tl.int64)[:, None] * x_stride
    y_base = y_ptr + y_rows.to(tl.int64)[None, :] * y_stride
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(x_base + ks[None, :], mask=x_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(y_base + ks[:, None], mask=k_ok[:, None] & y_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 dot operands wrongly
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _pair_masks(a_label, a_forget, a_inst, a_idx, c_label, c_forget, c_inst, c_idx,
                ignore_index, SELF: tl.constexpr):
    """Masks (in A(i), in P(i)) of a tile; the caller broadcasts anchor and candidate vectors."""
    usable = (a_label != ignore_index) & (c_label != ignore_index)
    same_class = a_label == c_label
    if SELF:
        # no self pair; a forget anchor also skips the other views of its own instance
        usable = usable & (a_idx != c_idx) & ~(a_forget & (a_inst == c_inst))
        c_retain = c_forget == 0
        # retain anchors see retain rows only; forget anchors also same-class forget rows
        in_a = usable & (c_retain | (a_forget & same_class))
        in_p = in_a & c_retain & (same_class ^ a_forget)
    else:  # a candidate bank is all retain rows and excludes nothing
        in_a = usable
        in_p = usable & (same_class ^ a_forget)
    return in_a, in_p


@triton.jit
def _online_lse(m, l, s2):
    """One step of a streaming base-2 log-sum-exp over each row of s2 (-inf: an entry left out)."""
    m_new = tl.maximum(m, tl.max(s2, 1))
    # rows that have kept nothing yet stay at -inf; shift them by 0 to avoid (-inf) - (-inf)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp2(m - shift) + tl.sum(tl.exp2(s2 - shift[:, None]), 1)
    return m_new, l


@triton.jit
def _finish_lse2(m, l):
    """Base-2 log-sum-exp from the base-2 running (max, sum); -inf for an empty set."""
    has_any = l > 0
    return tl.where(has_any, m + tl.log2(tl.where(has_any, l, 1.0)), float("-inf"))


@triton.jit
def _logit_grad(s2, in_a, in_p, a_forget, coef, pos_w, a_scale, p_scale, qk_scale,
                PULL_LSE: tl.constexpr, FIXED_SHIFT: tl.constexpr):
    """dL/ds for a tile: coef * (softmax over A - positive weights); per-anchor weights
    (``anchor_weights``) pre-broadcast."""
    q = tl.where(in_p, pos_w, 0.0)  # mean over positives
    if FIXED_SHIFT:  # one exp per pair, rescaled per row for each softmax
        e = tl.exp2(s2 - qk_scale)
        p_a = tl.where(in_a, e * a_scale, 0.0)
        if PULL_LSE:
            q = tl.where(a_forget, tl.where(in_p, e * p_scale, 0.0), q)
    else:
        # mask before exp2 so that entries outside the set cannot overflow
        p_a = coef * tl.exp2(tl.where(in_a, s2 - a_scale, float("-inf")))
        if PULL_LSE:  # forget anchors pull with a softmax over their positives instead
            q = tl.where(a_forget, coef * tl.exp2(tl.where(in_p & a_forget, s2 - p_scale, float("-inf"))), q)
    return p_a - q


@triton.jit
def _load_rows(LABEL, FORGET, INST, rows, ok, ignore_index, SELF: tl.constexpr):
    """Labels, forget flags and instance ids of some rows (out-of-range rows are ignored)."""
    label = tl.load(LABEL + rows, mask=ok, other=ignore_index)
    if SELF:
        forget = tl.load(FORGET + rows, mask=ok, other=0) != 0
        inst = tl.load(INST + rows, mask=ok, other=-1)
    else:  # candidate-bank case: flags and ids are not used by the masks
        forget = label != label
        inst = label
    return label, forget, inst


@triton.jit
def _anchor_block(A_ORDER, A_LABEL, A_FORGET, A_INST, COEF, POS_W, A_SCALE, P_SCALE, m0, M, ignore_index,
                  BLOCK_M: tl.constexpr):
    """What the backward needs of the anchors at positions [m0, m0 + BLOCK_M): positions, in
    range, rows of U, keys and ``anchor_weights``."""
    rows = m0 + tl.arange(0, BLOCK_M)
    ok = rows < M
    a_rows = tl.load(A_ORDER + rows, mask=ok, other=0)
    label = tl.load(A_LABEL + rows, mask=ok, other=ignore_index)
    forget = tl.load(A_FORGET + rows, mask=ok, other=0) != 0
    inst = tl.load(A_INST + rows, mask=ok, other=-1)
    coef = tl.load(COEF + rows, mask=ok, other=0.0)
    pos_w = tl.load(POS_W + rows, mask=ok, other=0.0)
    a_scale = tl.load(A_SCALE + rows, mask=ok, other=0.0)
    p_scale = tl.load(P_SCALE + rows, mask=ok, other=0.0)
    return rows, ok, a_rows, label, forget, inst, coef, pos_w, a_scale, p_scale


@triton.jit
def _row_tile(X, x_rows, x_ok, stride, D, UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
    """X[x_rows, :BLOCK_D], zero past D and in rows that are not ok."""
    ks = tl.arange(0, BLOCK_D)
    x = tl.load(X + x_rows.to(tl.int64)[:, None] * stride + ks[None, :], mask=x_ok[:, None] & (ks < D)[None, :],
                other=0.0)
    if UPCAST:  # the interpreter multiplies bf16 dot operands wrongly
        x = x.to(tl.float32)
    return x


@triton.jit
def _tile_logits(U, C, a_rows, row_ok, a_tile, C_ORDER, n0, N, D, stride_u, stride_c, qk_scale,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(candidate positions, in range, base-2 logits, candidate tile) of a block of anchors (rows
    ``a_rows`` of U) against the candidate tile at position n0 (rows C_ORDER[n0:n0 + BLOCK_N] of
    C). With BLOCK_D (>= D) the anchors are the resident ``a_tile`` and the candidates' whole rows
    are loaded at once (and returned); else both are streamed over D in chunks of BLOCK_K."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    c_rows = tl.load(C_ORDER + cols, mask=col_ok, other=0)
    if BLOCK_D:
        c_tile = _row_tile(C, c_rows, col_ok, stride_c, D, UPCAST, BLOCK_D)
        s2 = tl.dot(a_tile, tl.trans(c_tile), input_precision=PRECISION) * qk_scale
    else:
        c_tile = 0
        s2 = _similarity(U, a_rows, row_ok, stride_u, C, c_rows, col_ok, stride_c, D,
                         BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION) * qk_scale
    return cols, col_ok, s2, c_tile


@triton.jit
def _full_tile_grad(s2, a_label, c_label, coef, pos_w, a_scale, qk_scale, FIXED_SHIFT: tl.constexpr):
    """dL/ds of a full tile (retain anchors, every pair in A(i)): coef * (the softmax over A(i)
    less 1 / |P(i)| on the anchor's own class, its positives)."""
    positive = tl.where(a_label[:, None] == c_label[None, :], pos_w[:, None], 0.0)
    if FIXED_SHIFT:
        return tl.exp2(s2 - qk_scale) * a_scale[:, None] - positive
    return coef[:, None] * tl.exp2(s2 - a_scale[:, None]) - positive


@triton.jit
def _tile_masks(rows, a_label, a_forget, a_inst, cols, col_ok, C_LABEL, C_FORGET, C_INST, ignore_index,
                SELF: tl.constexpr):
    """(in A(i), in P(i)) of the anchors at positions ``rows`` against the candidates at ``cols``."""
    c_label, c_forget, c_inst = _load_rows(C_LABEL, C_FORGET, C_INST, cols, col_ok, ignore_index, SELF)
    return _pair_masks(a_label[:, None], a_forget[:, None], a_inst[:, None], rows[:, None],
                       c_label[None, :], c_forget[None, :], c_inst[None, :], cols[None, :], ignore_index, SELF)


@triton.jit
def _masked_tile_grad(s2, rows, a_label, a_forget, a_inst, cols, col_ok, C_LABEL, C_FORGET, C_INST, coef, pos_w,
                      a_scale, p_scale, qk_scale, ignore_index, SELF: tl.constexpr, PULL_LSE: tl.constexpr,
                      FIXED_SHIFT: tl.constexpr):
    """dL/ds of any tile: the masks from both sides' keys (``_tile_masks``), then ``_logit_grad``."""
    in_a, in_p = _tile_masks(rows, a_label, a_forget, a_inst, cols, col_ok, C_LABEL, C_FORGET, C_INST, ignore_index,
                             SELF)
    return _logit_grad(s2, in_a, in_p, a_forget[:, None], coef[:, None], pos_w[:, None], a_scale[:, None],
                       p_scale[:, None], qk_scale, PULL_LSE, FIXED_SHIFT)


@triton.jit
def _tile_plan(start, lo, hi, resident_end, other_end, DIAG: tl.constexpr, REST_MASKED: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """How the resident block of BLOCK_R rows at position ``start`` walks the other side's tiles
    of BLOCK_O rows that start in [lo, hi) (lo a multiple of BLOCK_O).

    Rows are ordered (``row_order``): retain anchors at positions [0, R), then forget anchors;
    in the self case candidates are the same positions, and a retain anchor's contrast set is
    exactly the other retain rows; in the candidate-bank case every candidate is in every
    contrast set. So where both sides are retain rows (the resident block ends by
    ``resident_end``, the other side's tile by ``other_end``) a tile needs no mask at all ("full"),
    except on the diagonal (DIAG: the self pairs); the last partial tile is masked; past
    ``other_end`` tiles are masked (REST_MASKED: the resident block is candidates, which forget
    anchors see) or have no pair (the resident block is retain anchors, which see no forget
    candidate). A resident block that is not all retain masks every tile.

    Full tiles: [lo, f1) and [f2, f_end); masked: [lo_m, m1) and [m2, m_end); tiles from z_lo on
    have no pair."""
    if start + BLOCK_R <= resident_end:
        full_end = tl.minimum(hi, other_end // BLOCK_O * BLOCK_O)
        tiles_end = tl.cdiv(tl.minimum(hi, other_end), BLOCK_O) * BLOCK_O
        if DIAG:
            diag_lo = start // BLOCK_O * BLOCK_O
            diag_hi = tl.cdiv(start + BLOCK_R, BLOCK_O) * BLOCK_O
        else:  # an empty diagonal at the end of the full tiles
            diag_lo = full_end
            diag_hi = full_end
        f1 = tl.maximum(lo, tl.minimum(diag_lo, full_end))
        f2 = tl.maximum(lo, diag_hi)
        f_end = tl.maximum(f2, full_end)
        lo_m = tl.maximum(lo, diag_lo)
        m1 = tl.maximum(lo_m, tl.minimum(diag_hi, tiles_end))
        m2 = tl.maximum(lo, tl.maximum(full_end, diag_hi))
        if REST_MASKED:
            m_end = tl.maximum(m2, hi)
            z_lo = hi
        else:
            m_end = tl.maximum(m2, tiles_end)
            z_lo = tl.maximum(lo, tiles_end)
    else:
        f1 = lo
        f2 = lo
        f_end = lo
        lo_m = lo
        m1 = hi
        m2 = hi
        m_end = hi
        z_lo = hi
    return f1, f2, f_end, lo_m, m1, m2, m_end, z_lo


@triton.jit
def _tile_start(t, lo, first_end, second_start, BLOCK: tl.constexpr):
    """Start of the t-th tile of the ranges [lo, first_end) and [second_start, ...)."""
    n0 = lo + t * BLOCK
    return tl.where(n0 < first_end, n0, n0 - first_end + second_start)


@triton.jit
def _forward_kernel(U, C, A_ORDER, C_ORDER, A_LABEL, A_FORGET, A_INST, C_LABEL, C_FORGET, C_INST, PULL_MEAN, COUNT,
                    LOSS, LSE_A, LSE_P,
                    M, N, R, D, stride_u, stride_c, qk_scale, ignore_index,
                    SELF: tl.constexpr, PULL_LSE: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, FIXED_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per anchor position: loss, base-2 log-sum-exps over A and P (rows in ``row_order``)."""
    m0 = tl.program_id(0) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    a_rows = tl.load(A_ORDER + rows, mask=row_ok, other=0)
    a_label = tl.load(A_LABEL + rows, mask=row_ok, other=ignore_index)
    a_forget = tl.load(A_FORGET + rows, mask=row_ok, other=0) != 0
    a_inst = tl.load(A_INST + rows, mask=row_ok, other=-1)
    a_tile = 0
    if BLOCK_D:  # narrow rows: the anchors stay resident while candidates stream past
        a_tile = _row_tile(U, a_rows, row_ok, stride_u, D, UPCAST, BLOCK_D)

    m_a = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_a = tl.zeros([BLOCK_M], tl.float32)
    m_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_p = tl.zeros([BLOCK_M], tl.float32)
    f1, f2, f_end, lo_m, m1, m2, m_end, _skipped = _tile_plan(m0, 0, N, R, R if SELF else N, SELF, False,
                                                              BLOCK_M, BLOCK_N)
    # the steady state: full tiles, every pair in A(i), none needs a mask
    for t in tl.range(0, tl.cdiv(f1 + f_end - f2, BLOCK_N)):
        n0 = _tile_start(t, 0, f1, f2, BLOCK_N)
        _c, _ok, s2, _t = _tile_logits(U, C, a_rows, row_ok, a_tile, C_ORDER, n0, N, D, stride_u, stride_c, qk_scale,
                                       UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D)
        if FIXED_SHIFT:
            l_a += tl.sum(tl.exp2(s2 - qk_scale), 1)
        else:
            m_a, l_a = _online_lse(m_a, l_a, s2)
    for t in tl.range(0, tl.cdiv(m1 - lo_m + m_end - m2, BLOCK_N)):
        n0 = _tile_start(t, lo_m, m1, m2, BLOCK_N)
        cols, col_ok, s2, _t = _tile_logits(U, C, a_rows, row_ok, a_tile, C_ORDER, n0, N, D, stride_u, stride_c,
                                            qk_scale, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D)
        in_a, in_p = _tile_masks(rows, a_label, a_forget, a_inst, cols, col_ok, C_LABEL, C_FORGET, C_INST,
                                 ignore_index, SELF)
        if FIXED_SHIFT:
            e = tl.exp2(s2 - qk_scale)
            l_a += tl.sum(tl.where(in_a, e, 0.0), 1)
            if PULL_LSE:
                l_p += tl.sum(tl.where(in_p & a_forget[:, None], e, 0.0), 1)
        else:
            m_a, l_a = _online_lse(m_a, l_a, tl.where(in_a, s2, float("-inf")))
            if PULL_LSE:
                m_p, l_p = _online_lse(m_p, l_p, tl.where(in_p & a_forget[:, None], s2, float("-inf")))

    counted = tl.load(COUNT + rows, mask=row_ok, other=0) > 0
    if FIXED_SHIFT:
        m_a = tl.full([BLOCK_M], 0.0, tl.float32) + qk_scale
        m_p = m_a
    lse_a = _finish_lse2(m_a, l_a)
    pull = tl.load(PULL_MEAN + rows, mask=row_ok, other=0.0)
    lse_p = tl.zeros([BLOCK_M], tl.float32)
    if PULL_LSE:
        lse_p = tl.where(a_forget & counted, _finish_lse2(m_p, l_p), 0.0)
        pull = tl.where(a_forget, lse_p, pull)
    tl.store(LOSS + rows, tl.where(counted, (lse_a - pull) * LN2, 0.0), mask=row_ok)
    tl.store(LSE_A + rows, lse_a, mask=row_ok)
    tl.store(LSE_P + rows, lse_p, mask=row_ok)


@triton.jit
def _score_grad_kernel(U, C, A_ORDER, C_ORDER, A_LABEL, A_FORGET, A_INST, C_LABEL, C_FORGET, C_INST,
                       COEF, POS_W, A_SCALE, P_SCALE, DS,
                       M, N, R, D, stride_u, stride_c, stride_ds, col_start, col_end, span, qk_scale, ignore_index,
                       SELF: tl.constexpr, PULL_LSE: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr, FIXED_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/ds (scaled: see backward) of BLOCK_M anchor positions against candidate positions
    [first, first + span) of the block [col_start, col_end), rounded to DS's dtype, into
    DS[anchor, candidate - col_start]; tiles walked as the forward walks them (``_tile_plan``).

    Tiles are computed as the forward computes them ([anchors, candidates], the same dot in the
    same order), so that s2 - lse2 is exactly 0 where the forward found the maximum: with large
    unnormalised logits, one rounding of s2 is a large error in exp2(s2 - lse2).
    """
    m0 = tl.program_id(0) * BLOCK_M
    rows, row_ok, a_rows, a_label, a_forget, a_inst, coef, pos_w, a_scale, p_scale = _anchor_block(
        A_ORDER, A_LABEL, A_FORGET, A_INST, COEF, POS_W, A_SCALE, P_SCALE, m0, M, ignore_index, BLOCK_M)
    first = col_start + tl.program_id(1) * span
    last = tl.minimum(first + span, col_end)
    out_rows = DS + rows.to(tl.int64)[:, None] * stride_ds - col_start
    f1, f2, f_end, lo_m, m1, m2, m_end, z_lo = _tile_plan(m0, first, last, R, R if SELF else N, SELF, False,
                                                          BLOCK_M, BLOCK_N)
    for t in tl.range(0, tl.cdiv(f1 - first + f_end - f2, BLOCK_N)):
        n0 = _tile_start(t, first, f1, f2, BLOCK_N)
        cols, _ok, s2, _t = _tile_logits(U, C, a_rows, row_ok, 0, C_ORDER, n0, N, D, stride_u, stride_c, qk_scale,
                                         UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, 0)
        ds = _full_tile_grad(s2, a_label, tl.load(C_LABEL + cols), coef, pos_w, a_scale, qk_scale, FIXED_SHIFT)
        tl.store(out_rows + cols[None, :], ds.to(DS.dtype.element_ty), mask=row_ok[:, None])
    for t in tl.range(0, tl.cdiv(m1 - lo_m + m_end - m2, BLOCK_N)):
        n0 = _tile_start(t, lo_m, m1, m2, BLOCK_N)
        cols, col_ok, s2, _t = _tile_logits(U, C, a_rows, row_ok, 0, C_ORDER, n0, N, D, stride_u, stride_c, qk_scale,
                                            UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, 0)
        ds = _masked_tile_grad(s2, rows, a_label, a_forget, a_inst, cols, col_ok, C_LABEL, C_FORGET, C_INST, coef,
                               pos_w, a_scale, p_scale, qk_scale, ignore_index, SELF, PULL_LSE, FIXED_SHIFT)
        col_ok = col_ok & (cols < last)
        tl.store(out_rows + cols[None, :], ds.to(DS.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    # past the retain candidates a retain anchor has no pair: dL/ds is 0
    zero = tl.zeros([BLOCK_M, BLOCK_N], DS.dtype.element_ty)
    for n0 in tl.range(z_lo, last, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_rows + cols[None, :], zero, mask=row_ok[:, None] & (cols < last)[None, :])


@triton.jit
def _anchor_grad_kernel(U, C, A_ORDER, C_ORDER, A_LABEL, A_FORGET, A_INST, C_LABEL, C_FORGET, C_INST,
                        COEF, POS_W, A_SCALE, P_SCALE, OUT,
                        M, N, R, D, stride_u, stride_c, stride_out, qk_scale, grad_scale, ignore_index,
                        SELF: tl.constexpr, PULL_LSE: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, FIXED_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Narrow rows (D <= BLOCK_D): OUT[anchor rows] += grad_scale * dS @ c for a resident block of
    BLOCK_M anchors, dS computed tile by tile as the forward computes S (``_tile_plan``) and
    multiplied at once into a [BLOCK_M, BLOCK_D] fp32 accumulator: no dL/ds leaves the chip."""
    m0 = tl.program_id(0) * BLOCK_M
    rows, row_ok, a_rows, a_label, a_forget, a_inst, coef, pos_w, a_scale, p_scale = _anchor_block(
        A_ORDER, A_LABEL, A_FORGET, A_INST, COEF, POS_W, A_SCALE, P_SCALE, m0, M, ignore_index, BLOCK_M)
    a_tile = _row_tile(U, a_rows, row_ok, stride_u, D, UPCAST, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    f1, f2, f_end, lo_m, m1, m2, m_end, _skipped = _tile_plan(m0, 0, N, R, R if SELF else N, SELF, False,
                                                              BLOCK_M, BLOCK_N)
    for t in tl.range(0, tl.cdiv(f1 + f_end - f2, BLOCK_N)):
        n0 = _tile_start(t, 0, f1, f2, BLOCK_N)
        cols, _ok, s2, c_tile = _tile_logits(U, C, a_rows, row_ok, a_tile, C_ORDER, n0, N, D, stride_u, stride_c,
                                             qk_scale, UPCAST, PRECISION, BLOCK_M, BLOCK_N, 0, BLOCK_D)
        ds = _full_tile_grad(s2, a_label, tl.load(C_LABEL + cols), coef, pos_w, a_scale, qk_scale, FIXED_SHIFT)
        acc = tl.dot(ds.to(c_tile.dtype), c_tile, acc, input_precision=PRECISION)
    for t in tl.range(0, tl.cdiv(m1 - lo_m + m_end - m2, BLOCK_N)):
        n0 = _tile_start(t, lo_m, m1, m2, BLOCK_N)
        cols, col_ok, s2, c_tile = _tile_logits(U, C, a_rows, row_ok, a_tile, C_ORDER, n0, N, D, stride_u, stride_c,
                                                qk_scale, UPCAST, PRECISION, BLOCK_M, BLOCK_N, 0, BLOCK_D)
        ds = _masked_tile_grad(s2, rows, a_label, a_forget, a_inst, cols, col_ok, C_LABEL, C_FORGET, C_INST, coef,
                               pos_w, a_scale, p_scale, qk_scale, ignore_index, SELF, PULL_LSE, FIXED_SHIFT)
        acc = tl.dot(ds.to(c_tile.dtype), c_tile, acc, input_precision=PRECISION)
    _add_rows(OUT, a_rows, row_ok, stride_out, D, acc * grad_scale, BLOCK_D)


@triton.jit
def _candidate_grad_kernel(U, C, A_ORDER, C_ORDER, A_LABEL, A_FORGET, A_INST, C_LABEL, C_FORGET, C_INST,
                           COEF, POS_W, A_SCALE, P_SCALE, OUT,
                           M, N, R, D, stride_u, stride_c, stride_out, qk_scale, grad_scale, ignore_index,
                           SELF: tl.constexpr, PULL_LSE: tl.constexpr, UPCAST: tl.constexpr,
                           PRECISION: tl.constexpr, FIXED_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Narrow rows: OUT[candidate rows] += grad_scale * dS^T @ u for a resident block of BLOCK_N
    candidates, walking the anchors' tiles of BLOCK_M; each S tile is the forward's ([anchors,
    candidates], the same dot), so exp2(s2 - lse2) matches it."""
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    c_rows = tl.load(C_ORDER + cols, mask=col_ok, other=0)
    c_label = tl.load(C_LABEL + cols, mask=col_ok, other=ignore_index)
    c_tile = _row_tile(C, c_rows, col_ok, stride_c, D, UPCAST, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    f1, f2, f_end, lo_m, m1, m2, m_end, _none = _tile_plan(n0, 0, M, R if SELF else N, R, SELF, True,
                                                           BLOCK_N, BLOCK_M)
    for t in tl.range(0, tl.cdiv(f1 + f_end - f2, BLOCK_M)):
        m0 = _tile_start(t, 0, f1, f2, BLOCK_M)
        rows, row_ok, a_rows, a_label, a_forget, a_inst, coef, pos_w, a_scale, p_scale = _anchor_block(
            A_ORDER, A_LABEL, A_FORGET, A_INST, COEF, POS_W, A_SCALE, P_SCALE, m0, M, ignore_index, BLOCK_M)
        a_tile = _row_tile(U, a_rows, row_ok, stride_u, D, UPCAST, BLOCK_D)
        s2 = tl.dot(a_tile, tl.trans(c_tile), input_precision=PRECISION) * qk_scale
        ds = _full_tile_grad(s2, a_label, c_label, coef, pos_w, a_scale, qk_scale, FIXED_SHIFT)
        acc = tl.dot(tl.trans(ds.to(a_tile.dtype)), a_tile, acc, input_precision=PRECISION)
    for t in tl.range(0, tl.cdiv(m1 - lo_m + m_end - m2, BLOCK_M)):
        m0 = _tile_start(t, lo_m, m1, m2, BLOCK_M)
        rows, row_ok, a_rows, a_label, a_forget, a_inst, coef, pos_w, a_scale, p_scale = _anchor_block(
            A_ORDER, A_LABEL, A_FORGET, A_INST, COEF, POS_W, A_SCALE, P_SCALE, m0, M, ignore_index, BLOCK_M)
        a_tile = _row_tile(U, a_rows, row_ok, stride_u, D, UPCAST, BLOCK_D)
        s2 = tl.dot(a_tile, tl.trans(c_tile), input_precision=PRECISION) * qk_scale
        ds = _masked_tile_grad(s2, rows, a_label, a_forget, a_inst, cols, col_ok, C_LABEL, C_FORGET, C_INST, coef,
                               pos_w, a_scale, p_scale, qk_scale, ignore_index, SELF, PULL_LSE, FIXED_SHIFT)
        acc = tl.dot(tl.trans(ds.to(a_tile.dtype)), a_tile, acc, input_precision=PRECISION)
    _add_rows(OUT, c_rows, col_ok, stride_out, D, acc * grad_scale, BLOCK_D)


@triton.jit
def _add_rows(OUT, out_rows, ok, stride, D, value, BLOCK_D: tl.constexpr):
    """OUT[out_rows, :D] += value (fp32; each row belongs to one program)."""
    ks = tl.arange(0, BLOCK_D)
    out = OUT + out_rows.to(tl.int64)[:, None] * stride + ks[None, :]
    out_ok = ok[:, None] & (ks < D)[None, :]
    tl.store(out, tl.load(out, mask=out_ok, other=0.0) + value, mask=out_ok)


@triton.jit
def _product_kernel(A, B, OUT, OUT_ROWS, B_ROWS, M, N, K, stride_a, stride_b, stride_out, scale,
                    TRANS_A: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[OUT_ROWS[m]] += scale * (op(A) @ B')[m] in fp32 for m < M, where B' [K, N] has the rows
    B[B_ROWS[k]] (rows of stride_b); op(A) is A [M, K] in rows of stride_a, or with TRANS_A the
    transpose of A [K, M] (dS^T without a transposed copy). The row indices map the loss's
    ordered positions (``row_order``) back to rows; each output row belongs to one program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    if TRANS_A:
        a_base = A + rows[:, None]
    else:
        a_base = A + rows.to(tl.int64)[:, None] * stride_a
    b_base = B + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if TRANS_A:
            a = tl.load(a_base + ks.to(tl.int64)[None, :] * stride_a, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            a = tl.load(a_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_rows = tl.load(B_ROWS + ks, mask=k_ok, other=0)
        b = tl.load(b_base + b_rows.to(tl.int64)[:, None] * stride_b, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 dot operands wrongly
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_rows = tl.load(OUT_ROWS + rows, mask=row_ok, other=0)
    out = OUT + out_rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(out, tl.load(out, mask=out_ok, other=0.0) + acc * scale, mask=out_ok)


# Autotuning. The key is D, the case (SELF), the forget pull, the dot precision, the shift and (added by
# Triton) the dtype of every tensor argument; and each power-of-two bucket of rows (the larger of
# M and N) has its own autotuner, so that the config timed at 4k rows is not reused at 1M.
TUNE_KEY = ["D", "SELF", "PULL_LSE", "PRECISION", "FIXED_SHIFT"]
# Above this many rows one launch takes long enough that timing every config costs minutes: the
# config the static cost model rates fastest for the kernel, case, pull, dtype and width runs
# untimed (``prechosen.json``, written by ``python -m benchmarks.kernel_cost --prechosen``;
# modelled on sm_90, not measured; older GPUs time them). DEEPCUT_TUNE_ALL=1 times every config at every size.
TIMED_TUNING_MAX_ROWS = 1 << 16
PRECHOSEN_FILE = Path(__file__).with_name("prechosen.json")
# fp16/bf16 rows of at most this many features are narrow (``resident_width``): the forward keeps
# its anchor block resident and the backward runs the two recomputing kernels (anchor_grad,
# candidate_grad) with fp32 accumulators in registers, no dL/ds scratch; wider rows, and fp32 rows
# (whose dots run on the FMA pipes with both operands in registers, which whole rows overflow),
# stream D in chunks and take the scratch and products. Prechosen configs: those modelled at
# D = 128 for narrow rows, at D = 768 for wide ones.
WIDE_D = 256
RESIDENT_DTYPES = (torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def prechosen_key(kernel, self_case, pull_lse, fixed_shift, dtype, dim):
    """The key of ``prechosen.json``: kernel/case/pull/shift/dtype/width, e.g.
    forward/self/pull/fixed/bf16/narrow."""
    return "/".join([kernel, "self" if self_case else "bank", "pull" if pull_lse else "mean",
                     "fixed" if fixed_shift else "running", DTYPE_NAMES[dtype], "wide" if dim > WIDE_D else "narrow"])


class TunedKernel:
    """``kernel[grid, rows](*args, **flags)`` launches the jitted kernel ``fn`` through the
    autotuner of the bucket of ``rows`` (``key``; interpreter: its one config). On a GPU the
    configs are those of the device's architecture and the dtype of ``dtype_arg``
    (``gpu_configs``); with ``prechosen``, buckets above TIMED_TUNING_MAX_ROWS on sm_90 take the
    prechosen one. ``restore``: the arguments that a launch updates in place, restored between
    timing runs. ``arch`` fixes the architecture (the device's by default) and ``gpu`` whether the
    GPU's configs and pruning apply (by default: unless in the interpreter)."""

    def __init__(self, name, fn, interpret_configs, key=TUNE_KEY, prechosen=True, restore=None, dtype_arg="U",
                 arch=None, gpu=not INTERPRET):
        self.name, self.fn, self.key, self.prechosen, self.restore = name, fn, key, prechosen, restore
        self.dtype_arg, self.arch, self.gpu = dtype_arg, arch, gpu
        every = [c for configs in GPU_CONFIGS[name].values() for c in configs]
        self.configs = list({id(c): c for c in every}.values()) if gpu else interpret_configs
        self.tuners = {}

    def _pruner(self, table):
        def prune(configs, named_args, **flags):
            tensor = named_args[self.dtype_arg]
            arch = self.arch or device_arch(tensor.device.index)
            allowed = gpu_configs(self.name, arch, tensor.dtype)
            if table is None or arch < 90 or os.environ.get("DEEPCUT_TUNE_ALL") == "1":
                return allowed
            index = table.get(prechosen_key(self.name, flags["SELF"], flags["PULL_LSE"], flags["FIXED_SHIFT"],
                                            tensor.dtype, named_args["D"]))
            return allowed if index is None else [allowed[index]]

        return prune

    def tuner(self, rows):
        bucket = max(1, int(rows) - 1).bit_length()  # rows <= 2 ** bucket
        if bucket not in self.tuners:
            prune = None
            if self.gpu:
                large = self.prechosen and 1 << bucket > TIMED_TUNING_MAX_ROWS and PRECHOSEN_FILE.exists()
                prune = dict(early_config_prune=self._pruner(json.loads(PRECHOSEN_FILE.read_text()) if large else None))
            self.tuners[bucket] = triton.autotune(configs=self.configs, key=self.key, prune_configs_by=prune,
                                                  restore_value=self.restore)(self.fn)
        return self.tuners[bucket]

    def __getitem__(self, grid_and_rows):
        grid, rows = grid_and_rows
        return self.tuner(rows)[grid]


forward_kernel = TunedKernel("forward", _forward_kernel, INTERPRET_FORWARD_CONFIGS)
score_grad_kernel = TunedKernel("score_grad", _score_grad_kernel, INTERPRET_SCORE_GRAD_CONFIGS)
anchor_grad_kernel = TunedKernel("anchor_grad", _anchor_grad_kernel, INTERPRET_ROW_GRAD_CONFIGS, restore=["OUT"])
candidate_grad_kernel = TunedKernel("candidate_grad", _candidate_grad_kernel, INTERPRET_ROW_GRAD_CONFIGS,
                                    restore=["OUT"])
# a GEMM: its best tile depends on the output width (N here, the loss's D), the operand layout and
# precision; one launch is short even at 1M rows, so every bucket is timed
product_kernel = TunedKernel("product", _product_kernel, INTERPRET_PRODUCT_CONFIGS,
                             key=["N", "TRANS_A", "PRECISION"], prechosen=False, restore=["OUT"], dtype_arg="A")


def dot_precision(dtype):
    """fp32 dots follow torch's matmul setting (TF32 only when the user allowed it); the
    setting does not affect fp16/bf16 dots, which always use tensor cores."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def row_order(labels, forget, candidate_labels, ignore_index):
    """(anchor order, candidate order, R): the rows the kernels walk, by position. Anchors: the
    usable retain rows (positions [0, R)), then the usable forget rows; candidates: the same
    positions in the self case, else the usable candidates. Rows labelled ignore_index are in
    no pair and left out. With this order most tiles need no mask (``_tile_plan``)."""
    usable = labels != ignore_index
    retain = torch.nonzero(usable & ~forget).flatten()
    a_order = torch.cat([retain, torch.nonzero(usable & forget).flatten()]).to(torch.int32)
    if candidate_labels is None:
        return a_order, a_order, retain.numel()
    return a_order, torch.nonzero(candidate_labels != ignore_index).flatten().to(torch.int32), retain.numel()


def _launch_args(u, labels, forget, instance_ids, candidates, candidate_labels, temperature,
                 pull_lse, ignore_index, unit_rows):
    """Shared tensors and flags of the forward and score_grad kernels (self case: candidates are
    u's rows), their per-row keys gathered into ``row_order``, and the anchor order."""
    self_case = candidates is None
    a_order, c_order, retain = row_order(labels, forget, candidate_labels, ignore_index)
    keys = (labels[a_order], forget[a_order].to(torch.int8), instance_ids[a_order])
    c = u if self_case else candidates.contiguous()
    c_keys = keys if self_case else (candidate_labels[c_order],) + keys[1:]
    tensors = (u, c, a_order, c_order) + keys + c_keys
    flags = dict(SELF=self_case, PULL_LSE=pull_lse, UPCAST=INTERPRET,
                 PRECISION="ieee" if INTERPRET else dot_precision(u.dtype),
                 FIXED_SHIFT=bool(unit_rows) and temperature >= FIXED_SHIFT_MIN_TEMPERATURE)
    scalars = (a_order.numel(), c_order.numel(), retain, u.shape[1], u.stride(0), c.stride(0))
    return tensors, scalars, flags, LOG2E.value / temperature, ignore_index


def _row_chunks(rows, dim):
    step = max(1, POSITIVE_CHUNK_BYTES // (8 * max(1, dim)))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def positive_statistics(u, labels, forget, instance_ids, candidates, candidate_labels, ignore_index):
    """(mean of u_i . c_j over the positives P(i), |P(i)|) per anchor: float64 and int32, mean 0
    where P(i) is empty. Per-class sums of the rows that positives are drawn from replace the
    pairwise pass (docs/spec.md, section 2): a retain anchor's positives are the usable retain
    rows of its class but itself; a forget anchor's those of the other classes, but rows of its
    own instance (self case); in the candidate-bank case every usable candidate, of the anchor's
    class (retain) or of the others (forget). Sums are float64, in chunks of rows."""
    self_case = candidates is None
    c = u if self_case else candidates
    c_labels = labels if self_case else candidate_labels
    wide, dim = torch.float64, u.shape[1]
    both = labels if self_case else torch.cat([labels, c_labels])
    classes, codes = torch.unique(both, return_inverse=True)
    a_codes, c_codes = codes[:labels.shape[0]], codes[labels.shape[0]:] if not self_case else codes
    drawn = (c_labels != ignore_index) & (~forget if self_case else True)  # rows any P(i) draws from
    class_sum = torch.zeros(classes.numel(), dim, device=u.device, dtype=wide)
    for rows in _row_chunks(c.shape[0], dim):
        keep = drawn[rows]
        class_sum.index_add_(0, c_codes[rows][keep], c[rows][keep].to(wide))
    class_count = torch.bincount(c_codes[drawn], minlength=classes.numel())
    total, total_count = class_sum.sum(0), class_count.sum()

    # rows a forget anchor excludes as its own instance: drawn rows sharing an id with one
    own = drawn & torch.isin(instance_ids, instance_ids[forget]) if self_case else drawn[:0]
    has_own = bool(own.any())  # one device sync, not one per chunk
    if has_own:  # not with the default ids (one per sample, all its views forgotten together)
        ids, id_codes = torch.unique(instance_ids[own], return_inverse=True)
        pair_keys, pair_codes = torch.unique(id_codes * classes.numel() + c_codes[own], return_inverse=True)
        id_sum = torch.zeros(ids.numel(), dim, device=u.device, dtype=wide).index_add_(0, id_codes, u[own].to(wide))
        pair_sum = torch.zeros(pair_keys.numel(), dim, device=u.device, dtype=wide).index_add_(
            0, pair_codes, u[own].to(wide))
        id_count, pair_count = torch.bincount(id_codes, minlength=ids.numel()), torch.bincount(pair_codes)

    mean = torch.zeros(labels.shape[0], device=u.device, dtype=wide)
    count = torch.zeros(labels.shape[0], device=u.device, dtype=torch.int64)
    for rows in _row_chunks(labels.shape[0], dim):
        k, is_forget, x = a_codes[rows], forget[rows], u[rows].to(wide)
        vector = torch.where(is_forget[:, None], total - class_sum[k], class_sum[k])
        size = torch.where(is_forget, total_count - class_count[k], class_count[k])
        if self_case:  # a usable retain anchor is one of its class's rows: not its own positive
            itself = drawn[rows] & ~is_forget
            vector = vector - x * itself[:, None]
            size = size - itself.long()
            if has_own:
                slot = torch.searchsorted(ids, instance_ids[rows]).clamp(max=ids.numel() - 1)
                mine = is_forget & (ids[slot] == instance_ids[rows])
                key = slot * classes.numel() + k
                pair = torch.searchsorted(pair_keys, key).clamp(max=pair_keys.numel() - 1)
                same = mine & (pair_keys[pair] == key)
                vector = vector - mine[:, None] * (id_sum[slot] - same[:, None] * pair_sum[pair])
                size = size - mine.long() * (id_count[slot] - same.long() * pair_count[pair])
        size = torch.where(labels[rows] != ignore_index, size, 0)
        mean[rows] = torch.where(size > 0, (x * vector).sum(1) / size.clamp(min=1), 0.0)
        count[rows] = size
    return mean, count.to(torch.int32)


def forward(u, labels, forget, instance_ids, candidates, candidate_labels, temperature,
            pull_lse, ignore_index, unit_rows=False):
    """Per-anchor loss, log-sum-exp over A, log-sum-exp over P (forget pull; both in base 2,
    for ``backward``) and |P|.

    u [M, D] and candidates [N, D] (or None for the self case) are contiguous rows in one
    of fp32/fp16/bf16; labels/ids are integer vectors, forget a bool vector. ``unit_rows``: the
    rows are unit vectors (FIXED_SHIFT_MIN_TEMPERATURE). The mean-positive term comes from
    ``positive_statistics``; the kernel streams the log-sum-exps.
    """
    u = u.contiguous()
    tensors, scalars, flags, qk_scale, ignore = _launch_args(
        u, labels, forget, instance_ids, candidates, candidate_labels, temperature, pull_lse,
        ignore_index, unit_rows)
    M, N, order = scalars[0], scalars[1], tensors[2]
    mean, count = positive_statistics(u, labels, forget, instance_ids, candidates, candidate_labels, ignore_index)
    pull_mean = (mean[order] * qk_scale).to(torch.float32)  # in the kernel's base-2 units
    stats = [torch.zeros(labels.shape[0], device=u.device, dtype=torch.float32) for _ in range(3)]
    if M:
        by_position = [torch.empty(M, device=u.device, dtype=torch.float32) for _ in range(3)]
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        forward_kernel[grid, max(M, N)](*tensors, pull_mean, count[order], *by_position, *scalars, qk_scale, ignore,
                                        BLOCK_D=resident_width(scalars[3], u.dtype), **flags)
        for full, part in zip(stats, by_position):
            full[order] = part
    loss, lse_a, lse_p = stats
    return loss, lse_a, lse_p, count


def anchor_weights(grad_loss, lse_a, lse_p, count, qk_scale, fixed_shift):
    """Per-anchor factors of dL/ds = coef * (softmax over A - weights over P), computed once per
    anchor here rather than in every tile: coef (the upstream gradient; 0 without positives,
    whose loss is constant), coef / |P|, and for each softmax the factor of a shifted exp2
    (fixed shift: coef * 2^(qk_scale - lse)) or the base-2 log-sum-exp to subtract (running)."""
    coef = torch.where(count > 0, grad_loss, 0.0)
    pos_w = coef / count.clamp(min=1)
    if not fixed_shift:
        return coef, pos_w, lse_a, lse_p
    scales = [torch.where(coef != 0, coef * torch.exp2(qk_scale - lse), 0.0) for lse in (lse_a, lse_p)]
    return (coef, pos_w, *scales)


def resident_width(dim, dtype):
    """BLOCK_D of the kernels that hold whole rows: D rounded up to a power of two (at least 16,
    the smallest dot) for narrow rows (WIDE_D, RESIDENT_DTYPES), or 0: streamed in chunks."""
    return triton.next_power_of_2(max(16, dim)) if dim <= WIDE_D and dtype in RESIDENT_DTYPES else 0


def scratch_columns(rows, cols, element_size):
    """Candidate columns per block of the backward's dL/ds scratch ([rows, columns]): the largest
    power of two within DS_SCRATCH_BYTES, at least MIN_SCRATCH_COLUMNS, at most what ``cols`` needs."""
    fit = DS_SCRATCH_BYTES // max(1, rows * element_size)
    columns = max(MIN_SCRATCH_COLUMNS, 1 << max(0, fit.bit_length() - 1))
    return min(columns, max(MIN_SCRATCH_COLUMNS, triton.next_power_of_2(max(1, cols))))


def _accumulate_product(out, out_rows, a, b, b_rows, scale, transpose_a, precision):
    """out[out_rows] += scale * op(a) @ b[b_rows] (op: transpose when ``transpose_a``) with the product kernel."""
    rows, inner = (a.shape[1], a.shape[0]) if transpose_a else a.shape
    if rows == 0 or inner == 0:
        return
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(b.shape[1], meta["BLOCK_N"]))  # noqa: E731
    product_kernel[grid, max(rows, inner)](a, b, out, out_rows, b_rows, rows, b.shape[1], inner, a.stride(0),
                                           b.stride(0), out.stride(0), scale, TRANS_A=transpose_a, UPCAST=INTERPRET,
                                           PRECISION=precision)


def backward(grad_loss, u, labels, forget, instance_ids, candidates, candidate_labels, lse_a,
             lse_p, count, temperature, pull_lse, ignore_index, unit_rows, need_anchor_grad,
             need_candidate_grad):
    """(dL/du, dL/dcandidates) in fp32 given dL/dloss_i; in the self case dL/du holds both
    sides and the second is None. A gradient that is not needed is None.

    Narrow rows (``resident_width``): anchor_grad and candidate_grad, each recomputing S. Wide rows:
    for each block of candidate columns J, dS[:, J] into the scratch (score_grad), then
    dL/du += dS[:, J] @ c[J] and dL/dc[J] += dS[:, J]^T @ u (product). In the self case both
    sides go into one buffer, the rows of z."""
    u = u.contiguous()
    # dS = coef * (softmax - positive weights) is rounded to the input dtype for the tensor-core
    # products. coef carries the upstream gradient and the group weight / count, easily 1e-6
    # and less, which puts most of dS below fp16's normal range (6e-5) or under its smallest
    # subnormal. Normalise the coefficients so the largest is DS_SCALE (|dS| <= DS_SCALE, far
    # inside fp16), and undo the scale in the products' fp32 epilogue.
    grad_loss = grad_loss.contiguous().to(torch.float32)
    largest = grad_loss.abs().max().item() if grad_loss.numel() else 0.0
    scale = DS_SCALE / largest if largest > 0 else 1.0
    grad_loss = grad_loss * scale
    tensors, scalars, flags, qk_scale, ignore = _launch_args(
        u, labels, forget, instance_ids, candidates, candidate_labels, temperature, pull_lse,
        ignore_index, unit_rows)
    M, N, D = scalars[0], scalars[1], scalars[3]
    c, a_order, c_order = tensors[1:4]
    self_case = candidates is None
    du = torch.zeros(u.shape[0], D, device=u.device, dtype=torch.float32) if need_anchor_grad else None
    # the self case adds the candidate term into du in place (its rows are z's rows)
    dc = du if self_case else (torch.zeros(c.shape[0], D, device=u.device, dtype=torch.float32) if need_candidate_grad else None)
    grad_scale = 1.0 / (temperature * scale)
    stats = anchor_weights(grad_loss[a_order], lse_a[a_order], lse_p[a_order], count[a_order], qk_scale,
                           flags["FIXED_SHIFT"])
    if resident_width(D, u.dtype) and M and N:  # narrow rows: two recomputing kernels, nothing in between
        args = (*stats, M, N, scalars[2], D, u.stride(0), c.stride(0))
        width = dict(BLOCK_D=resident_width(D, u.dtype), **flags)
        if du is not None:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
            anchor_grad_kernel[grid, max(M, N)](*tensors, *args[:4], du, *args[4:], du.stride(0), qk_scale,
                                                grad_scale, ignore, **width)
        if dc is not None:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
            candidate_grad_kernel[grid, max(M, N)](*tensors, *args[:4], dc, *args[4:], dc.stride(0), qk_scale,
                                                   grad_scale, ignore, **width)
        return (du, None) if self_case else (du, dc)
    columns = scratch_columns(M, N, u.element_size())
    ds = torch.empty(M, columns, device=u.device, dtype=u.dtype) if M and N and (du is not None or dc is not None) else None
    for start in range(0, N if ds is not None else 0, columns):
        end = min(start + columns, N)
        span = min(SCORE_GRAD_SPAN, end - start)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(end - start, span))  # noqa: E731
        score_grad_kernel[grid, max(M, N)](*tensors, *stats, ds, *scalars[:4], u.stride(0), c.stride(0),
                                           ds.stride(0), start, end, span, qk_scale, ignore, **flags)
        block, columns_rows = ds[:, :end - start], c_order[start:end]
        if du is not None:
            _accumulate_product(du, a_order, block, c, columns_rows, grad_scale, False, flags["PRECISION"])
        if dc is not None:
            _accumulate_product(dc, columns_rows, block, u, a_order, grad_scale, True, flags["PRECISION"])
    return (du, None) if self_case else (du, dc)
