//! W4A8 end to end: a model directory whose decoder linears are per-channel
//! symmetric INT4 (`quant::w4a8`, stored in the packed format v1) with
//! `mbq.act_bits` = "8" in its metadata, built here (the writer has no W4A8
//! mode yet). The runtime must fake-quantize every packed linear's input to
//! INT8 per token: each linear matches a hand reference (INT8 activations
//! times the official fake-quantized weights), the CPU logits equal bit for
//! bit a dense model with the same weights and INT8 activations, and are
//! close to the one with the official f16 weights, differ from the
//! weight-only W4 model of the same codes, and the wgpu backend generates
//! the CPU's greedy ids.

mod common;
mod wgpu_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{copy_dir, fixtures, rel_err, scratch};
use mbq::backend::cpu::{Cpu, CpuWeight};
use mbq::backend::Backend;
use mbq::generate::{argmax, build_prompt, prefill};
use mbq::model::vlm::ImageEncoder;
use mbq::model::Vlm;
use mbq::preprocess::{load_image, preprocess, ImageProcessorConfig};
use mbq::processor::Processor;
use mbq::quant::format::{
    PackedLinear, FORMAT_VERSION, META_ACT_BITS, META_BITS, META_FORMAT, META_GROUP_SIZE,
    META_METHOD, META_PACKED,
};
use mbq::quant::safetensors_out::{self, Data, OutTensor};
use mbq::quant::w4a8::{
    fake_quantize_act_int8, fake_quantize_w4_per_channel, quantize_linear_w4_per_channel,
};
use mbq::tensor::Tensor;
use mbq::weights::WeightFiles;
use mbq::weights::{Prefixes, DECODER_LINEARS as LINEARS};
use safetensors::tensor::Dtype;
use wgpu_common::{expect_dot4, gpu, gpu_no_dot4};

/// The fixture model (f16 weights; hidden 128, intermediate 256).
const MODEL: &str = "models/llava_qwen128";
const IMAGE: &str = "images/odd2.png";
const PROMPT: &str = "Describe this picture briefly.";
/// Layout of the packed codes (the values do not depend on it).
const GROUP: usize = 128;
/// Tokens generated greedily.
const GREEDY_TOKENS: usize = 8;
/// The runtime keeps the dequantized weight `(c - 8) * scale` in f32 (as for
/// every packed model), the reference rounds it to f16: weights differ by
/// up to half an f16 ulp (~3e-4 of a row's scale).
///
/// One decoder linear on the same input against the hand reference,
/// relative to the output's scale.
const LINEAR_REF_REL_TOL: f32 = 2e-3;
/// Weight-only: last-position logits with the packed weights against the
/// reference's f16-rounded ones, relative to their scale.
const WEIGHT_ONLY_REF_REL_TOL: f32 = 2e-3;
/// W4A8: the same, with INT8 activations. Loose: the ~1e-4 differences
/// move the activations that sit near a .5 boundary of their INT8 grid by
/// one step, which moves the logits by about as much as the activation
/// quantization itself (measured 1.4e-2, and W4A8 vs W4 1.4e-2; dense
/// weights off by 1e-5 relative already give 8e-3, by 1e-6 give 1e-6).
const REF_LOGITS_REL_TOL: f32 = 5e-2;
/// wgpu against the CPU on the W4A8 model, relative to the logits' scale.
/// Lavapipe measures 3e-7 (the packed kernels' rounding moves no activation
/// across an INT8 boundary here), but a device summing in another order may
/// move one by a step, with the effect described at REF_LOGITS_REL_TOL.
const GPU_LOGITS_REL_TOL: f32 = REF_LOGITS_REL_TOL;
/// The packed model against dense weights of its dequantized values, both
/// with INT8 activations, relative to the logits' scale. The CPU's packed
/// kernels fold each group's zero point into one product and sum in SIMD
/// lanes, the dense product subtracts it per weight: the same values in
/// another order (measured 6e-7). One activation moved across an INT8
/// boundary would show as ~1e-2 (see REF_LOGITS_REL_TOL), far above this.
const PACKED_VS_DENSE_REL_TOL: f32 = 1e-5;
/// The INT8 activations must move the logits by at least this (relative)
/// from the weight-only model of the same codes.
const ACT_QUANT_MIN_EFFECT: f32 = 5e-3;

