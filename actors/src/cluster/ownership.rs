//! Which member owns a device: rendezvous (highest random weight) hashing, pure.
//!
//! Every member `m` gets a weight per device `d`, and the heaviest member owns `d`
//! (Thaler & Ravishankar, 1998). Removing a member moves only the devices it owned, and
//! adding one moves only the devices it now wins: about 1/N of them. Every node computes
//! the same owner from the same member list, so the hash is fixed and documented here
//! rather than taken from `std` (whose `DefaultHasher` may change between releases):
//!
//! ```text
//! fnv1a64(bytes)      = FNV-1a, 64 bit (offset 0xcbf29ce484222325, prime 0x100000001b3)
//! member_seed(m)      = fnv1a64(m as "ip:port", IPv6 as "[ip]:port")
//! weight(m, d)        = splitmix64_finalize(fnv1a64(d) XOR member_seed(m))
//! owner(d)            = the member of the highest weight (ties: the lower address)
//! ```
//! `splitmix64_finalize` is the output mix of SplitMix64 (Steele, Lea & Flood, 2014); it
//! spreads the XOR of two FNV values over all 64 bits, which FNV alone does not.

use std::net::SocketAddr;

/// FNV-1a, 64 bit.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The output mix of SplitMix64.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A member list, ready to answer ownership queries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    /// Sorted, without duplicates; with each member's seed.
    members: Vec<(SocketAddr, u64)>,
}

impl Ring {
    /// The ring of these members (order and duplicates do not matter).
    pub fn new(members: impl IntoIterator<Item = SocketAddr>) -> Self {
        let mut members: Vec<_> = members
            .into_iter()
            .map(|m| (m, fnv1a64(m.to_string().as_bytes())))
            .collect();
        members.sort_unstable();
        members.dedup();
        Self { members }
    }

    /// The members, sorted.
    pub fn members(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.members.iter().map(|(m, _)| *m)
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True without members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether `member` is in the ring.
    pub fn contains(&self, member: SocketAddr) -> bool {
        self.members.iter().any(|(m, _)| *m == member)
    }

    /// The owner of `device`, `None` when there are no members.
    pub fn owner(&self, device: &str) -> Option<SocketAddr> {
        let d = fnv1a64(device.as_bytes());
        // Ascending order + strict `>`: on a (astronomically unlikely) tie the lower
        // address wins, on every node alike.
        let mut best: Option<(u64, SocketAddr)> = None;
        for &(member, seed) in &self.members {
            let w = mix(d ^ seed);
            if best.is_none_or(|(bw, _)| w > bw) {
                best = Some((w, member));
            }
        }
        best.map(|(_, m)| m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8081))
    }

    fn ring(n: usize) -> Ring {
        Ring::new((0..n).map(addr))
    }

    #[test]
    fn the_hash_is_the_documented_one() {
        // Published FNV-1a 64 test vectors; they pin the function every node must share.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // SplitMix64's first output for seed 0 is mix(0x9e3779b97f4a7c15).
        assert_eq!(mix(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
        // And a fixed assignment, so a change of the scheme cannot go unnoticed (nodes of
        // two versions must agree during a rolling update); the expected owners were
        // computed by an independent Python transcription of the documented scheme.
        let r = Ring::new(
            ["10.0.0.1:8081", "10.0.0.2:8081", "10.0.0.3:8081"].map(|a| a.parse().expect("addr")),
        );
        let owners: Vec<String> = (1..=8)
            .map(|i| r.owner(&format!("sensor-{i}")).expect("owner").to_string())
            .collect();
        assert_eq!(owners, EXPECTED_OWNERS);
    }

    const EXPECTED_OWNERS: [&str; 8] = [
        "10.0.0.3:8081",
        "10.0.0.3:8081",
        "10.0.0.3:8081",
        "10.0.0.3:8081",
        "10.0.0.3:8081",
        "10.0.0.1:8081",
        "10.0.0.1:8081",
        "10.0.0.3:8081",
    ];

    #[test]
    fn no_members_no_owner() {
        assert_eq!(Ring::default().owner("x"), None);
    }

    #[test]
    fn a_ring_knows_its_members() {
        let empty = Ring::new([]);
        assert_eq!((empty.len(), empty.is_empty()), (0, true));
        assert!(!empty.contains(addr(0)));
        let r = Ring::new([addr(2), addr(0), addr(2)]);
        assert_eq!((r.len(), r.is_empty()), (2, false));
        assert!(r.contains(addr(0)) && r.contains(addr(2)));
        assert!(!r.contains(addr(1)));
        assert_eq!(r.members().collect::<Vec<_>>(), vec![addr(0), addr(2)]);
    }

    #[test]
    fn devices_spread_evenly() {
        for n in [2, 3, 5] {
            let r = ring(n);
            let mut counts = vec![0usize; n];
            let devices = 30_000;
            for i in 0..devices {
                let owner = r.owner(&format!("sensor-{i}")).expect("owner");
                counts[(0..n).position(|j| addr(j) == owner).expect("member")] += 1;
            }
            let fair = devices / n;
            for c in counts {
                // ±10 % of the fair share; binomial sd at these sizes is ~1 %.
                assert!(c.abs_diff(fair) < fair / 10, "n={n}: {c} vs {fair}");
            }
        }
    }

    proptest! {
        #[test]
        fn order_and_duplicates_of_the_member_list_do_not_matter(
            n in 1usize..8, device in "[a-z0-9-]{1,40}", rot in 0usize..8,
        ) {
            let mut list: Vec<_> = (0..n).map(addr).collect();
            list.rotate_left(rot % n);
            list.push(addr(0));
            prop_assert_eq!(Ring::new(list).owner(&device), ring(n).owner(&device));
        }

        #[test]
        fn removing_a_member_moves_only_its_devices(n in 2usize..8, gone in 0usize..8, seed in 0u32..1000) {
            let gone = addr(gone % n);
            let before = ring(n);
            let after = Ring::new((0..n).map(addr).filter(|a| *a != gone));
            for i in 0..200 {
                let d = format!("dev-{seed}-{i}");
                let (b, a) = (before.owner(&d).expect("owner"), after.owner(&d).expect("owner"));
                if b != gone {
                    prop_assert_eq!(a, b, "{} moved though its owner stayed", d);
                }
                prop_assert_ne!(a, gone);
            }
        }

        #[test]
        fn adding_a_member_moves_devices_only_to_it(n in 1usize..7, seed in 0u32..1000) {
            let before = ring(n);
            let after = ring(n + 1);
            let new = addr(n);
            let mut moved = 0;
            for i in 0..300 {
                let d = format!("dev-{seed}-{i}");
                let (b, a) = (before.owner(&d).expect("owner"), after.owner(&d).expect("owner"));
                if a != b {
                    prop_assert_eq!(a, new);
                    moved += 1;
                }
            }
            // About 1/(n+1) of 300 move; allow a wide margin for 300 samples.
            let fair = 300 / (n + 1);
            prop_assert!(moved > fair / 3 && moved < fair * 2, "moved {} of 300, fair {}", moved, fair);
        }
    }
}
