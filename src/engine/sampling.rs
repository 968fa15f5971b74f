//! Token sampling: greedy at temperature 0, otherwise temperature, top-k and top-p (nucleus) over a
//! seeded generator, so a request's `seed` reproduces its output. Log probabilities are reported
//! from the distribution a token is drawn from: the logits (after any grammar mask) divided by the
//! temperature, before top-k and top-p cut it, as OpenAI documents; at temperature 0 (greedy) the
//! logits as they are.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / t))
            .collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 && self.params.top_k < cand.len() {
            cand.truncate(self.params.top_k);
        }
        let max = cand.first().map_or(0.0, |c| c.1);
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        for p in &mut probs {
            *p /= sum;
        }
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            for p in &mut probs {
                *p /= s;
            }
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len().saturating_sub(1)].0
    }
}

/// A sampled token's log probability and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// `chosen`'s log probability and the `top` most likely tokens under `logits / temperature`
/// (temperature 1 when greedy). Tokens at -inf (masked) have probability 0 and are never listed.
pub fn logprobs(logits: &[f32], temperature: f32, chosen: u32, top: usize) -> TokenLogprob {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    // log-sum-exp in f64: 49k terms of f32 would lose the small ones.
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| f64::from((l - max) / t).exp())
        .sum();
    let lse = f64::from(max / t) + sum.ln();
    let lp = |l: f32| (f64::from(l / t) - lse) as f32;
    // The `top` largest logits, kept sorted (largest first) as they are found.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if !l.is_finite() || (best.len() == top && l <= best[top - 1].1) {
                continue;
            }
            let at = best.partition_point(|b| b.1 >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    TokenLogprob {
        token: chosen,
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: best.into_iter().map(|(i, l)| (i, lp(l))).collect(),
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_maximum() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.1, 3.0, -1.0]), 1);
    }

    #[test]
    fn a_seed_reproduces_and_top_k_restricts() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                top_k: 5,
                seed: Some(seed),
            });
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let mut top5: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
        top5.sort_by(|a, b| b.1.total_cmp(&a.1));
        let allowed: Vec<u32> = top5[..5].iter().map(|x| x.0 as u32).collect();
        assert!(draw(3).iter().all(|t| allowed.contains(t)));
    }

    #[test]
    fn logprobs_are_a_distribution_over_the_unmasked_tokens() {
        let logits = [1.0f32, 3.0, f32::NEG_INFINITY, 2.0, 0.5];
        for t in [0.0f32, 0.7, 1.0, 1.8] {
            let lp = logprobs(&logits, t, 3, 20);
            // Every unmasked token is listed, most likely first; the masked one is not.
            let ids: Vec<u32> = lp.top.iter().map(|x| x.0).collect();
            assert_eq!(ids, vec![1, 3, 0, 4]);
            let total: f32 = lp.top.iter().map(|x| x.1.exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "t={t}: {total}");
            assert_eq!(lp.logprob, lp.top[1].1);
            // Temperature sharpens: the ratio of the two best is (3 - 2) / t in log space.
            let tt = if t > 0.0 { t } else { 1.0 };
            assert!((lp.top[0].1 - lp.top[1].1 - 1.0 / tt).abs() < 1e-5);
        }
        let two = logprobs(&logits, 1.0, 0, 2);
        assert_eq!(two.top.len(), 2);
        assert!(two.top.iter().map(|x| x.1.exp()).sum::<f32>() <= 1.0);
        assert!(logprobs(&logits, 1.0, 0, 0).top.is_empty());
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 1e-6,
            top_k: 0,
            seed: Some(1),
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 5.0, 4.9]), 1);
        }
    }
}
