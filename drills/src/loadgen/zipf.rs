//! A Zipf sampler over ranks `1..=n`: `P(k) ∝ 1 / k^s`.
//!
//! The CDF is computed once, so a sample is one uniform draw and a binary search; that keeps
//! the dispatcher cheap at high rates and makes a run reproducible from its seed alone.

use rand::Rng;

use super::LoadgenError;

#[derive(Debug, Clone)]
pub struct Zipf {
    /// `cdf[k - 1]` = P(rank <= k); the last entry is exactly 1.0.
    cdf: Vec<f64>,
}

impl Zipf {
    /// `n` ranks with exponent `s` (`s = 0` is uniform; larger is more skewed).
    pub fn new(n: u64, s: f64) -> Result<Zipf, LoadgenError> {
        if n == 0 {
            return Err(LoadgenError::Config(
                "a Zipf population needs at least 1 key".into(),
            ));
        }
        if !s.is_finite() || s < 0.0 {
            return Err(LoadgenError::Config(format!(
                "the Zipf exponent must be a finite number >= 0, got {s}"
            )));
        }
        let len = usize::try_from(n).map_err(|_| {
            LoadgenError::Config(format!(
                "a Zipf population of {n} keys does not fit in memory"
            ))
        })?;
        let mut cdf = Vec::with_capacity(len);
        let mut sum = 0.0f64;
        for k in 1..=n {
            sum += (k as f64).powf(-s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        // Rounding may leave the last entry a hair below 1.0, and a uniform draw in that gap
        // would fall off the end of the search.
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Ok(Zipf { cdf })
    }

    pub fn len(&self) -> u64 {
        self.cdf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.cdf.is_empty()
    }

    /// The probability of rank `k` (1-based); 0 outside `1..=n`.
    pub fn probability(&self, k: u64) -> f64 {
        let Some(i) = k.checked_sub(1).and_then(|i| usize::try_from(i).ok()) else {
            return 0.0;
        };
        match (self.cdf.get(i), i.checked_sub(1)) {
            (Some(c), None) => *c,
            (Some(c), Some(prev)) => c - self.cdf.get(prev).copied().unwrap_or(0.0),
            (None, _) => 0.0,
        }
    }

    /// A rank in `1..=n`; rank 1 is the most frequent.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        let u: f64 = rng.random();
        let i = self.cdf.partition_point(|&c| c <= u);
        // u < 1.0 = the last entry, so i < len; the min only guards against that ever changing.
        let i = i.min(self.cdf.len().saturating_sub(1));
        i as u64 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn rejects_bad_parameters() {
        assert!(Zipf::new(0, 1.1).is_err());
        assert!(Zipf::new(10, -0.5).is_err());
        assert!(Zipf::new(10, f64::NAN).is_err());
        assert!(Zipf::new(10, f64::INFINITY).is_err());
        assert!(Zipf::new(1, 0.0).is_ok());
    }

    #[test]
    fn same_seed_same_samples() {
        let z = Zipf::new(1000, 1.1).unwrap();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..1000).map(|_| z.sample(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn samples_stay_in_range_and_rank_one_is_most_frequent() {
        let n = 50;
        let z = Zipf::new(n, 1.1).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = vec![0u64; n as usize + 1];
        for _ in 0..100_000 {
            let k = z.sample(&mut rng);
            assert!((1..=n).contains(&k), "sample {k} out of 1..={n}");
            counts[k as usize] += 1;
        }
        assert_eq!(counts[0], 0);
        let top = (1..=n as usize).max_by_key(|&k| counts[k]).unwrap();
        assert_eq!(top, 1);
        assert!(counts[1] > counts[2] && counts[2] > counts[10]);
    }

    #[test]
    fn rank_one_frequency_matches_the_formula() {
        let (n, s) = (100u64, 1.1f64);
        let harmonic: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
        let expected = 1.0 / harmonic;
        let z = Zipf::new(n, s).unwrap();
        assert!((z.probability(1) - expected).abs() < 1e-12);

        let mut rng = StdRng::seed_from_u64(1);
        let draws = 200_000;
        let ones = (0..draws).filter(|_| z.sample(&mut rng) == 1).count();
        let observed = ones as f64 / draws as f64;
        // Binomial standard deviation here is about 0.001; 0.01 is far outside chance.
        assert!(
            (observed - expected).abs() < 0.01,
            "rank 1: observed {observed}, expected {expected}"
        );
    }

    #[test]
    fn exponent_zero_is_uniform_and_probabilities_sum_to_one() {
        let z = Zipf::new(4, 0.0).unwrap();
        for k in 1..=4 {
            assert!((z.probability(k) - 0.25).abs() < 1e-12);
        }
        assert_eq!(z.probability(0), 0.0);
        assert_eq!(z.probability(5), 0.0);
        let z = Zipf::new(1000, 1.3).unwrap();
        let total: f64 = (1..=1000).map(|k| z.probability(k)).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_single_key_always_samples_rank_one() {
        let z = Zipf::new(1, 2.0).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        assert!((0..100).all(|_| z.sample(&mut rng) == 1));
    }
}
