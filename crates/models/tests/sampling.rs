//! Properties of the sampler and the stop-string matcher.

use models::{Sampler, SamplingConfig, StopMatcher};
use proptest::prelude::*;

fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-20.0f32..20.0, 1..400)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn greedy_is_argmax(logits in logits_strategy()) {
        let mut s = Sampler::new(SamplingConfig::greedy()).unwrap();
        let id = s.sample(&logits).unwrap() as usize;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        prop_assert_eq!(logits[id], max);
        prop_assert_eq!(logits.iter().position(|&l| l == max), Some(id));
    }

    #[test]
    fn top_k_never_leaves_the_k_best(logits in logits_strategy(), k in 1usize..20, seed in any::<u64>()) {
        let mut s = Sampler::new(SamplingConfig {
            top_k: k,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 5.0,
            seed: Some(seed),
            ..SamplingConfig::default()
        })
        .unwrap();
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[(k.min(logits.len())) - 1];
        for _ in 0..20 {
            let id = s.sample(&logits).unwrap() as usize;
            prop_assert!(logits[id] >= kth, "token {} with {} below the k-th best {}", id, logits[id], kth);
        }
    }

    #[test]
    fn min_p_and_top_p_keep_only_likely_tokens(logits in logits_strategy(), seed in any::<u64>(), min_p in 0.01f32..1.0) {
        let mut s = Sampler::new(SamplingConfig {
            top_k: 0,
            top_p: 1.0,
            min_p,
            temperature: 1.0,
            seed: Some(seed),
            ..SamplingConfig::default()
        })
        .unwrap();
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        for _ in 0..10 {
            let id = s.sample(&logits).unwrap() as usize;
            // p(id) >= min_p * p(max)  <=>  logit >= max + ln(min_p)
            prop_assert!(logits[id] >= max + min_p.ln() - 1e-4);
        }
    }

    #[test]
    fn a_seed_reproduces(logits in logits_strategy(), seed in any::<u64>()) {
        let cfg = SamplingConfig {
            seed: Some(seed),
            temperature: 1.5,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
            repeat_penalty: 1.2,
            ..SamplingConfig::default()
        };
        let run = |cfg: SamplingConfig| {
            let mut s = Sampler::new(cfg).unwrap();
            (0..16).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        prop_assert_eq!(run(cfg.clone()), run(cfg));
    }

    #[test]
    fn stop_strings_never_leak(
        chunks in prop::collection::vec("[ab\\n]{0,6}", 0..12),
        stops in prop::collection::vec("[ab\\n]{1,4}", 1..3),
    ) {
        let full: String = chunks.concat();
        let mut m = StopMatcher::new(stops.clone());
        let mut shown = String::new();
        let mut stopped = false;
        for c in &chunks {
            let o = m.push(c);
            shown.push_str(&o.text);
            if o.stopped {
                stopped = true;
                break;
            }
        }
        if !stopped {
            shown.push_str(&m.finish());
        }
        // Generation ends at the first chunk after which a stop string has
        // appeared in the text so far (nothing is generated past it); what
        // was shown is that text up to the earliest stop in it, or all of
        // the text when no stop ever appears.
        let mut seen = String::new();
        let mut first = None;
        for c in &chunks {
            seen.push_str(c);
            if let Some(pos) = stops.iter().filter_map(|s| seen.find(s.as_str())).min() {
                first = Some(seen[..pos].to_string());
                break;
            }
        }
        match first {
            Some(before_stop) => {
                prop_assert!(stopped);
                prop_assert_eq!(&shown, &before_stop);
            }
            None => {
                prop_assert!(!stopped);
                prop_assert_eq!(&shown, &full);
            }
        }
        for s in &stops {
            prop_assert!(!shown.contains(s.as_str()));
        }
    }
}

#[test]
fn sampling_follows_the_distribution() {
    // Two tokens with probabilities 0.8 / 0.2 at temperature 1.
    let logits = [0.8f32.ln(), 0.2f32.ln()];
    let mut s = Sampler::new(SamplingConfig {
        seed: Some(1),
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        ..SamplingConfig::default()
    })
    .unwrap();
    let n = 20_000;
    let zeros = (0..n).filter(|_| s.sample(&logits).unwrap() == 0).count();
    let share = zeros as f64 / n as f64;
    assert!((share - 0.8).abs() < 0.02, "{share}");
}

#[test]
fn config_round_trips_through_json_with_defaults() {
    let c: SamplingConfig =
        serde_json::from_str(r#"{"temperature": 0.5, "stop": ["\n\n"]}"#).unwrap();
    assert_eq!(c.temperature, 0.5);
    assert_eq!(c.top_k, SamplingConfig::default().top_k);
    assert_eq!(c.stop, vec!["\n\n".to_string()]);
    let back: SamplingConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn stop_tokens_and_empty_logits() {
    let s = Sampler::new(SamplingConfig {
        stop_tokens: vec![7],
        ..SamplingConfig::greedy()
    })
    .unwrap()
    .with_stop_tokens([2]);
    assert!(s.is_stop_token(7) && s.is_stop_token(2) && !s.is_stop_token(3));
    let mut s = s;
    assert!(s.sample(&[]).is_err());
}
