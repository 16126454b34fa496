"""Joint embedding of a stereo frame: the encoder of the `frames` stereo layout.

Math (shape letters: B batch, L time steps, C channels, V vocabulary, D embedding width):

    out[b, l, :] = scale * sum_c weight[c, tokens[b, l, c], :]        out: (B, L, D)

one position per frame, one (V, D) table per channel (the `interleave` layout,
kernels.embed_interleave, gives each channel sample its own position instead: twice the
positions, one shared table). C = 1 is a plain scaled embedding. tokens may have any strides
(the trainer passes `batch[:, :L]`, a non-contiguous view) and are never copied by the forward.

Backward (tokens get no gradient), per channel c:

    grad_weight[c, v, :] = scale * sum_{(b, l) : tokens[b, l, c] == v} grad_out[b, l, :]

which is embed_interleave's backward with C = 1 on that channel's tokens (grad_out (B, L, D) is
its (B, L*1, D)). So this op has no backward kernel of its own: kernels.embed_interleave's
launcher runs once per channel on the view tokens[..., c:c+1], and its fast (fp32 atomics) and
deterministic (fixed-order sums) modes and its large-V paths (V = 65536, 16-bit audio) all
apply as documented there. Cost: grad_out is read C times (once per channel).

Dtype policy: tokens int8/uint8/int16/int32/int64; weight float32 or bfloat16; out_dtype float32
or bfloat16 (default weight.dtype). The forward sums the C rows in fp32 in channel order
(acc = w[0][t0]; acc = acc + w[1][t1]; ...), then multiplies by `scale` and rounds once to
out_dtype (kernels.reference.embed_frames does exactly this, so fp32 output is bitwise equal
to it). The backward accumulates in fp32 and rounds once to weight.dtype. `scale` is a Python
number; the kernels take it as an fp32 scalar (as torch does when it multiplies an fp32 tensor).

Out-of-range tokens: `check=True` (default) does one host-side aminmax check
(kernels.reference.check_tokens: a host sync) and raises ValueError on CPU and CUDA alike, inside
the custom op (so it also holds in a torch.compile'd graph). `check=False` skips it (no sync: for
CUDA-graph capture during generation); the kernel still never reads out of bounds: a frame with
any token outside [0, V) comes out NaN (the invalid channel's row is loaded as NaN), and the
backward drops the whole frame from every channel's gradient (its tokens are set to -1 for all
channels in one elementwise pass, which embed_interleave's backward skips), so a NaN upstream
gradient at that frame reaches no table.

Interpreter notes (TRITON_INTERPRET=1 on CPU, how CI runs this file): the forward kernel has no
loop with a run-time bound (the channel loop is a tl.static_range over the constexpr C), so it
needs none of embed_interleave's `while` twins; bf16 outputs are rounded by truncation there
(1 bf16 ulp from the GPU's round-to-nearest), as in every kernel of this package.

Reference: kernels.reference.embed_frames (plain indexing; its autograd is the oracle of the
backward).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._utils import choose_backend, configs, device_guard, nvtx_range, same_device
from kernels.embed_interleave import MAX_ROWS, TOKEN_DTYPES, WEIGHT_DTYPES, _block, embed_interleave_bwd

OP = "embed_frames"

# ----------------------------------------------------------------------------------------------
# Triton kernel (forward; the backward is embed_interleave's, per channel)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _channel_rows(tok_row, w_ptr, c, V, l_mask, d, d_mask,
                  stride_tok_c, stride_w_c, stride_w_v, stride_w_d):
    """Channel c's table rows of a block of frames, in fp32 (NaN where the token is outside [0, V))."""
    cc = tl.full((), c, tl.int64)     # int64 before the address arithmetic (c * V * D can pass 2^31)
    tok = tl.load(tok_row + cc * stride_tok_c, mask=l_mask, other=0).to(tl.int64)
    valid = l_mask & (tok >= 0) & (tok < V)
    w = tl.load(w_ptr + cc * stride_w_c + tok[:, None] * stride_w_v + d[None, :] * stride_w_d,
                mask=valid[:, None] & d_mask[None, :], other=float("nan"))
    return w.to(tl.float32)


