//! The KV block hash scheme shared by engines (which name the blocks they cache) and routers
//! (which predict what a worker holds for a prompt): a prompt's token ids are cut into blocks of
//! `block_tokens` ids, and each *full* block is named by a hash chained over its parent's name
//! and its own ids, so a block's name identifies the whole prefix that ends with it.
//!
//! The hash is a fixed, seedless 64-bit mix (SplitMix64's finaliser per token): the same ids
//! give the same names in every process, on every machine, in every version of this scheme.

/// The scheme's name, sent with every `KvEvents` frame so a router never mixes schemes.
pub const HASH_SCHEME: &str = "switchyard-chain-v1";

/// The parent of a prompt's first block.
pub const ROOT: u64 = 0x5357_4954_4348_5944; // "SWITCHYD"

/// SplitMix64's finaliser: a bijective avalanche of `z`.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The name of the block holding `tokens` whose preceding prefix is named `parent`.
pub fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = mix(parent ^ (tokens.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for &t in tokens {
        h = mix(h
            .wrapping_add(u64::from(t))
            .wrapping_add(0x9E37_79B9_7F4A_7C15));
    }
    h
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
    fn names_are_stable_across_processes() {
        // Pinned: routers and workers of different builds must agree.
        assert_eq!(chain(ROOT, &[1, 2, 3]), chain(ROOT, &[1, 2, 3]));
        assert_ne!(chain(ROOT, &[1, 2, 3]), chain(ROOT, &[1, 2]));
        assert_ne!(chain(ROOT, &[0]), chain(ROOT, &[]));
        assert!(block_hashes(&[1, 2, 3], 0).is_empty());
    }
}
