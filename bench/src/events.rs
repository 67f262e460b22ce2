//! The load's shape: a tiny deterministic RNG, each device's baseline, and the JSON body
//! of one realistic event (noise around the baseline, occasional spikes).

/// xorshift64*: fast, deterministic, good enough for load shapes (not for anything else).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced, xorshift needs a non-zero state).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A device's normal operating point: events vary around it.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    /// Typical requests per second.
    pub rps: f64,
    /// Typical CPU load.
    pub cpu: f64,
}

impl Baseline {
    /// The baseline of device `index`, stable across runs.
    pub fn of_device(index: u64) -> Self {
        let mut rng = Rng::new(index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03);
        Self {
            rps: 50.0 + rng.unit() * 450.0,
            cpu: 0.2 + rng.unit() * 0.5,
        }
    }

    /// One reading: ±10 % noise, and with probability `spike_share` a spike of 5–10×
    /// (rps) and near-saturated cpu.
    pub fn reading(&self, rng: &mut Rng, spike_share: f64) -> (f64, f64) {
        let noise = |rng: &mut Rng| 1.0 + (rng.unit() - 0.5) * 0.2;
        if rng.unit() < spike_share {
            (
                self.rps * (5.0 + rng.unit() * 5.0),
                (0.9 + rng.unit() * 0.1).min(1.0),
            )
        } else {
            (
                self.rps * noise(rng),
                (self.cpu * noise(rng)).clamp(0.0, 1.0),
            )
        }
    }
}

/// The JSON body of one event.
pub fn event_body(device_index: u64, rps: f64, cpu: f64) -> String {
    format!(r#"{{"device_id":"device-{device_index}","cpu":{cpu:.4},"rps":{rps:.2}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_stay_valid_and_spikes_happen_at_the_requested_share() {
        let mut rng = Rng::new(7);
        let base = Baseline::of_device(3);
        let mut spikes = 0;
        for _ in 0..100_000 {
            let (rps, cpu) = base.reading(&mut rng, 0.01);
            assert!(rps >= 0.0 && (0.0..=1.0).contains(&cpu));
            if rps > base.rps * 2.0 {
                spikes += 1;
            }
        }
        assert!((700..1300).contains(&spikes), "{spikes}");
    }

    #[test]
    fn event_bodies_are_json_the_service_accepts() {
        let v: serde_json::Value =
            serde_json::from_str(&event_body(42, 123.456, 0.5)).expect("json");
        assert_eq!(v["device_id"], "device-42");
        assert_eq!(v["rps"], 123.46);
    }
}
