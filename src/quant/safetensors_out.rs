//! A deterministic safetensors writer: the same tensors and metadata give
//! the same bytes in every run (the `safetensors` crate writes its metadata
//! from a `HashMap`, whose order changes from process to process).
//!
//! Layout (the safetensors format): u64 LE header length, the JSON header
//! (`__metadata__` first, keys sorted, then the tensors in data order),
//! padded with spaces to a multiple of 8, then the tensor data. Tensors are
//! ordered by element size, largest first, then by name, so that with the
//! 8-aligned header every tensor starts aligned to its element size (a
//! `U32` tensor can be read with aligned u32 loads from a mapped file).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::Dtype;

use crate::error::{Error, Result};
use crate::weights::dtype_size;

/// The write buffer: whole buffers written from the heap fill the page
/// cache with 2 MiB folios (Linux with large folios), mapped as 2 MiB
/// pages when the file is loaded.
const WRITE_BUF: usize = 8 << 20;

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub struct OutTensor<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Data<'a>,
}

/// A tensor's little-endian bytes: given, or made when the writer reaches
/// the tensor (so a file larger than memory is written with one tensor's
/// bytes in memory at a time; tensors are made in the file's order).
pub enum Data<'a> {
    Bytes(&'a [u8]),
    Later(Box<dyn FnOnce() -> Result<Vec<u8>> + 'a>),
}

impl<'a> From<&'a [u8]> for Data<'a> {
    fn from(b: &'a [u8]) -> Self {
        Data::Bytes(b)
    }
}

impl<'a> From<&'a Vec<u8>> for Data<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        Data::Bytes(b)
    }
}

/// Writes `tensors` and `metadata` to `path` (created; fails if it exists).
/// Returns the file size.
pub fn write(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    mut tensors: Vec<OutTensor<'_>>,
) -> Result<u64> {
    let bad = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let json = |s: &str| serde_json::to_string(s).map_err(|e| bad(e.to_string()));
    // Every tensor's byte length, from its shape (checked against given
    // bytes now and against made ones when they are made).
    let mut len_of = std::collections::HashMap::with_capacity(tensors.len());
    for t in &tensors {
        let es = dtype_size(t.dtype)
            .ok_or_else(|| bad(format!("tensor \"{}\": dtype {:?}", t.name, t.dtype)))?;
        let n: usize = t.shape.iter().product::<usize>() * es;
        if let Data::Bytes(b) = &t.data {
            if b.len() != n {
                return Err(bad(format!(
                    "tensor \"{}\": shape {:?} of {:?} needs {n} bytes, got {}",
                    t.name,
                    t.shape,
                    t.dtype,
                    b.len()
                )));
            }
        }
        len_of.insert(t.name.clone(), n);
    }
    tensors.sort_by(|a, b| {
        let (ea, eb) = (dtype_size(a.dtype), dtype_size(b.dtype));
        eb.cmp(&ea).then_with(|| a.name.cmp(&b.name))
    });
    if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(bad(format!("tensor \"{}\" twice", w[0].name)));
    }

    let mut header = String::from("{");
    if !metadata.is_empty() {
        header.push_str("\"__metadata__\":{");
        let mut first = true;
        for (k, v) in metadata {
            if !first {
                header.push(',');
            }
            first = false;
            header.push_str(&format!("{}:{}", json(k)?, json(v)?));
        }
        header.push('}');
    }
    let mut offset = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        if i > 0 || !metadata.is_empty() {
            header.push(',');
        }
        let dtype = serde_json::to_string(&t.dtype).map_err(|e| bad(e.to_string()))?;
        let shape = serde_json::to_string(&t.shape).map_err(|e| bad(e.to_string()))?;
        let end = offset + len_of[&t.name];
        header.push_str(&format!(
            "{}:{{\"dtype\":{dtype},\"shape\":{shape},\"data_offsets\":[{offset},{end}]}}",
            json(&t.name)?
        ));
        offset = end;
    }
    header.push('}');
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let mut f = std::io::BufWriter::with_capacity(WRITE_BUF, file);
    let io = |e| Error::io(path, e);
    f.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&header).map_err(io)?;
    for t in tensors {
        let n = len_of[&t.name];
        match t.data {
            Data::Bytes(b) => {
                // Through the buffer, half of it at a time: every write
                // the kernel sees is a whole buffer from the heap. A slice
                // of a mapped file handed to one `write` is copied a page
                // at a time once a source page faults, and its page cache
                // stays in 4 KiB folios, which a later decode maps as 4
                // KiB pages (slower: docs/BENCHMARKS.md).
                for piece in b.chunks(WRITE_BUF / 2) {
                    f.write_all(piece).map_err(io)?;
                }
            }
            Data::Later(make) => {
                let b = make()?;
                if b.len() != n {
                    return Err(bad(format!(
                        "tensor \"{}\": shape {:?} of {:?} needs {n} bytes, {} were made",
                        t.name,
                        t.shape,
                        t.dtype,
                        b.len()
                    )));
                }
                f.write_all(&b).map_err(io)?;
            }
        }
    }
    let file = f
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok((8 + header.len() + offset) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::WeightFiles;

    #[test]
    fn round_trips_and_aligns_u32_after_odd_f16() {
        let dir = std::env::temp_dir().join(format!("mbq-stout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let h: Vec<u8> = vec![1, 0, 2, 0, 3, 0];
        let q: Vec<u8> = (0..8).collect();
        let meta = BTreeMap::from([
            ("b".to_string(), "2".to_string()),
            ("a\"".into(), "1".into()),
        ]);
        let tensors = || {
            vec![
                OutTensor {
                    name: "a.h".into(),
                    dtype: Dtype::F16,
                    shape: vec![3],
                    data: Data::Bytes(&h),
                },
                OutTensor {
                    name: "z.q".into(),
                    dtype: Dtype::U32,
                    shape: vec![2],
                    data: Data::Bytes(&q),
                },
            ]
        };
        let p = dir.join("x.safetensors");
        let n = write(&p, &meta, tensors()).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len() as u64, n);
        let hl = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        // The U32 tensor comes first, right after the 8-aligned header.
        assert_eq!(hl % 8, 0);
        assert_eq!(&bytes[8 + hl..8 + hl + 8], q.as_slice());
        let w = WeightFiles::open_file(&p).unwrap();
        assert_eq!(w.raw("a.h").unwrap().2, h.as_slice());
        assert_eq!(w.raw("z.q").unwrap().2, q.as_slice());
        assert_eq!(w.metadata.get("a\"").map(String::as_str), Some("1"));
        // Deterministic, and never overwrites.
        let p2 = dir.join("y.safetensors");
        write(&p2, &meta, tensors()).unwrap();
        assert_eq!(std::fs::read(&p2).unwrap(), bytes);
        assert!(write(&p, &meta, tensors()).is_err());

        // Bytes made when their turn comes give the same file; made bytes
        // of the wrong length are an error naming the tensor.
        let later = |q: Vec<u8>| {
            let mut t = tensors();
            t[1].data = Data::Later(Box::new(move || Ok(q)));
            t
        };
        let p3 = dir.join("z.safetensors");
        write(&p3, &meta, later(q.clone())).unwrap();
        assert_eq!(std::fs::read(&p3).unwrap(), bytes);
        let e = write(&dir.join("w.safetensors"), &meta, later(vec![0; 4]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("z.q") && e.contains("needs 8 bytes, 4 were made"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
