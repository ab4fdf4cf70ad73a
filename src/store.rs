//! Arrays that are either owned or a slice of a memory-mapped weight file.
//!
//! A model's weights are used where the file holds them: a packed linear's
//! codes and scales and an f16 / bf16 dense weight stay in the mapped file
//! (the kernel pages them in and may drop them again; they count as file
//! pages, not as the process's anonymous memory), and only what has to be
//! computed (a repacked GPTQ weight, a calibrated one) is owned.
//! [`Store`] is that choice, behind a plain slice.
//!
//! safetensors stores little-endian values; mapping them as they are is
//! right on little-endian hosts (x86-64, aarch64), the only ones mbq
//! builds for.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use bytemuck::Pod;
use memmap2::Mmap;

#[cfg(not(target_endian = "little"))]
compile_error!("mbq reads safetensors (little-endian) in place: a little-endian host is required");

/// `T` values: owned, or `len` of them at byte `start` of a mapped file.
pub enum Store<T: Pod> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
}

impl<T: Pod> Store<T> {
    /// The bytes `start..end` of `map` as `T`s: mapped in place when they
    /// are aligned for `T`, else copied (a safetensors writer only aligns
    /// the data section, not each tensor). `end - start` must be a multiple
    /// of `T`'s size (the caller checked the tensor's dtype and shape).
    pub fn from_map(map: &Arc<Mmap>, start: usize, end: usize) -> Store<T> {
        let bytes = &map[start..end];
        let size = std::mem::size_of::<T>();
        debug_assert!(bytes.len().is_multiple_of(size));
        if bytemuck::try_cast_slice::<u8, T>(bytes).is_ok() {
            Store::Mapped {
                map: Arc::clone(map),
                start,
                len: bytes.len() / size,
            }
        } else {
            Store::Owned(bytemuck::pod_collect_to_vec(bytes))
        }
    }

    /// Whether the values live in a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Store::Mapped { .. })
    }

    /// An owned copy (for editing).
    pub fn into_vec(self) -> Vec<T> {
        match self {
            Store::Owned(v) => v,
            mapped => mapped.to_vec(),
        }
    }
}

impl<T: Pod> Deref for Store<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Store::Owned(v) => v,
            Store::Mapped { map, start, len } => {
                // Alignment and length were checked in `from_map`.
                bytemuck::cast_slice(&map[*start..*start + len * std::mem::size_of::<T>()])
            }
        }
    }
}

impl<T: Pod> From<Vec<T>> for Store<T> {
    fn from(v: Vec<T>) -> Self {
        Store::Owned(v)
    }
}

impl<T: Pod> Default for Store<T> {
    fn default() -> Self {
        Store::Owned(Vec::new())
    }
}

impl<T: Pod> Clone for Store<T> {
    /// A mapped store is shared (the map is reference-counted); an owned
    /// one is copied.
    fn clone(&self) -> Self {
        match self {
            Store::Owned(v) => Store::Owned(v.clone()),
            Store::Mapped { map, start, len } => Store::Mapped {
                map: Arc::clone(map),
                start: *start,
                len: *len,
            },
        }
    }
}

impl<T: Pod + PartialEq> PartialEq for Store<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Pod> fmt::Debug for Store<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "Store({} values, {how})", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_of(bytes: &[u8]) -> Arc<Mmap> {
        let mut m = memmap2::MmapMut::map_anon(bytes.len()).unwrap();
        m.copy_from_slice(bytes);
        Arc::new(m.make_read_only().unwrap())
    }

    #[test]
    fn aligned_bytes_are_mapped_and_misaligned_ones_copied() {
        let words: Vec<u32> = vec![1, 2, 0xdead_beef, 7];
        let mut bytes = vec![0u8; 2];
        bytes.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        let map = map_of(&bytes);
        let odd: Store<u32> = Store::from_map(&map, 2, 18);
        assert!(!odd.is_mapped());
        assert_eq!(&*odd, &words[..]);
        let halves: Store<u16> = Store::from_map(&map, 2, 18);
        assert!(halves.is_mapped());
        assert_eq!(&halves[4..6], &[0xbeef, 0xdead]);
        assert_eq!(halves.clone(), halves);
        assert_eq!(halves.into_vec().len(), 8);
    }
}
