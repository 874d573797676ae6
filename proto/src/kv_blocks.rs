//! The KV block hash scheme shared by engines (which name the blocks they cache) and routers
//! (which predict what a worker holds for a prompt): a prompt's token ids are cut into blocks of
//! `block_tokens` ids, and each *full* block is named by a hash chained over its parent's name
//! and its own ids, so a block's name identifies the whole prefix that ends with it.
//!
//! The hash is fixed and seedless: the same ids give the same names in every process, on every
//! machine, in every version of this scheme. Routers hash every prompt on the request path, so
//! it takes four token ids per multiply (wyhash's folded multiply) rather than a full avalanche
//! per id; one avalanche at the end of each block spreads the result.

/// The scheme's name, sent with every `KvEvents` frame so a router never mixes schemes.
pub const HASH_SCHEME: &str = "switchyard-chain-v2";

/// The parent of a prompt's first block.
pub const ROOT: u64 = 0x5357_4954_4348_5944; // "SWITCHYD"

/// Constants with the top bit of each 32-bit half set, so the multiplier `ids ^ K1` is never
/// zero for token ids below 2^31 and cannot wipe out the running state.
const K0: u64 = 0xA409_3822_299F_31D0 | 0x8000_0000_8000_0000;
const K1: u64 = 0x0823_94EC_4E6C_8945 | 0x8000_0000_8000_0000;
const K_LEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: a bijective avalanche of `z`.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 128-bit product of `a` and `b`, folded to 64 bits (high half xor low half).
#[inline]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

#[inline]
fn pair(ids: &[u32]) -> u64 {
    u64::from(ids[0]) | (u64::from(ids[1]) << 32)
}

/// The name of the block holding `tokens` whose preceding prefix is named `parent`.
pub fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = parent ^ (tokens.len() as u64).wrapping_mul(K_LEN);
    let mut quads = tokens.chunks_exact(4);
    for quad in &mut quads {
        h = folded_multiply(pair(&quad[..2]) ^ h ^ K0, pair(&quad[2..]) ^ K1);
    }
    // The length is already in `h`, so zero padding cannot collide with real ids.
    let mut tail = [0u32; 4];
    let rest = quads.remainder();
    if !rest.is_empty() {
        tail[..rest.len()].copy_from_slice(rest);
        h = folded_multiply(pair(&tail[..2]) ^ h ^ K0, pair(&tail[2..]) ^ K1);
    }
    mix(h)
}

/// The names of every full block of `tokens`, in order (a trailing partial block has none).
pub fn block_hashes(tokens: &[u32], block_tokens: usize) -> Vec<u64> {
    if block_tokens == 0 {
        return Vec::new();
    }
    let mut parent = ROOT;
    tokens
        .chunks_exact(block_tokens)
        .map(|block| {
            parent = chain(parent, block);
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED_123: u64 = 0x71b8_909f_3afe_7b02;
    const PINNED_0_64: [u64; 2] = [0x8c09_b5b2_25d9_8661, 0xf415_a6bb_f9f8_41cf];

    #[test]
    fn a_block_name_depends_on_its_whole_prefix() {
        let a = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        let b = block_hashes(&[9, 2, 3, 4, 5, 6, 7, 8], 4);
        assert_eq!(a.len(), 2, "the trailing partial block has no name");
        assert_eq!(b.len(), 2);
        assert_ne!(a[0], b[0]);
        // Same second block, different first block: different names.
        assert_ne!(a[1], b[1]);
        // A prompt that extends another shares its names.
        let c = block_hashes(&[1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13], 4);
        assert_eq!(&c[..2], &a[..]);
    }

    #[test]
    fn every_id_and_its_position_count() {
        let block: Vec<u32> = (0..32).map(|i| i * 1_000 + 7).collect();
        let mut names = std::collections::HashSet::new();
        names.insert(chain(ROOT, &block));
        for at in 0..block.len() {
            for id in [0, 1, 49_151, block[at] + 1] {
                let mut edited = block.clone();
                edited[at] = id;
                assert!(names.insert(chain(ROOT, &edited)), "id {id} at {at}");
            }
            let mut swapped = block.clone();
            swapped.swap(at, (at + 1) % block.len());
            assert!(names.insert(chain(ROOT, &swapped)), "swap at {at}");
        }
        // Trailing zero ids are not padding.
        assert_ne!(chain(ROOT, &[5, 0]), chain(ROOT, &[5]));
        assert_ne!(chain(ROOT, &[5, 0, 0, 0]), chain(ROOT, &[5, 0, 0]));
    }

    #[test]
    fn names_are_stable_across_processes() {
        // Pinned values: routers and workers of different builds must agree, so changing the
        // function means a new HASH_SCHEME.
        assert_eq!(HASH_SCHEME, "switchyard-chain-v2");
        assert_eq!(chain(ROOT, &[1, 2, 3]), PINNED_123);
        assert_eq!(
            block_hashes(&(0..64).collect::<Vec<u32>>(), 32),
            PINNED_0_64
        );
        assert_eq!(chain(ROOT, &[1, 2, 3]), chain(ROOT, &[1, 2, 3]));
        assert_ne!(chain(ROOT, &[1, 2, 3]), chain(ROOT, &[1, 2]));
        assert_ne!(chain(ROOT, &[0]), chain(ROOT, &[]));
        assert!(block_hashes(&[1, 2, 3], 0).is_empty());
    }
}
