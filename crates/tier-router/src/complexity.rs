//! Task complexity: a score from a task's features by documented weighted rules, and the
//! local tier (small, medium, large) that the score asks for.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::tier::Tier;

/// What the router knows about a task before serving it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskFeatures {
    /// Input size in tokens (or a close estimate). The dominant feature.
    pub tokens: usize,
    /// School grade the content is written for (1–12), when known. Grades 11–12 raise complexity.
    pub grade_level: Option<u8>,
    /// Subject of the content, when known; technical subjects raise complexity.
    pub subject: Option<String>,
    /// A caller's own adjustment added to the score (may be negative); 0 by default.
    pub extra: f32,
    /// Tokens the task is expected to produce (a generation's `max_tokens`); 0 by default.
    pub output_tokens: usize,
    /// The caller's own judgement of how hard the task is, in `[0, 1]` (values outside are
    /// clamped, NaN ignored); none by default.
    pub difficulty: Option<f32>,
}

impl TaskFeatures {
    /// Features for a task of `tokens` tokens with nothing else known.
    pub fn with_tokens(tokens: usize) -> Self {
        Self {
            tokens,
            ..Self::default()
        }
    }
}

/// The weights and thresholds that turn [`TaskFeatures`] into a score and a local tier.
///
/// The score is the sum of:
/// - `tokens / tokens_per_point` (default 64 tokens per point: 512 tokens score 8, 2048 score 32);
/// - `senior_grade_weight` (default 4) when the grade is `senior_grade_min` (11) or above, or
///   `middle_grade_weight` (default 2) when it is `middle_grade_min` (9) or above;
/// - `technical_subject_weight` (default 4) when the subject contains (case-insensitively)
///   one of `technical_subjects`;
/// - `output_tokens / output_tokens_per_point` (default 32: producing a token costs a
///   decoder a whole step, reading one a share of a batched prefill);
/// - `difficulty * difficulty_weight` (default 10: a caller's "hardest" moves a short task
///   from small to medium);
/// - the task's own `extra`.
///
/// The local tier is `Small` when `tokens <= small_max_tokens` (512) and
/// `score <= small_max_complexity` (10), `Medium` when `tokens <= medium_max_tokens` (2048) and
/// `score <= medium_max_complexity` (20), `Large` otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ComplexityConfig {
    /// Tokens per complexity point. Default 64.
    pub tokens_per_point: f32,
    /// Lowest grade counted as senior. Default 11.
    pub senior_grade_min: u8,
    /// Points added for a senior grade. Default 4.
    pub senior_grade_weight: f32,
    /// Lowest grade counted as middle. Default 9.
    pub middle_grade_min: u8,
    /// Points added for a middle grade. Default 2.
    pub middle_grade_weight: f32,
    /// Subjects (substrings, case-insensitive) counted as technical. Default: mathematics,
    /// math, physics, chemistry, biology, computer, programming, engineering, statistics,
    /// calculus, medicine, law.
    pub technical_subjects: Vec<String>,
    /// Points added for a technical subject. Default 4.
    pub technical_subject_weight: f32,
    /// Expected output tokens per complexity point. Default 32.
    pub output_tokens_per_point: f32,
    /// Points a difficulty of 1 adds. Default 10.
    pub difficulty_weight: f32,
    /// Largest token count for the small tier. Default 512.
    pub small_max_tokens: usize,
    /// Largest score for the small tier. Default 10.
    pub small_max_complexity: f32,
    /// Largest token count for the medium tier. Default 2048.
    pub medium_max_tokens: usize,
    /// Largest score for the medium tier. Default 20.
    pub medium_max_complexity: f32,
}

