"""Triton source of the fused mesh-convolution kernels (:mod:`vqhps.mesh.fused` imports it on first use,
so the package imports where Triton is missing). One program per output vertex (forward), per input
vertex (input gradient) or per (vertex, neighbour) (kernel gradient); products in fp32 accumulators at
the ``PRECISION`` that :func:`vqhps.mesh.fused.dot_precision` selects."""
import triton
import triton.language as tl


@triton.jit
def tiles(C_IN, C_OUT, BLOCK: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Offsets of a batch tile and of the (padded) input and output channels, with their masks."""
    ci = tl.arange(0, BLOCK_CI)
    co = tl.arange(0, BLOCK_CO)
    return tl.arange(0, BLOCK), ci, co, ci < C_IN, co < C_OUT


@triton.jit
def batch_rows(b0, offs_b, B):
    """Rows of the batch tile starting at ``b0`` (int64) and which of them exist."""
    rows = (b0 + offs_b).to(tl.int64)
    return rows, rows < B


@triton.jit
def vertex_tile(ptr, v, rows, b_ok, ch, ch_ok, B, C):
    """Pointers and mask of vertex ``v``'s (rows, channels) tile in an (N, B, C)-contiguous tensor."""
    return ptr + v * B * C + rows[:, None] * C + ch[None, :], b_ok[:, None] & ch_ok[None, :]


@triton.jit
def forward(x_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr, B, C_IN, C_OUT, K,
            sxb, sxn, sxc, ELU: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
    """out[v] = sum_k x[index[v, k]] @ W[v, k] + bias, then ELU if ``ELU``; out is (N_out, B, C_out)."""
    v = tl.program_id(0).to(tl.int64)
    offs_b, ci, co, ci_ok, co_ok = tiles(C_IN, C_OUT, BLOCK, BLOCK_CI, BLOCK_CO)
    w_mask = ci_ok[:, None] & co_ok[None, :]
    bias = tl.load(bias_ptr + co, mask=co_ok, other=0.0)
    w_base = w_ptr + v * K * C_IN * C_OUT
    for b0 in range(0, B, BLOCK):
        rows, b_ok = batch_rows(b0, offs_b, B)
        acc = tl.zeros((BLOCK, BLOCK_CO), dtype=tl.float32)
        for k in range(K):
            u = tl.load(idx_ptr + v * K + k).to(tl.int64)
            xt = tl.load(x_ptr + u * sxn + rows[:, None] * sxb + ci[None, :] * sxc,
                         mask=b_ok[:, None] & ci_ok[None, :], other=0.0)
            w = tl.load(w_base + (k * C_IN + ci[:, None]) * C_OUT + co[None, :], mask=w_mask, other=0.0)
            acc = tl.dot(xt, w, acc, input_precision=PRECISION)
        acc = acc + bias[None, :]
        if ELU:
            acc = tl.where(acc > 0, acc, tl.exp(tl.minimum(acc, 0.0)) - 1.0)
        out, out_mask = vertex_tile(out_ptr, v, rows, b_ok, co, co_ok, B, C_OUT)
        tl.store(out, acc, mask=out_mask)


@triton.jit
def input_grad(g_ptr, rev_ptr, cnt_ptr, w_ptr, dx_ptr, B, C_IN, C_OUT, K, D,
               PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
    """dx[u] = sum over the (v, k) reading u of g[v] @ W[v, k]^T; ``rev`` holds v * K + k, its first
    ``cnt[u]`` entries valid; g is (N_out, B, C_out), dx (N_in, B, C_in)."""
    u = tl.program_id(0).to(tl.int64)
    offs_b, ci, co, ci_ok, co_ok = tiles(C_IN, C_OUT, BLOCK, BLOCK_CI, BLOCK_CO)
    wt_mask = co_ok[:, None] & ci_ok[None, :]
    n = tl.load(cnt_ptr + u)
    for b0 in range(0, B, BLOCK):
        rows, b_ok = batch_rows(b0, offs_b, B)
        acc = tl.zeros((BLOCK, BLOCK_CI), dtype=tl.float32)
        for j in range(n):
            vk = tl.load(rev_ptr + u * D + j).to(tl.int64)
            v = vk // K
            g, g_mask = vertex_tile(g_ptr, v, rows, b_ok, co, co_ok, B, C_OUT)
            gt = tl.load(g, mask=g_mask, other=0.0)
            wt = tl.load(w_ptr + vk * C_IN * C_OUT + ci[None, :] * C_OUT + co[:, None], mask=wt_mask, other=0.0)
            acc = tl.dot(gt, wt, acc, input_precision=PRECISION)
        dx, dx_mask = vertex_tile(dx_ptr, u, rows, b_ok, ci, ci_ok, B, C_IN)
        tl.store(dx, acc, mask=dx_mask)


@triton.jit
def kernel_grad(x_ptr, idx_ptr, g_ptr, dw_ptr, B, C_IN, C_OUT, K, sxb, sxn, sxc,
                PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr):
    """dW[v, k] = sum over the batch of x[:, index[v, k]]^T @ g[v]; one program per (v, k)."""
    v = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    offs_b, ci, co, ci_ok, co_ok = tiles(C_IN, C_OUT, BLOCK, BLOCK_CI, BLOCK_CO)
    u = tl.load(idx_ptr + v * K + k).to(tl.int64)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    for b0 in range(0, B, BLOCK):
        rows, b_ok = batch_rows(b0, offs_b, B)
        xt = tl.load(x_ptr + u * sxn + rows[None, :] * sxb + ci[:, None] * sxc,
                     mask=ci_ok[:, None] & b_ok[None, :], other=0.0)
        g, g_mask = vertex_tile(g_ptr, v, rows, b_ok, co, co_ok, B, C_OUT)
        gt = tl.load(g, mask=g_mask, other=0.0)
        acc = tl.dot(xt, gt, acc, input_precision=PRECISION)
    tl.store(dw_ptr + (v * K + k) * C_IN * C_OUT + ci[:, None] * C_OUT + co[None, :], acc,
             mask=ci_ok[:, None] & co_ok[None, :])
