//! The quantizer against the MBQ reference, and the packed CPU linear
//! against the dense one: `quant::pseudo::fake_quantize` equals the official
//! code's `pseudo_quantize_tensor` (run by torch in float16, committed by
//! tests/fixtures/make_quant_fixtures.py) bit for bit, and `Cpu.linear` on a
//! packed weight equals the dense product with the dequantized weight.

mod common;

use common::{fixtures, rel_err};
use half::f16;
use mbq::backend::cpu::Cpu;
use mbq::backend::Backend;
use mbq::quant::format::{SUPPORTED_BITS, SUPPORTED_GROUPS};
use mbq::quant::pseudo::{fake_quantize, quantize_linear};
use mbq::tensor::Tensor;
use mbq::weights::WeightFiles;
use safetensors::tensor::Dtype;

/// Packed vs dense linear on the same (dequantized) weight, relative to the
/// output's scale: only the summation order differs.
const PACKED_LINEAR_REL_TOL: f32 = 1e-5;

fn f16_bits(w: &WeightFiles, name: &str) -> (Vec<usize>, Vec<u16>) {
    let (dtype, shape, bytes) = w.raw(name).unwrap();
    assert_eq!(dtype, Dtype::F16, "{name}");
    let bits = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    (shape.to_vec(), bits)
}

/// Our fake-quantized weight as f16 bit patterns.
fn ours(w: &[u16], out: usize, inp: usize, bits: u32, g: usize) -> Vec<u16> {
    let x: Vec<f32> = w.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
    fake_quantize(&x, out, inp, bits, g)
        .unwrap()
        .into_iter()
        .map(|v| f16::from_f32(v).to_bits())
        .collect()
}

#[test]
fn fake_quantize_is_bit_exact_with_the_mbq_reference() {
    let w = WeightFiles::open_file(&fixtures().join("quant/pseudo_quant.safetensors")).unwrap();
    let mut inputs: Vec<&str> = w.names().filter(|n| !n.contains(".w")).collect();
    inputs.sort_unstable();
    assert!(
        inputs.len() >= 6 && inputs.iter().any(|n| n.starts_with("real.")),
        "{inputs:?}"
    );
    let mut checked = 0;
    for name in &inputs {
        let (shape, x) = f16_bits(&w, name);
        let (out, inp) = (shape[0], shape[1]);
        for &bits in SUPPORTED_BITS {
            for &g in SUPPORTED_GROUPS {
                let (_, reference) = f16_bits(&w, &format!("{name}.w{bits}g{g}"));
                let got = ours(&x, out, inp, bits, g);
                let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != reference[i]).collect();
                if let Some(&i) = bad.first() {
                    panic!(
                        "{name} W{bits} g{g}: {} of {} values differ; first at [{}, {}]: input {} -> ours {} (0x{:04x}), reference {} (0x{:04x})",
                        bad.len(),
                        got.len(),
                        i / inp,
                        i % inp,
                        f16::from_bits(x[i]),
                        f16::from_bits(got[i]),
                        got[i],
                        f16::from_bits(reference[i]),
                        reference[i]
                    );
                }
                // Quantization changed something (the comparison is not trivial).
                assert!(got != x || name.contains("special"), "{name} W{bits} g{g}");
                checked += 1;
            }
        }
    }
    println!("{checked} (matrix, bits, group) combinations bit-exact");
    assert_eq!(checked, inputs.len() * 9);
}

fn fnv1a64(bits: &[u16]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bits.iter().flat_map(|v| v.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[test]
fn every_real_decoder_weight_is_bit_exact_with_the_mbq_reference() {
    let path = fixtures().join("quant/pseudo_quant_real.json");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let model = WeightFiles::open(&fixtures().join(j["model"].as_str().unwrap())).unwrap();
    let weights = j["weights"].as_object().unwrap();
    let mut checked = 0;
    for (name, hashes) in weights {
        let (shape, x) = f16_bits(&model, &format!("language_model.model.{name}.weight"));
        for &bits in SUPPORTED_BITS {
            for &g in SUPPORTED_GROUPS {
                let key = format!("w{bits}g{g}");
                let got = fnv1a64(&ours(&x, shape[0], shape[1], bits, g));
                assert_eq!(got, hashes[&key].as_str().unwrap(), "{name} {key}");
                checked += 1;
            }
        }
    }
    println!(
        "{} real decoder linears x 9 configurations bit-exact",
        weights.len()
    );
    assert_eq!(checked, 14 * 9, "every decoder linear of the 2-layer model");
}

/// Deterministic values in [-1, 1).
fn lcg(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn packed_cpu_linear_equals_dense_linear_on_dequantized_weight() {
    let mut seed = 42u64;
    let (out, inp) = (37, 384);
    let mut worst = 0.0f32;
    for &bits in SUPPORTED_BITS {
        for &g in SUPPORTED_GROUPS {
            let w: Vec<f32> = lcg(out * inp, &mut seed).iter().map(|v| v * 0.05).collect();
            let p = quantize_linear("w", &w, out, inp, bits, g).unwrap();
            let deq = p.dequantize();
            assert!(deq != w, "W{bits} g{g}: quantization changed nothing");
            let packed = Cpu.packed_weight(&p).unwrap();
            let dense = Cpu
                .weight(&Tensor::new(vec![out, inp], deq).unwrap())
                .unwrap();
            assert_eq!(Cpu.weight_shape(&packed), (out, inp));
            let bias = Tensor::new(vec![out], lcg(out, &mut seed)).unwrap();
            for rows in [1usize, 3, 7] {
                let x = Tensor::new(vec![rows, inp], lcg(rows * inp, &mut seed)).unwrap();
                for b in [None, Some(&bias)] {
                    let yp = Cpu.linear(&x, &packed, b).unwrap();
                    let yd = Cpu.linear(&x, &dense, b).unwrap();
                    assert_eq!(yp.shape, vec![rows, out]);
                    assert!(yd.data.iter().any(|v| v.abs() > 1e-3));
                    let e = rel_err(&yp.data, &yd.data);
                    worst = worst.max(e);
                    assert!(
                        e <= PACKED_LINEAR_REL_TOL,
                        "W{bits} g{g} rows {rows}: rel err {e}"
                    );
                }
            }
        }
    }
    println!("packed vs dense linear: worst rel err {worst:.2e}");
}
