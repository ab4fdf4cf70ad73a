//! Every CPU linear path against the plain definition
//! (`reference_linear`: each row of W as f32, sequential sums): the row
//! kernels of every instruction set this CPU has (scalar, AVX2 + FMA +
//! F16C) for a few rows, and the tiled GEMM for many, on packed W3 / W4 /
//! W8 at every group size, f16, bf16 and f32, at odd shapes.

use half::{bf16, f16};
use mbq::backend::cpu::{linear_with, q8, reference_linear, CpuWeight, Isa, GEMM_ROWS, TILE};
use mbq::quant::format::PackedLinear;
use mbq::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Allowed |y - y_ref| relative to sum_k |w_k x_k| of that output (f32
/// sums in another order, and the zero point folded per group instead of
/// subtracted per weight).
const REL: f32 = 2e-6;

/// Whether `isa` computes these rows with int8 activations (the integer
/// kernels: packed rows of the layouts `Isa::int8_layout` accepts, a few rows).
fn int8_activations(isa: Isa, w: &CpuWeight, rows: usize) -> bool {
    match w {
        CpuWeight::Packed(p) => rows < GEMM_ROWS && isa.int8_layout(p.bits, p.group_size),
        _ => false,
    }
}

/// `sum |w| |x| + 1` of each output: the scale of its rounding error.
fn magnitudes(w: &CpuWeight, x: &[f32], rows: usize) -> Vec<f32> {
    let (out, inp) = w.shape();
    let mut wr = vec![0.0f32; inp];
    let mut mag = vec![0.0f32; rows * out];
    for o in 0..out {
        w.row_f32(o, &mut wr);
        for r in 0..rows {
            mag[r * out + o] = wr
                .iter()
                .zip(&x[r * inp..(r + 1) * inp])
                .map(|(a, b)| (a * b).abs())
                .sum::<f32>()
                + 1.0;
        }
    }
    mag
}

fn check(label: &str, w: &CpuWeight, rows: usize, seed: u64) {
    let (out, inp) = w.shape();
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..rows * inp)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let b: Vec<f32> = (0..out).map(|_| rng.random::<f32>() - 0.5).collect();
    let want = reference_linear(&x, rows, w, Some(&b));
    let mag = magnitudes(w, &x, rows);
    // The integer kernels compute with the activations rounded to int8
    // blocks: the definition applied to that rounded row.
    let x8: Vec<f32> = x.chunks_exact(inp).flat_map(q8::round_trip).collect();
    let want8 = reference_linear(&x8, rows, w, Some(&b));
    let mag8 = magnitudes(w, &x8, rows);
    for isa in Isa::available() {
        let got = linear_with(isa, &x, rows, w, Some(&b));
        let (want, mag) = if int8_activations(isa, w, rows) {
            (&want8, &mag8)
        } else {
            (&want, &mag)
        };
        assert_eq!(got.len(), want.len());
        for (i, ((g, e), m)) in got.iter().zip(want).zip(mag).enumerate() {
            assert!(
                (g - e).abs() <= REL * m,
                "{label}, {} rows, {}: output {i}: {g} vs reference {e} (scale {m})",
                rows,
                isa.name()
            );
        }
    }
}

fn packed(seed: u64, out: usize, inp: usize, bits: u32, group: usize) -> PackedLinear {
    let mut rng = StdRng::seed_from_u64(seed);
    let top = (1u32 << bits) - 1;
    let codes: Vec<u8> = (0..out * inp)
        .map(|_| rng.random_range(0..=top) as u8)
        .collect();
    let groups = inp / group;
    let sz = (0..out * groups)
        .flat_map(|i| {
            // Zero points at both ends of the range too.
            let z = match i % 3 {
                0 => 0,
                1 => top,
                _ => rng.random_range(0..=top),
            };
            [
                f16::from_f32(rng.random::<f32>() * 0.05 + 0.001),
                f16::from_f32(z as f32),
            ]
        })
        .collect();
    PackedLinear::from_codes("test", out, inp, bits, group, &codes, sz).unwrap()
}

#[test]
fn packed_rows_and_gemm_match_the_reference_at_every_width_and_group() {
    for bits in [3u32, 4, 8] {
        for group in [32usize, 64, 128] {
            // One group, an odd number of groups, and enough for whole blocks.
            for (gi, groups) in [1usize, 3, 6].into_iter().enumerate() {
                let inp = group * groups;
                let out = 37;
                let w =
                    CpuWeight::Packed(packed(bits as u64 * 100 + gi as u64, out, inp, bits, group));
                let label = format!("W{bits} g{group} [{out}, {inp}]");
                for rows in [1, 3, GEMM_ROWS + 1] {
                    check(&label, &w, rows, rows as u64);
                }
            }
        }
    }
}