impl Default for ComplexityConfig {
    fn default() -> Self {
        Self {
            tokens_per_point: 64.0,
            senior_grade_min: 11,
            senior_grade_weight: 4.0,
            middle_grade_min: 9,
            middle_grade_weight: 2.0,
            technical_subjects: [
                "mathematics",
                "math",
                "physics",
                "chemistry",
                "biology",
                "computer",
                "programming",
                "engineering",
                "statistics",
                "calculus",
                "medicine",
                "law",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            technical_subject_weight: 4.0,
            output_tokens_per_point: 32.0,
            difficulty_weight: 10.0,
            small_max_tokens: 512,
            small_max_complexity: 10.0,
            medium_max_tokens: 2048,
            medium_max_complexity: 20.0,
        }
    }
}

/// A complexity score with its parts, so the decision can be explained.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Complexity {
    /// The total score.
    pub score: f32,
    /// Points from the token count.
    pub from_tokens: f32,
    /// Points from the grade level.
    pub from_grade: f32,
    /// Points from the subject.
    pub from_subject: f32,
    /// Points from the expected output tokens.
    pub from_output: f32,
    /// Points from the caller's difficulty.
    pub from_difficulty: f32,
    /// The task's own adjustment.
    pub extra: f32,
    /// The local tier the score and token count ask for.
    pub tier: Tier,
}