/// Copies the model directory `src` to `dst` with its decoder linears
/// quantized per channel to INT4 (`quantize_linear_w4_per_channel`) and
/// stored packed, with the metadata the writer writes plus, when given,
/// `mbq.act_bits`. Returns the packed linears by prefix.
fn write_w4_model(src: &Path, dst: &Path, act_bits: Option<&str>) -> Vec<(String, PackedLinear)> {
    copy_dir(src, dst);
    let out_file = dst.join("model.safetensors");
    std::fs::remove_file(&out_file).unwrap();
    let w = WeightFiles::open(src).unwrap();
    let cfg = mbq::config::VlmConfig::load(src).unwrap();
    let text = Prefixes::detect(&w).unwrap().text;
    let mut packed = Vec::new();
    for i in 0..cfg.text.num_hidden_layers {
        for l in LINEARS {
            let p = format!("{text}.layers.{i}.{l}");
            let t = w.get_any(&format!("{p}.weight")).unwrap();
            let (out, inp) = (t.shape[0], t.shape[1]);
            let pl = quantize_linear_w4_per_channel(&p, &t.data, out, inp, GROUP).unwrap();
            packed.push((p, pl));
        }
    }
    let bytes: Vec<(Vec<u8>, Vec<u8>)> = packed
        .iter()
        .map(|(_, pl)| {
            (
                pl.qweight.iter().flat_map(|x| x.to_le_bytes()).collect(),
                pl.scales_zeros
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            )
        })
        .collect();
    let replaced: Vec<String> = packed.iter().map(|(p, _)| format!("{p}.weight")).collect();
    let mut tensors: Vec<OutTensor<'_>> = w
        .names()
        .filter(|n| !replaced.iter().any(|r| r == n))
        .map(|n| {
            let (dtype, shape, bytes) = w.raw(n).unwrap();
            OutTensor {
                name: n.to_string(),
                dtype,
                shape: shape.to_vec(),
                data: bytes.into(),
            }
        })
        .collect();
    for ((p, pl), (q, s)) in packed.iter().zip(&bytes) {
        tensors.push(OutTensor {
            name: format!("{p}.qweight"),
            dtype: Dtype::U32,
            shape: vec![pl.out, pl.words_per_row()],
            data: Data::Bytes(q),
        });
        tensors.push(OutTensor {
            name: format!("{p}.scales_zeros"),
            dtype: Dtype::F16,
            shape: vec![pl.out, pl.groups(), 2],
            data: Data::Bytes(s),
        });
    }
    let prefixes: Vec<&String> = packed.iter().map(|(p, _)| p).collect();
    let mut meta: BTreeMap<String, String> = w
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("mbq."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert(META_FORMAT.into(), FORMAT_VERSION.to_string());
    meta.insert(META_BITS.into(), "4".into());
    meta.insert(META_GROUP_SIZE.into(), GROUP.to_string());
    meta.insert(META_METHOD.into(), "rtn".into());
    meta.insert(
        META_PACKED.into(),
        serde_json::to_string(&prefixes).unwrap(),
    );
    if let Some(a) = act_bits {
        meta.insert(META_ACT_BITS.into(), a.into());
    }
    safetensors_out::write(&out_file, &meta, tensors).unwrap();
    packed
}

/// The W4A8 and the weight-only W4 model of the same codes, built once per
/// test under `name`.
struct Models {
    w4a8: PathBuf,
    w4: PathBuf,
    packed: Vec<(String, PackedLinear)>,
}

fn models(name: &str) -> Models {
    let root = scratch(name);
    let src = fixtures().join(MODEL);
    let (w4a8, w4) = (root.join("w4a8"), root.join("w4"));
    let packed = write_w4_model(&src, &w4a8, Some("8"));
    let again = write_w4_model(&src, &w4, None);
    assert_eq!(packed.len(), again.len());
    Models { w4a8, w4, packed }
}

/// Prefill logits (last position) and greedy ids of `model` (loaded from
/// `dir`) on the fixture image and prompt.
fn run<B: Backend>(be: &B, model: &Vlm<B>, dir: &Path) -> (Vec<f32>, Vec<u32>) {
    let proc = Processor::load(dir, model.cfg.image_token_index).unwrap();
    let img_cfg = ImageProcessorConfig::load(dir).unwrap();
    let pre = preprocess(&img_cfg, &load_image(&fixtures().join(IMAGE)).unwrap()).unwrap();
    let prompt = build_prompt(model, &proc, PROMPT, Some(&pre)).unwrap();
    let emb = model.encode_image(be, &pre).unwrap();
    let mut cache = be
        .new_cache(
            model.text.layers.len(),
            model.text.kv_dim(),
            prompt.ids.len() + GREEDY_TOKENS,
        )
        .unwrap();
    let logits = prefill(be, model, &prompt, Some(&emb.features), &mut cache).unwrap();
    let mut ids = vec![argmax(&logits)];
    let mut pos = prompt.ids.len();
    while ids.len() < GREEDY_TOKENS {
        let x = model.text.embed(be, &[ids[ids.len() - 1]]).unwrap();
        let lg = model.text.forward(be, x, &mut cache, pos).unwrap();
        ids.push(argmax(&be.download(&lg).unwrap().data));
        pos += 1;
    }
    (logits, ids)
}

/// The W4A8 model on the CPU with every packed linear replaced by a dense
/// weight from `dense(prefix, packed)`, with the per-token INT8 activations
/// when `act_quant` (loading must have set it on every packed linear).
fn dense_reference(
    m: &Models,
    act_quant: bool,
    dense: impl Fn(&str, &PackedLinear) -> Vec<f32>,
) -> (Vec<f32>, Vec<u32>) {
    let mut model = Vlm::load(&Cpu, &m.w4a8).unwrap();
    let mut packed = m.packed.iter();
    for layer in model.text.layers.iter_mut() {
        for lin in layer.linears_mut() {
            let (p, pl) = packed.next().unwrap();
            assert!(lin.act_quant, "{p}: act_quant not set by the loader");
            assert!(matches!(lin.w, CpuWeight::Packed(_)), "{p}: not packed");
            let t = Tensor::new(vec![pl.out, pl.inp], dense(p, pl)).unwrap();
            lin.w = Cpu.weight(&t).unwrap();
            lin.act_quant = act_quant;
        }
    }
    assert!(packed.next().is_none());
    run(&Cpu, &model, &m.w4a8)
}

/// The official fake-quantized weight of linear `p` of the fixture model.
fn reference_weight(orig: &WeightFiles, p: &str, pl: &PackedLinear) -> Vec<f32> {
    let w = orig.get_any(&format!("{p}.weight")).unwrap();
    fake_quantize_w4_per_channel(&w.data, pl.out, pl.inp)
}

#[test]
fn w4a8_cpu_logits_equal_the_fake_quant_reference() {
    let m = models("w4a8-reference");
    let orig = WeightFiles::open(&fixtures().join(MODEL)).unwrap();
    let model = Vlm::load(&Cpu, &m.w4a8).unwrap();
    // Loading: every decoder linear is packed with INT8 activations; the
    // projector (and the vision tower, lm_head) are not quantized.
    for layer in &model.text.layers {
        for lin in layer.linears() {
            assert!(lin.act_quant && matches!(lin.w, CpuWeight::Packed(_)));
        }
    }
    let ImageEncoder::Llava(enc) = &model.encoder else {
        panic!("llava_qwen128 has a LLaVA image encoder");
    };
    assert!(!enc.projector.linear_1.act_quant && !enc.projector.linear_2.act_quant);
    let (logits, ids) = run(&Cpu, &model, &m.w4a8);

    // The packed weights are the official fake-quantized ones: dequantized
    // and rounded to f16, bit for bit (but the sign of zero).
    for (p, pl) in &m.packed {
        let want = reference_weight(&orig, p, pl);
        let got = pl.dequantize();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| half::f16::from_f32(*a).to_f32() == *b),
            "{p}: packed weight is not the fake-quantized reference"
        );
    }

    // Dense weights of the dequantized values (f32) and INT8 activations
    // before every decoder linear: the same products up to the order of
    // the sums, and the same ids.
    let (exact, exact_ids) = dense_reference(&m, true, |_, pl| pl.dequantize());
    let e_exact = rel_err(&logits, &exact);
    assert!(
        e_exact <= PACKED_VS_DENSE_REL_TOL,
        "packed vs dense dequantized weights: logits rel err {e_exact}"
    );
    assert_eq!(ids, exact_ids);

    // Dense weights of the reference's f16-rounded fake-quantized values:
    // without the INT8 activations they match the weight-only W4 model
    // closely; with them, activations of the two runs that sit near a .5
    // boundary land one step apart and the logits move by about as much
    // as the activation quantization itself, so only the greedy ids and a
    // loose bound are asserted there.
    let (w4, w4_ids) = run(&Cpu, &Vlm::load(&Cpu, &m.w4).unwrap(), &m.w4);
    let (ref_w, ref_w_ids) = dense_reference(&m, false, |p, pl| reference_weight(&orig, p, pl));
    let e_w = rel_err(&w4, &ref_w);
    let (reference, ref_ids) = dense_reference(&m, true, |p, pl| reference_weight(&orig, p, pl));
    let e = rel_err(&logits, &reference);
    let effect = rel_err(&logits, &w4);
    println!(
        "weight-only W4 vs f16 fake-quant weights: logits rel err {e_w:.2e}; W4A8 vs the W4A8 \
         reference: {e:.2e}; W4A8 vs W4: {effect:.2e}; ids {ids:?} (reference {ref_ids:?}, \
         W4 {w4_ids:?})"
    );
    assert!(
        e_w <= WEIGHT_ONLY_REF_REL_TOL,
        "W4 vs reference weights: {e_w}"
    );
    assert_eq!(w4_ids, ref_w_ids, "W4 greedy ids vs the reference weights");
    assert!(e <= REF_LOGITS_REL_TOL, "vs reference: {e}");
    assert_eq!(ids, ref_ids, "greedy ids vs the reference");
    // The INT8 activations show: W4A8 is not the weight-only model.
    assert!(
        effect >= ACT_QUANT_MIN_EFFECT,
        "W4A8 and W4 logits differ by only {effect}: are the activations quantized?"
    );
}