#[test]
fn gemm_tiles_cover_outputs_past_one_tile() {
    let out = TILE * 2 + 5;
    let w = CpuWeight::Packed(packed(9, out, 256, 4, 128));
    check("W4 g128 over three tiles", &w, GEMM_ROWS * 3 + 1, 4);
}

#[test]
fn dense_stored_weights_match_the_reference() {
    let mut rng = StdRng::seed_from_u64(5);
    for (out, inp) in [
        (1usize, 1usize),
        (5, 7),
        (33, 40),
        (17, 250),
        (TILE + 3, 129),
        // Long rows: four at a time under AVX-512 (8,192 inputs and more).
        (6, 8192 + 40),
    ] {
        let vals: Vec<f32> = (0..out * inp).map(|_| rng.random::<f32>() - 0.5).collect();
        let ws = [
            (
                "f16",
                CpuWeight::F16 {
                    out,
                    inp,
                    data: vals
                        .iter()
                        .map(|&v| f16::from_f32(v))
                        .collect::<Vec<_>>()
                        .into(),
                },
            ),
            (
                "bf16",
                CpuWeight::BF16 {
                    out,
                    inp,
                    data: vals
                        .iter()
                        .map(|&v| bf16::from_f32(v))
                        .collect::<Vec<_>>()
                        .into(),
                },
            ),
            (
                "f32",
                CpuWeight::Dense(Tensor::new(vec![out, inp], vals.clone()).unwrap()),
            ),
        ];
        for (name, w) in &ws {
            for rows in [1, 2, GEMM_ROWS, 2 * GEMM_ROWS + 3] {
                check(&format!("{name} [{out}, {inp}]"), w, rows, rows as u64 + 11);
            }
        }
    }
}

/// The int8 rounding's own error: each activation moves by at most half
/// its block's step (`max |x| / 254`), so an output moves by at most
/// `sum_k |w_k| max|x|_block(k) / 254` (plus f32 rounding). Checked on
/// activations with an outlier channel, where a block's step is coarse.
#[test]
fn int8_activations_stay_within_half_a_step_of_the_f32_product() {
    let int8: Vec<Isa> = Isa::available()
        .into_iter()
        .filter(|i| i.int8_layout(4, 128))
        .collect();
    if int8.is_empty() {
        eprintln!("no AVX2 or AVX-512 VNNI on this CPU: no int8 kernels to check");
        return;
    }
    for (isa, bits, group) in int8.into_iter().flat_map(|isa| {
        [(3u32, 128usize), (4, 128), (8, 64), (8, 128)]
            .into_iter()
            .filter(move |&(b, g)| isa.int8_layout(b, g))
            .map(move |(b, g)| (isa, b, g))
    }) {
        let (out, inp) = (21, 128 * 5);
        let w = CpuWeight::Packed(packed(bits as u64 + 40, out, inp, bits, group));
        let mut rng = StdRng::seed_from_u64(bits as u64);
        let mut x: Vec<f32> = (0..inp).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        x[37] = 60.0;
        let got = linear_with(isa, &x, 1, &w, None);
        let want = reference_linear(&x, 1, &w, None);
        let mag = magnitudes(&w, &x, 1);
        let steps: Vec<f32> = x
            .chunks_exact(q8::BLOCK)
            .map(|b| b.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 254.0)
            .collect();
        let mut wr = vec![0.0f32; inp];
        let mut worst = 0.0f32;
        for o in 0..out {
            w.row_f32(o, &mut wr);
            let bound: f32 = wr
                .iter()
                .enumerate()
                .map(|(k, v)| v.abs() * steps[k / q8::BLOCK])
                .sum();
            let err = (got[o] - want[o]).abs();
            assert!(
                err <= bound * 1.0001 + REL * mag[o],
                "{} W{bits} g{group} output {o}: {} vs f32 {} (bound {bound})",
                isa.name(),
                got[o],
                want[o]
            );
            worst = worst.max(err / bound);
        }
        // The rounding is real: the outputs are not the f32 ones.
        assert!(
            worst > 0.0,
            "{} W{bits}: int8 activations gave the f32 result",
            isa.name()
        );
    }
}

