//! `mbq export`'s codecs against the formats' own packers: for every case
//! of tests/fixtures/interop/layouts.json (bits 3/4/8, groups 32-128,
//! asymmetric with zero points over the whole range, and symmetric), the
//! integer codes, zero points and scales packed by `quant::gptq` and
//! `quant::compressed` give the bytes gptqmodel's GPTQ packer and
//! compressed-tensors' `pack_to_int32` gave
//! (tests/fixtures/make_interop_fixtures.py).
//!
//! The one intended difference: a GPTQ group whose zero point is 0 is
//! written flipped (codes `M - q`, zero `M`, scale `-s`; see
//! docs/FORMAT.md), so there the fields differ and are checked to be the
//! flip of the reference's, which dequantizes to the same weights.

mod common;

use common::fixtures;
use half::f16;
use mbq::quant::bitstream::get_code;
use mbq::quant::compressed::{packed_to_compressed, CtStrategy};
use mbq::quant::format::PackedLinear;
use mbq::quant::gptq::packed_to_gptq;
use mbq::weights::WeightFiles;

fn bytes_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes_f16(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

struct Case {
    name: String,
    bits: u32,
    group: usize,
    sym: bool,
    packers: Vec<String>,
    packed: PackedLinear,
    /// Zero points `[out, groups]`.
    z: Vec<u8>,
}

fn cases(w: &WeightFiles) -> Vec<Case> {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("interop/layouts.json")).unwrap(),
    )
    .unwrap();
    let mut v = Vec::new();
    for (name, c) in doc["cases"].as_object().unwrap() {
        let n = |k: &str| c[k].as_u64().unwrap() as usize;
        let (bits, group, out, inp) = (n("bits") as u32, n("group_size"), n("out"), n("in"));
        let q = w.raw(&format!("{name}.q")).unwrap().2.to_vec();
        let z = w.raw(&format!("{name}.z")).unwrap().2.to_vec();
        let s = bytes_f16(w.raw(&format!("{name}.s")).unwrap().2);
        let sz: Vec<f16> = s
            .iter()
            .zip(&z)
            .flat_map(|(s, z)| [*s, f16::from_f32(*z as f32)])
            .collect();
        let packed = PackedLinear::from_codes(name, out, inp, bits, group, &q, sz).unwrap();
        v.push(Case {
            name: name.clone(),
            bits,
            group,
            sym: c["sym"].as_bool().unwrap(),
            packers: c["packers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect(),
            packed,
            z,
        });
    }
    assert!(v.len() >= 9, "{} cases", v.len());
    v
}

fn layouts() -> WeightFiles {
    WeightFiles::open_file(&fixtures().join("interop/layouts.safetensors")).unwrap()
}

#[test]
fn gptq_export_equals_gptqmodels_packer() {
    let w = layouts();
    let mut flipped_groups = 0;
    for c in cases(&w)
        .iter()
        .filter(|c| c.packers.iter().any(|p| p == "gptq"))
    {
        let p = &c.packed;
        let (out, inp, bits, g) = (p.out, p.inp, c.bits, c.group);
        let groups = inp / g;
        let m = (1u32 << bits) - 1;
        let mine = packed_to_gptq(&c.name, p).unwrap();
        let r = |leaf: &str| w.raw(&format!("{}.gptq.{leaf}", c.name)).unwrap();
        let (rq, rz, rs, rg) = (
            bytes_i32(r("qweight").2),
            bytes_i32(r("qzeros").2),
            bytes_f16(r("scales").2),
            bytes_i32(r("g_idx").2),
        );
        assert_eq!(r("qweight").1, mine.qweight_shape(), "{}", c.name);
        assert_eq!(r("qzeros").1, mine.qzeros_shape(), "{}", c.name);
        assert_eq!(r("scales").1, mine.scales_shape(), "{}", c.name);
        assert_eq!(mine.g_idx, rg, "{}: g_idx", c.name);
        let zero0 = |row: usize, grp: usize| c.z[row * groups + grp] == 0;
        if !c.z.contains(&0) {
            assert_eq!(mine.qweight, rq, "{}: qweight", c.name);
            assert_eq!(mine.qzeros, rz, "{}: qzeros", c.name);
            assert_eq!(mine.scales, rs, "{}: scales", c.name);
            continue;
        }
        // qweight: a word holds 32 / b codes (3 bits: 32 codes in 3 words)
        // of one column within one group; compare code by code.
        for row in 0..out {
            for i in 0..inp {
                let a = get_code(|x| mine.qweight[x * out + row] as u32, i, bits);
                let b = get_code(|x| rq[x * out + row] as u32, i, bits);
                if zero0(row, i / g) {
                    assert_eq!(a, m - b, "{}: flipped code [{row}, {i}]", c.name);
                } else {
                    assert_eq!(a, b, "{}: code [{row}, {i}]", c.name);
                }
            }
        }
        let zw = mine.qzeros_shape()[1];
        for grp in 0..groups {
            for row in 0..out {
                let a = get_code(|x| mine.qzeros[grp * zw + x] as u32, row, bits);
                let (s_mine, s_ref) = (mine.scales[grp * out + row], rs[grp * out + row]);
                if zero0(row, grp) {
                    flipped_groups += 1;
                    assert_eq!(a, m - 1, "{}: flipped zero stored as M - 1", c.name);
                    assert_eq!(s_mine, -s_ref, "{}: flipped scale", c.name);
                } else {
                    // The reference's field; where it sits next to a zero-0
                    // field its packer's -1 may have spilled over it.
                    let b = get_code(|x| rz[grp * zw + x] as u32, row, bits);
                    let next_is_zero0 = row > 0 && zero0(row - 1, grp);
                    if !next_is_zero0 {
                        assert_eq!(a, b, "{}: zero of [{row}, group {grp}]", c.name);
                    }
                    assert_eq!(a, c.z[row * groups + grp] as u32 - 1);
                    assert_eq!(s_mine, s_ref, "{}: scale", c.name);
                }
            }
        }
    }
    assert!(flipped_groups > 0, "the fixtures hold zero-0 groups");
}

#[test]
fn compressed_tensors_export_equals_pack_to_int32() {
    let w = layouts();
    for c in cases(&w)
        .iter()
        .filter(|c| c.packers.iter().any(|p| p == "ct"))
    {
        let mine = packed_to_compressed(&c.name, &c.packed, CtStrategy::Group(c.group)).unwrap();
        let r = |leaf: &str| w.raw(&format!("{}.ct.{leaf}", c.name)).unwrap();
        assert_eq!(
            r("weight_packed").1,
            mine.weight_packed_shape(),
            "{}",
            c.name
        );
        assert_eq!(
            mine.weight_packed,
            bytes_i32(r("weight_packed").2),
            "{}",
            c.name
        );
        assert_eq!(
            mine.weight_scale,
            bytes_f16(r("weight_scale").2),
            "{}",
            c.name
        );
        if c.sym {
            // A symmetric scheme stores no zero point (ours is asymmetric
            // with zero 2^(b-1) everywhere).
            assert!(!w.contains(&format!("{}.ct.weight_zero_point", c.name)));
        } else {
            assert_eq!(
                r("weight_zero_point").1,
                mine.weight_zero_point_shape(),
                "{}",
                c.name
            );
            assert_eq!(
                mine.weight_zero_point.as_deref(),
                Some(bytes_i32(r("weight_zero_point").2).as_slice()),
                "{}: weight_zero_point",
                c.name
            );
        }
    }
}