# BLOCK_L frames x BLOCK_D per program, as embed_interleave's forward (BLOCK_R rows); C is a
# constexpr (1..4 in practice): the channel loop unrolls, so the C gathers are in flight together.
@triton.autotune(
    configs=configs([
        triton.Config({"BLOCK_L": 64}, num_warps=4),
        triton.Config({"BLOCK_L": 32}, num_warps=4),
        triton.Config({"BLOCK_L": 128}, num_warps=4),
        triton.Config({"BLOCK_L": 128}, num_warps=8),
        triton.Config({"BLOCK_L": 256}, num_warps=8),
    ]),
    key=["C", "D", "BLOCK_D"],
)
@triton.jit(do_not_specialize=["L", "V"])
def _embed_frames_fwd_kernel(
    tok_ptr, w_ptr, out_ptr,
    L, V, D, scale,
    stride_tok_b, stride_tok_l, stride_tok_c,
    stride_w_c, stride_w_v, stride_w_d,
    C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B * cdiv(L, BLOCK_L), cdiv(D, BLOCK_D)); a program writes BLOCK_L frames of one batch.
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    n_lb = tl.cdiv(L, BLOCK_L)
    b = pid // n_lb                                  # one scalar division per program
    lb = pid - b * n_lb
    l = (lb * BLOCK_L).to(tl.int32) + tl.arange(0, BLOCK_L)
    l_mask = l < L
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    tok_row = tok_ptr + b * stride_tok_b + l.to(tl.int64) * stride_tok_l
    # channel order, first row taken as is (not 0 + row: that would turn -0.0 into +0.0), so the
    # fp32 sum is the reference's bit for bit
    acc = _channel_rows(tok_row, w_ptr, 0, V, l_mask, d, d_mask,
                        stride_tok_c, stride_w_c, stride_w_v, stride_w_d)
    for c in tl.static_range(1, C):
        acc = acc + _channel_rows(tok_row, w_ptr, c, V, l_mask, d, d_mask,
                                  stride_tok_c, stride_w_c, stride_w_v, stride_w_d)
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    rows = b * L + l.to(tl.int64)
    tl.store(out_ptr + rows[:, None] * D + d[None, :], out, mask=l_mask[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------

def embed_frames_fwd(tokens: torch.Tensor, weight: torch.Tensor, scale: float = 1.0,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launch the forward kernel: (B, L, C) tokens (any strides), (C, V, D) weight -> (B, L, D)."""
    B, L, C = tokens.shape
    _, V, D = weight.shape
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    out = torch.empty((B, L, D), device=weight.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    BLOCK_D = _block(D, 16, 128)
    grid = lambda meta: (B * triton.cdiv(L, meta["BLOCK_L"]), triton.cdiv(D, BLOCK_D))  # noqa: E731
    with nvtx_range("sashimi/embed_frames/fwd"), device_guard(weight.device):
        _embed_frames_fwd_kernel[grid](
            tokens, weight, out,
            L, V, D, float(scale),
            tokens.stride(0), tokens.stride(1), tokens.stride(2),
            weight.stride(0), weight.stride(1), weight.stride(2),
            C=C, BLOCK_D=BLOCK_D,
        )
    return out


def _channel_tokens(tokens: torch.Tensor, V: int, mask_invalid: bool) -> list[torch.Tensor]:
    """Per channel, the (B, L, 1) tokens embed_interleave's backward takes. mask_invalid: a frame
    with any token outside [0, V) gets -1 in every channel (one elementwise pass, no host sync),
    so it adds to no table; else views of `tokens` (no copy)."""
    C = tokens.shape[-1]
    if mask_invalid:
        t = tokens.long()          # before the comparison: 2**40 must not wrap into [0, V)
        frame_ok = ((t >= 0) & (t < V)).all(dim=-1, keepdim=True)
        tokens = torch.where(frame_ok, t, -1)
    return [tokens[..., c:c + 1] for c in range(C)]


def embed_frames_bwd(grad_out: torch.Tensor, tokens: torch.Tensor, num_embeddings: int,
                     weight_dtype: torch.dtype, scale: float = 1.0, deterministic: bool = False,
                     mask_invalid: bool = True) -> torch.Tensor:
    """grad_out (B, L, D) -> grad_weight (C, V, D) in weight_dtype: embed_interleave's backward
    (kernels.embed_interleave.embed_interleave_bwd) once per channel, stacked.

    mask_invalid: drop every frame that has a token outside [0, V) from all channels (what
    check=False needs). False skips that pass: only for tokens already checked (check=True), where
    it changes nothing."""
    B, L, C = tokens.shape
    V, D = num_embeddings, grad_out.shape[-1]
    if grad_out.shape != (B, L, D) or grad_out.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{OP}: grad_out must be float32/bfloat16 of shape {(B, L, D)}, "
                         f"got {grad_out.dtype} {tuple(grad_out.shape)}")
    with nvtx_range("sashimi/embed_frames/bwd"):
        per_channel = [embed_interleave_bwd(grad_out, tok, V, weight_dtype, scale, deterministic)
                       for tok in _channel_tokens(tokens, V, mask_invalid and B * L > 0)]
        if not per_channel:
            return torch.zeros((0, V, D), device=grad_out.device, dtype=weight_dtype)
        return torch.stack(per_channel)


# ----------------------------------------------------------------------------------------------
# torch.library registration (what lets torch.compile(fullgraph=True) trace a caller)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("sashimi_kernels::embed_frames_fwd", mutates_args=())
def _embed_frames_fwd_op(tokens: torch.Tensor, weight: torch.Tensor, scale: float,
                         out_dtype: torch.dtype, deterministic: bool, check: bool) -> torch.Tensor:
    if check:   # a host sync; runs at run time even inside a compiled graph (the op is opaque)
        reference.check_tokens(tokens, weight.shape[1], OP)
    return embed_frames_fwd(tokens, weight, scale, out_dtype)


@_embed_frames_fwd_op.register_fake
def _(tokens, weight, scale, out_dtype, deterministic, check):
    B, L, C = tokens.shape
    return weight.new_empty((B, L, weight.shape[2]), dtype=out_dtype)


@torch.library.custom_op("sashimi_kernels::embed_frames_bwd", mutates_args=())
def _embed_frames_bwd_op(grad_out: torch.Tensor, tokens: torch.Tensor, num_embeddings: int,
                         weight_dtype: torch.dtype, scale: float, deterministic: bool,
                         mask_invalid: bool) -> torch.Tensor:
    return embed_frames_bwd(grad_out, tokens, num_embeddings, weight_dtype, scale, deterministic,
                            mask_invalid)


@_embed_frames_bwd_op.register_fake
def _(grad_out, tokens, num_embeddings, weight_dtype, scale, deterministic, mask_invalid):
    return grad_out.new_empty((tokens.shape[-1], num_embeddings, grad_out.shape[-1]), dtype=weight_dtype)


def _setup_context(ctx, inputs, output):
    tokens, weight, scale, out_dtype, deterministic, check = inputs
    ctx.save_for_backward(tokens)
    ctx.num_embeddings = weight.shape[1]
    ctx.weight_dtype = weight.dtype
    ctx.scale = scale
    ctx.deterministic = deterministic
    ctx.mask_invalid = not check     # checked tokens are all valid: no masking pass needed


def _backward(ctx, grad_out):
    (tokens,) = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = _embed_frames_bwd_op(grad_out, tokens, ctx.num_embeddings, ctx.weight_dtype,
                                           ctx.scale, ctx.deterministic, ctx.mask_invalid)
    return None, grad_weight, None, None, None, None


_embed_frames_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def embed_frames(tokens: torch.Tensor, weight: torch.Tensor, scale: float = 1.0,
                 out_dtype: torch.dtype | None = None, deterministic: bool = False,
                 check: bool = True, backend: str = "auto") -> torch.Tensor:
    """Joint embedding of each frame's channels: (B, L, C) tokens, (C, V, D) tables -> (B, L, D).

    out[b, l] = scale * sum_c weight[c, tokens[b, l, c]] (one position per stereo frame; C = 1
    is a plain scaled embedding).

    Args:
        tokens: integer tensor (B, L, C) (int64, int32, int16, int8, uint8), any strides, C >= 1.
        weight: (C, V, D) float32 or bfloat16, one table per channel; receives the gradient.
        scale: a Python number folded into forward and backward (e.g. sqrt(D)).
        out_dtype: float32 or bfloat16 (default weight.dtype); the rows are summed in fp32 in
            channel order, scaled and rounded once.
        deterministic: backward summed in a fixed order (bitwise identical run to run) instead
            of with fp32 atomics.
        check: raise ValueError for a token outside [0, V) (one host sync). With check=False
            (e.g. under CUDA-graph capture) nothing is checked on the Triton path: a frame with
            such a token comes out NaN and gives no table any gradient; memory is never read out
            of bounds. The reference path always checks.
        backend: "auto" | "triton" | "reference" (kernels._utils.choose_backend).

    Example:
        >>> x = embed_frames(batch[:, :L], tables, scale=8.0, out_dtype=torch.bfloat16)
        >>> x.shape  # (B, L, D)
    """
    if not isinstance(tokens, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(f"{OP}: tokens and weight must be tensors")
    if tokens.dim() != 3:
        raise ValueError(f"{OP}: tokens must be 3-D (B, L, C), got shape {tuple(tokens.shape)}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise ValueError(f"{OP}: tokens must be an integer tensor (int64, int32, int16, int8, uint8), "
                         f"got {tokens.dtype}")
    if tokens.shape[-1] < 1:
        raise ValueError(f"{OP}: tokens must have at least one channel (C >= 1), got shape "
                         f"{tuple(tokens.shape)}")
    if weight.dim() != 3 or weight.shape[0] != tokens.shape[-1]:
        raise ValueError(f"{OP}: weight must be 3-D (C, V, D) with C = {tokens.shape[-1]} (the tokens' "
                         f"channels), got shape {tuple(weight.shape)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{OP}: weight must be float32 or bfloat16, got {weight.dtype}")
    if out_dtype is None:
        out_dtype = weight.dtype
    if out_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{OP}: out_dtype must be torch.float32 or torch.bfloat16 (or None), got {out_dtype!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"{OP}: scale must be a Python float, got {type(scale).__name__}")
    device = same_device(OP, tokens=tokens, weight=weight)
    B, L, C = tokens.shape
    if B * L > MAX_ROWS:   # the backward's per-channel row indices are int32
        raise ValueError(f"{OP}: B*L = {B * L} frames is more than {MAX_ROWS}")
    path = choose_backend(OP, backend, device)
    if path == "reference":
        return reference.embed_frames(tokens, weight, float(scale), out_dtype)
    return _embed_frames_fwd_op(tokens, weight, float(scale), out_dtype, bool(deterministic), bool(check))