#[test]
fn w4a8_linears_match_a_hand_reference() {
    // Each decoder linear of the loaded W4A8 model against, by hand,
    // fake_quantize_act_int8(x) . fake_quantize_w4_per_channel(w)^T + b on
    // the same input: no boundary effects, only the f16 rounding of the
    // reference's weights.
    let m = models("w4a8-linears");
    let orig = WeightFiles::open(&fixtures().join(MODEL)).unwrap();
    let mut model = Vlm::load(&Cpu, &m.w4a8).unwrap();
    let mut packed = m.packed.iter();
    let mut rng_state = 5u32;
    let mut next = || {
        rng_state = rng_state.wrapping_mul(1664525).wrapping_add(1013904223);
        (rng_state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
    };
    let mut worst = 0.0f32;
    for layer in model.text.layers.iter_mut() {
        for lin in layer.linears_mut() {
            let (p, pl) = packed.next().unwrap();
            let rows = 5;
            let x = Tensor::new(
                vec![rows, pl.inp],
                (0..rows * pl.inp).map(|_| next() * 3.0).collect(),
            )
            .unwrap();
            let got = lin.forward(&Cpu, &x).unwrap();
            let mut xq = x.data.clone();
            fake_quantize_act_int8(&mut xq, pl.inp);
            let w = reference_weight(&orig, p, pl);
            let bias = lin.b.as_ref().map(|b| b.data.clone());
            let mut want = vec![0.0f32; rows * pl.out];
            let mut plain = vec![0.0f32; rows * pl.out];
            for r in 0..rows {
                for o in 0..pl.out {
                    let wr = &w[o * pl.inp..(o + 1) * pl.inp];
                    let b = bias.as_ref().map_or(0.0, |b| b[o]) as f64;
                    let dot = |v: &[f32]| -> f64 {
                        v.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum()
                    };
                    want[r * pl.out + o] = (dot(&xq[r * pl.inp..(r + 1) * pl.inp]) + b) as f32;
                    plain[r * pl.out + o] = (dot(&x.data[r * pl.inp..(r + 1) * pl.inp]) + b) as f32;
                }
            }
            let e = rel_err(&got.data, &want);
            let effect = rel_err(&plain, &want);
            assert!(e <= LINEAR_REF_REL_TOL, "{p}: rel err {e}");
            assert!(
                effect >= 10.0 * e.max(LINEAR_REF_REL_TOL / 10.0),
                "{p}: the INT8 activations do not show ({effect} vs {e})"
            );
            worst = worst.max(e);
        }
    }
    println!("W4A8 linears vs the hand reference: worst rel err {worst:.2e}");
}

#[test]
fn w4a8_wgpu_greedy_ids_equal_cpu() {
    // Both W4A8 paths of wgpu: integer dot products (gemv_w4a8.wgsl, which
    // must run where the device has dot4I8Packed: `expect_dot4` fails
    // loudly otherwise) and the fake-quant fallback (MBQ_WGPU_NO_DOT4=1).
    let m = models("w4a8-wgpu");
    let (cl, cids) = run(&Cpu, &Vlm::load(&Cpu, &m.w4a8).unwrap(), &m.w4a8);
    let g = gpu();
    let dot4 = expect_dot4(g);
    let mut logits = Vec::new();
    for (path, g) in [("dot4", g), ("fallback", gpu_no_dot4())] {
        let before = g.dot4_linears();
        let t0 = std::time::Instant::now();
        let (gl, gids) = run(g, &Vlm::load(g, &m.w4a8).unwrap(), &m.w4a8);
        let gpu_ms = t0.elapsed().as_secs_f64() * 1e3;
        let ints = g.dot4_linears() - before;
        let e = rel_err(&gl, &cl);
        println!(
            "W4A8 wgpu ({path}, {ints} integer linears) vs cpu: logits rel err {e:.2e}, ids \
             {gids:?}, wgpu {gpu_ms:.0} ms"
        );
        if path == "dot4" && dot4 {
            // 7 linears per layer, prefill and each decoded token.
            assert!(ints >= 7 * GREEDY_TOKENS, "{ints} integer linears");
        } else {
            assert_eq!(ints, 0, "{path}: integer linears ran");
        }
        assert_eq!(gids, cids, "wgpu ({path}) vs cpu greedy ids");
        assert!(e <= GPU_LOGITS_REL_TOL, "wgpu ({path}) vs cpu logits: {e}");
        logits.push(gl);
    }
    println!(
        "W4A8 wgpu dot4 vs fallback: logits rel err {:.2e}",
        rel_err(&logits[0], &logits[1])
    );
    // And the weight-only model on wgpu does not quantize activations.
    let (gw4, _) = run(g, &Vlm::load(g, &m.w4).unwrap(), &m.w4);
    assert!(rel_err(&gw4, &logits[0]) >= ACT_QUANT_MIN_EFFECT);
}

#[test]
fn unknown_act_bits_is_an_error_naming_file_and_value() {
    let dir = scratch("w4a8-bad-act-bits").join("m");
    write_w4_model(&fixtures().join(MODEL), &dir, Some("4"));
    let e = match Vlm::load(&Cpu, &dir) {
        Ok(_) => panic!("act_bits 4 loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("model.safetensors") && e.contains("\"4\"") && e.contains(META_ACT_BITS),
        "{e}"
    );
}
