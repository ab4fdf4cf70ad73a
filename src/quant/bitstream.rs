//! Dense little-endian bit streams of `b`-bit codes in u32 words, the
//! layout GPTQ and compressed-tensors share: code `k` occupies bits
//! `k * b .. (k + 1) * b` of the stream, bit `j` of the stream is bit
//! `j % 32` of word `j / 32`. A 3-bit code may straddle two words (32 codes
//! fill exactly 3 words: 10 + 1 + 10 + 1 + 10 bits); 4- and 8-bit codes
//! never do. A stream of `n` codes takes `ceil(n * b / 32)` words, the unused
//! high bits of the last word zero.

/// Words of a stream of `n` codes of `bits` bits.
pub fn stream_words(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(32)
}

/// Packs `codes` (each `< 2^bits`, not checked here) into `words`, which
/// must hold [`stream_words`] words; they are overwritten.
pub fn pack_stream(codes: impl IntoIterator<Item = u32>, bits: u32, words: &mut [u32]) {
    words.iter_mut().for_each(|w| *w = 0);
    let b = bits as usize;
    for (k, c) in codes.into_iter().enumerate() {
        let bit = k * b;
        let (w, s) = (bit / 32, bit % 32);
        words[w] |= c << s;
        if s + b > 32 {
            words[w + 1] |= c >> (32 - s);
        }
    }
}

/// Code `k` of the stream `word(0), word(1), ...` (a closure, so a stream
/// laid down a column of a row-major matrix is read in place).
pub fn get_code(word: impl Fn(usize) -> u32, k: usize, bits: u32) -> u32 {
    let b = bits as usize;
    let bit = k * b;
    let (w, s) = (bit / 32, bit % 32);
    let mask = (1u32 << bits) - 1;
    let mut v = word(w) >> s;
    if s + b > 32 {
        v |= word(w + 1) << (32 - s);
    }
    v & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_bit_codes_straddle_words_as_10_1_10_1_10() {
        // Code 10 sits in bits 30..33: two bits in word 0, one in word 1.
        let mut codes = [0u32; 32];
        codes[10] = 0b101;
        codes[21] = 0b011;
        let mut w = [0u32; 3];
        pack_stream(codes.iter().copied(), 3, &mut w);
        assert_eq!(w, [1 << 30, 1 | (1 << 31), 1]);
        for (k, &c) in codes.iter().enumerate() {
            assert_eq!(get_code(|i| w[i], k, 3), c);
        }
    }

    #[test]
    fn round_trips_with_padding() {
        for bits in [2u32, 3, 4, 8] {
            for n in [1usize, 7, 31, 32, 33, 100] {
                let codes: Vec<u32> = (0..n as u32).map(|k| (k * 7 + 3) % (1 << bits)).collect();
                let mut w = vec![0u32; stream_words(n, bits)];
                pack_stream(codes.iter().copied(), bits, &mut w);
                let back: Vec<u32> = (0..n).map(|k| get_code(|i| w[i], k, bits)).collect();
                assert_eq!(back, codes, "bits {bits} n {n}");
            }
        }
    }
}
