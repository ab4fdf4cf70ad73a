//! The CPU's attention: softmax(q k^T scale) v per head, grouped-query
//! heads sharing their key/value head, each query seeing the keys
//! `0..visible(row)`.
//!
//! A few query rows (decode) go one row at a time ([`rows_attention`]);
//! many (prefill, the vision tower) a block of [`Q_BLOCK`] queries of one
//! head at a time as two GEMMs (scores, then the weighted values) through
//! the `gemm` crate, the causal keys masked before the softmax; blocks and
//! heads over threads. The scores of one block are the only extra memory
//! (`Q_BLOCK x keys` floats a task). Both give the same softmax: the row's
//! maximum subtracted, `exp`, divided by the sum.

use rayon::prelude::*;

use super::dot;
use super::linear::GEMM_ROWS;
use super::math::softmax_in_place;
use super::OutPtr;
use crate::backend::AttnShape;

/// Query rows per GEMM task.
pub const Q_BLOCK: usize = 128;

/// `q [n, heads * d]` over `k`, `v` `[>= keys, kv_heads * d]`; row `r`
/// sees keys `0..visible(r)` (at most `keys`).
pub fn attention(
    q: &[f32],
    n: usize,
    k: &[f32],
    v: &[f32],
    keys: usize,
    shape: AttnShape,
    visible: impl Fn(usize) -> usize + Sync,
) -> Vec<f32> {
    if n >= GEMM_ROWS && keys > 0 {
        blocked_attention(q, n, k, v, keys, shape, visible)
    } else {
        rows_attention(q, n, k, v, shape, visible)
    }
}

#[allow(clippy::too_many_arguments)]
fn blocked_attention(
    q: &[f32],
    n: usize,
    k: &[f32],
    v: &[f32],
    keys: usize,
    shape: AttnShape,
    visible: impl Fn(usize) -> usize + Sync,
) -> Vec<f32> {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: d,
        scale,
    } = shape;
    let group = heads / kv_heads;
    let (qs, kvs) = (heads * d, kv_heads * d);
    assert!(q.len() >= n * qs && k.len() >= keys * kvs && v.len() >= keys * kvs);
    let mut out = vec![0.0f32; n * qs];
    let dst = OutPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(Q_BLOCK);
    (0..heads * blocks)
        .into_par_iter()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, t| {
            let (h, b) = (t / blocks, t % blocks);
            let r0 = b * Q_BLOCK;
            let rows = Q_BLOCK.min(n - r0);
            let off = (h / group) * d;
            // Keys beyond the block's last visible one are never used.
            let m = (r0..r0 + rows).map(&visible).max().unwrap_or(0).min(keys);
            scores.resize(rows * m, 0.0);
            if m == 0 {
                return;
            }
            // SAFETY: the pointers and strides stay inside q, k, scores.
            unsafe {
                gemm::gemm(
                    rows,
                    m,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    m as isize,
                    false,
                    q.as_ptr().add(r0 * qs + h * d),
                    1,
                    qs as isize,
                    k.as_ptr().add(off),
                    kvs as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (i, row) in scores.chunks_exact_mut(m).enumerate() {
                let len = visible(r0 + i).min(m);
                softmax_in_place(&mut row[..len]);
                row[len..].iter_mut().for_each(|s| *s = 0.0);
            }
            // SAFETY: rows r0..r0 + rows, columns h*d..(h+1)*d of `out` are this
            // task's alone; v's strides stay inside v.
            unsafe {
                gemm::gemm(
                    rows,
                    d,
                    m,
                    dst.at(r0 * qs + h * d),
                    1,
                    qs as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    m as isize,
                    v.as_ptr().add(off),
                    1,
                    kvs as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    out
}

/// Softmax-weighted sum for one query row over keys `0..len` of one head.
/// `k`, `v` are `[len, stride]` with the head's slice at `off..off+d`.
#[allow(clippy::too_many_arguments)]
fn attend_row(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    stride: usize,
    off: usize,
    len: usize,
    scale: f32,
    out: &mut [f32],
) {
    let d = q.len();
    let mut scores: Vec<f32> = (0..len)
        .map(|j| dot(q, &k[j * stride + off..j * stride + off + d]) * scale)
        .collect();
    softmax_in_place(&mut scores);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (j, &p) in scores.iter().enumerate() {
        let vr = &v[j * stride + off..j * stride + off + d];
        for (o, &x) in out.iter_mut().zip(vr) {
            *o += p * x;
        }
    }
}

/// Attention one query row at a time (few rows: decode).
fn rows_attention(
    q: &[f32],
    n: usize,
    k: &[f32],
    v: &[f32],
    shape: AttnShape,
    visible: impl Fn(usize) -> usize + Sync,
) -> Vec<f32> {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: d,
        scale,
    } = shape;
    let group = heads / kv_heads;
    let qs = heads * d;
    let kvs = kv_heads * d;
    let mut out = vec![0.0f32; n * qs];
    out.par_chunks_mut(qs).enumerate().for_each(|(r, orow)| {
        for h in 0..heads {
            let off = (h / group) * d;
            attend_row(
                &q[r * qs + h * d..r * qs + (h + 1) * d],
                k,
                v,
                kvs,
                off,
                visible(r),
                scale,
                &mut orow[h * d..(h + 1) * d],
            );
        }
    });
    out
}