/// The SIMD activation rounding gives the plain definition's bytes and
/// steps: odd lengths (a short last block), a block of zeros, values on
/// ties (x.5 steps: to even), and the extremes.
#[test]
fn int8_rounding_simd_matches_the_definition() {
    let mut rng = StdRng::seed_from_u64(8);
    for len in [32usize, 96, 100, 3584 + 7] {
        let mut x: Vec<f32> = (0..len)
            .map(|_| (rng.random::<f32>() - 0.5) * 8.0)
            .collect();
        x[..32].fill(0.0);
        if len >= 96 {
            // amax 127: x / d is x itself, so these sit on ties.
            for (k, v) in x[32..64].iter_mut().enumerate() {
                *v = k as f32 - 16.5;
            }
            x[63] = -127.0;
            x[64..96].iter_mut().for_each(|v| *v *= 1e-30);
        }
        let (q, d) = q8::quantize(&x);
        assert_eq!(q8::quantize_fast(&x), (q.clone(), d), "length {len}");
        if len >= 96 {
            // Ties to even: -16.5 -> -16, -15.5 -> -16, 0.5 -> 0, 1.5 -> 2.
            assert_eq!((q[32], q[33], q[49], q[50], q[63]), (-16, -16, 0, 2, -127));
        }
    }
}

/// The kernels are not all the same code: on a CPU with AVX2 the fast
/// path must be taken (else this file tests the scalar loops twice).
#[test]
fn the_simd_kernels_run_where_the_cpu_has_them() {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        assert!(Isa::available().contains(&Isa::Avx2));
        assert!(Isa::available().contains(&Isa::Avx2Int8));
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bitalg") {
        assert!(Isa::available().contains(&Isa::Avx512Vnni));
    }
    assert_eq!(Isa::available()[0], Isa::Scalar);
}

fn random_tensor(rng: &mut StdRng, rows: usize, cols: usize) -> Tensor {
    Tensor::new(
        vec![rows, cols],
        (0..rows * cols)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect(),
    )
    .unwrap()
}

/// Allowed difference between the GEMM attention (blocks of queries) and
/// the one-row-at-a-time attention: f32 sums in another order.
const ATTN_ABS: f32 = 2e-6;

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{what}");
    for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
        assert!((g - w).abs() <= ATTN_ABS, "{what}: value {i}: {g} vs {w}");
    }
}

/// Many queries at once (the blocked GEMM path) give what each query
/// alone gives (the row path), full and causal, grouped-query heads, over
/// several query blocks with a ragged last one.
#[test]
fn blocked_attention_matches_one_query_at_a_time() {
    use mbq::backend::cpu::Cpu;
    use mbq::backend::{AttnShape, Backend};
    let be = Cpu;
    let mut rng = StdRng::seed_from_u64(3);
    let shape = AttnShape {
        heads: 6,
        kv_heads: 2,
        head_dim: 40,
        scale: 40f32.powf(-0.5),
    };
    let n = 300;
    let q = random_tensor(&mut rng, n, 6 * 40);
    let k = random_tensor(&mut rng, n, 2 * 40);
    let v = random_tensor(&mut rng, n, 2 * 40);
    // Full attention (the vision tower's).
    let all = be.attention(&q, &k, &v, shape).unwrap();
    let mut one = Vec::new();
    for r in 0..n {
        let qr = be.rows(&q, r, 1).unwrap();
        one.extend(be.attention(&qr, &k, &v, shape).unwrap().data);
    }
    assert_close("full", &all, &Tensor::new(vec![n, 240], one).unwrap());
    // Causal, through the cache: a prefill of n tokens, then the same
    // tokens decoded one by one.
    let mut cache = be.new_cache(1, 80, n).unwrap();
    let pre = be
        .attention_cached(&q, &k, &v, &mut cache, 0, 0, shape)
        .unwrap();
    let mut cache = be.new_cache(1, 80, n).unwrap();
    let mut dec = Vec::new();
    for r in 0..n {
        let (qr, kr, vr) = (
            be.rows(&q, r, 1).unwrap(),
            be.rows(&k, r, 1).unwrap(),
            be.rows(&v, r, 1).unwrap(),
        );
        dec.extend(
            be.attention_cached(&qr, &kr, &vr, &mut cache, 0, r, shape)
                .unwrap()
                .data,
        );
    }
    assert_close("causal", &pre, &Tensor::new(vec![n, 240], dec).unwrap());
}