impl ComplexityConfig {
    /// Checks the values: weights finite, `tokens_per_point > 0`, thresholds ordered.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.output_tokens_per_point.is_finite() && self.output_tokens_per_point > 0.0) {
            return Err(Error::invalid(
                "complexity.output_tokens_per_point",
                self.output_tokens_per_point,
                "a finite number above 0 (default 32)",
            ));
        }
        if !self.difficulty_weight.is_finite() {
            return Err(Error::invalid(
                "complexity.difficulty_weight",
                self.difficulty_weight,
                "a finite number (default 10)",
            ));
        }
        if !(self.tokens_per_point.is_finite() && self.tokens_per_point > 0.0) {
            return Err(Error::invalid(
                "complexity.tokens_per_point",
                self.tokens_per_point,
                "a finite number above 0 (default 64)",
            ));
        }
        for (field, v) in [
            ("complexity.senior_grade_weight", self.senior_grade_weight),
            ("complexity.middle_grade_weight", self.middle_grade_weight),
            (
                "complexity.technical_subject_weight",
                self.technical_subject_weight,
            ),
            ("complexity.small_max_complexity", self.small_max_complexity),
            (
                "complexity.medium_max_complexity",
                self.medium_max_complexity,
            ),
        ] {
            if !v.is_finite() {
                return Err(Error::invalid(field, v, "a finite number"));
            }
        }
        if self.small_max_tokens > self.medium_max_tokens {
            return Err(Error::invalid(
                "complexity.small_max_tokens",
                self.small_max_tokens,
                "at most medium_max_tokens (defaults 512 and 2048)",
            ));
        }
        if self.small_max_complexity > self.medium_max_complexity {
            return Err(Error::invalid(
                "complexity.small_max_complexity",
                self.small_max_complexity,
                "at most medium_max_complexity (defaults 10 and 20)",
            ));
        }
        Ok(())
    }

    /// Scores a task and picks its local tier.
    pub fn score(&self, task: &TaskFeatures) -> Complexity {
        let from_tokens = task.tokens as f32 / self.tokens_per_point;
        let from_grade = match task.grade_level {
            Some(g) if g >= self.senior_grade_min => self.senior_grade_weight,
            Some(g) if g >= self.middle_grade_min => self.middle_grade_weight,
            _ => 0.0,
        };
        let from_subject = match &task.subject {
            Some(s) => {
                let s = s.to_lowercase();
                if self
                    .technical_subjects
                    .iter()
                    .any(|t| !t.is_empty() && s.contains(&t.to_lowercase()))
                {
                    self.technical_subject_weight
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        let extra = if task.extra.is_finite() {
            task.extra
        } else {
            0.0
        };
        let from_output = task.output_tokens as f32 / self.output_tokens_per_point;
        let from_difficulty = task
            .difficulty
            .filter(|d| !d.is_nan())
            .map_or(0.0, |d| d.clamp(0.0, 1.0) * self.difficulty_weight);
        let score = from_tokens + from_grade + from_subject + from_output + from_difficulty + extra;
        let tier = if task.tokens <= self.small_max_tokens && score <= self.small_max_complexity {
            Tier::Small
        } else if task.tokens <= self.medium_max_tokens && score <= self.medium_max_complexity {
            Tier::Medium
        } else {
            Tier::Large
        };
        Complexity {
            score,
            from_tokens,
            from_grade,
            from_subject,
            from_output,
            from_difficulty,
            extra,
            tier,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_tokens_and_difficulty_raise_the_tier() {
        let c = ComplexityConfig::default();
        let short = TaskFeatures {
            tokens: 30,
            output_tokens: 64,
            ..TaskFeatures::default()
        };
        assert_eq!(c.score(&short).tier, Tier::Small);
        assert_eq!(c.score(&short).from_output, 2.0);
        let hard = TaskFeatures {
            difficulty: Some(0.9),
            ..short.clone()
        };
        assert_eq!(c.score(&hard).tier, Tier::Medium);
        let long_answer = TaskFeatures {
            output_tokens: 512,
            ..short.clone()
        };
        assert_eq!(c.score(&long_answer).tier, Tier::Medium);
        // Out of range and NaN difficulties are clamped or ignored.
        let nan = TaskFeatures {
            difficulty: Some(f32::NAN),
            ..short.clone()
        };
        assert_eq!(c.score(&nan).from_difficulty, 0.0);
        let over = TaskFeatures {
            difficulty: Some(7.0),
            ..short
        };
        assert_eq!(c.score(&over).from_difficulty, 10.0);
    }

    #[test]
    fn tokens_dominate_and_thresholds_follow_defaults() {
        let c = ComplexityConfig::default();
        assert_eq!(c.score(&TaskFeatures::with_tokens(100)).tier, Tier::Small);
        assert_eq!(c.score(&TaskFeatures::with_tokens(512)).tier, Tier::Small);
        assert_eq!(c.score(&TaskFeatures::with_tokens(513)).tier, Tier::Medium);
        assert_eq!(c.score(&TaskFeatures::with_tokens(2048)).tier, Tier::Large); // score 32 > 20
        assert_eq!(c.score(&TaskFeatures::with_tokens(1280)).tier, Tier::Medium); // score 20
        assert_eq!(c.score(&TaskFeatures::with_tokens(5000)).tier, Tier::Large);
    }

    #[test]
    fn senior_grade_and_technical_subject_raise_the_score() {
        let c = ComplexityConfig::default();
        let plain = TaskFeatures::with_tokens(300);
        let hard = TaskFeatures {
            tokens: 300,
            grade_level: Some(12),
            subject: Some("AP Physics".into()),
            ..TaskFeatures::default()
        };
        let p = c.score(&plain);
        let h = c.score(&hard);
        assert_eq!(p.tier, Tier::Small);
        assert_eq!(h.from_grade, 4.0);
        assert_eq!(h.from_subject, 4.0);
        assert!(h.score > p.score + 7.9);
        assert_eq!(h.tier, Tier::Medium);
        let grade9 = TaskFeatures {
            grade_level: Some(9),
            ..plain.clone()
        };
        assert_eq!(c.score(&grade9).from_grade, 2.0);
        let history = TaskFeatures {
            subject: Some("History".into()),
            ..plain
        };
        assert_eq!(c.score(&history).from_subject, 0.0);
    }

    #[test]
    fn bad_config_is_reported_with_field() {
        let c = ComplexityConfig {
            tokens_per_point: 0.0,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("tokens_per_point"), "{e}");
        let c = ComplexityConfig {
            small_max_tokens: 4096,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        assert!(ComplexityConfig::default().validate().is_ok());
    }
}
