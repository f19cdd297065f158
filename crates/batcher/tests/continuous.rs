//! The continuous batcher: every joined sequence leaves exactly once, steps
//! stay within their budget, prefill is chunked beside decodes, admission
//! waits for room, deadlines and cancels apply while running.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batcher::{
    Admission, ContinuousBatcher, ContinuousConfig, Error, Exit, JoinOptions, Priority, Progress,
    Scheduled, StepHandler,
};
use parking_lot::Mutex;
use proptest::prelude::*;

#[derive(Debug)]
struct Seq {
    id: usize,
    prompt: usize,
    decode: usize,
    /// The step panics when this sequence decodes its first token.
    poison: bool,
    /// Room this sequence takes while it runs.
    room: usize,
    /// Tokens it has computed since it was last admitted (prompt read plus
    /// decoded): what a preemption makes it read again.
    held: usize,
}

#[derive(Debug, Default)]
struct Seen {
    exits: HashMap<usize, Vec<Exit>>,
    max_step_tokens: usize,
    max_batch: usize,
    steps_with_both: usize,
    overdrawn: bool,
    /// Tokens decoded, by sequence id.
    decoded: HashMap<usize, usize>,
    /// Sequences preempted, in order.
    preempted: Vec<usize>,
}

struct Handler {
    seen: Arc<Mutex<Seen>>,
    done: mpsc::Sender<usize>,
    room: usize,
    used: HashMap<usize, usize>,
    /// Every this many loop turns, all running sequences but one are
    /// preempted (0: never).
    preempt_every: usize,
    turns: usize,
    /// The first time this many run, all but one are preempted (0: never).
    preempt_once_at: usize,
}

impl StepHandler for Handler {
    type Seq = Seq;
    fn pending_tokens(&self, s: &Seq) -> usize {
        if s.prompt > 0 {
            s.prompt
        } else {
            usize::from(s.decode > 0)
        }
    }
    fn admit(&mut self, s: &mut Seq) -> Admission {
        if s.room > self.room {
            return Admission::Refuse(format!("needs {} of {}", s.room, self.room));
        }
        let used: usize = self.used.values().sum();
        if used + s.room > self.room {
            return Admission::Wait;
        }
        self.used.insert(s.id, s.room);
        Admission::Admit
    }
    fn preempt_wanted(&mut self, running: usize) -> usize {
        self.turns += 1;
        if self.preempt_once_at > 0 && running == self.preempt_once_at {
            self.preempt_once_at = 0;
            return running - 1;
        }
        if self.preempt_every > 0 && self.turns.is_multiple_of(self.preempt_every) {
            running.saturating_sub(1)
        } else {
            0
        }
    }
    fn preempt(&mut self, s: &mut Seq) {
        assert!(
            self.used.remove(&s.id).is_some(),
            "preempted a sequence not admitted"
        );
        s.prompt += s.held;
        s.held = 0;
        self.seen.lock().preempted.push(s.id);
    }
    fn step(&mut self, batch: &mut [Scheduled<'_, Seq>]) -> Vec<Progress> {
        let mut seen = self.seen.lock();
        let total: usize = batch.iter().map(|b| b.tokens).sum();
        seen.max_step_tokens = seen.max_step_tokens.max(total);
        seen.max_batch = seen.max_batch.max(batch.len());
        let prefills = batch.iter().filter(|b| b.seq.prompt > 0).count();
        if prefills > 0 && prefills < batch.len() {
            seen.steps_with_both += 1;
        }
        drop(seen);
        let mut out = Vec::new();
        for b in batch.iter_mut() {
            if b.tokens == 0 || b.tokens > self.pending_tokens(b.seq) {
                self.seen.lock().overdrawn = true;
            }
            if b.seq.prompt > 0 {
                let n = b.tokens.min(b.seq.prompt);
                b.seq.prompt -= n;
                b.seq.held += n;
                out.push(Progress::Continue);
                continue;
            }
            if b.seq.poison {
                panic!("poisoned sequence {}", b.seq.id);
            }
            b.seq.decode -= 1;
            b.seq.held += 1;
            *self.seen.lock().decoded.entry(b.seq.id).or_default() += 1;
            out.push(if b.seq.decode == 0 {
                Progress::Done
            } else {
                Progress::Continue
            });
        }
        out
    }
    fn finish(&mut self, s: Seq, exit: Exit) {
        self.used.remove(&s.id);
        if exit == Exit::Done {
            assert_eq!((s.prompt, s.decode), (0, 0), "done before its work");
        }
        self.seen.lock().exits.entry(s.id).or_default().push(exit);
        let _ = self.done.send(s.id);
    }
}

fn engine(
    config: ContinuousConfig,
    room: usize,
) -> (
    ContinuousBatcher<Seq>,
    Arc<Mutex<Seen>>,
    mpsc::Receiver<usize>,
) {
    engine_preempting(config, room, 0)
}

fn engine_preempting(
    config: ContinuousConfig,
    room: usize,
    preempt_every: usize,
) -> (
    ContinuousBatcher<Seq>,
    Arc<Mutex<Seen>>,
    mpsc::Receiver<usize>,
) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (tx, rx) = mpsc::channel();
    let h = Handler {
        seen: Arc::clone(&seen),
        done: tx,
        room,
        used: HashMap::new(),
        preempt_every,
        turns: 0,
        preempt_once_at: 0,
    };
    (ContinuousBatcher::new(config, h).unwrap(), seen, rx)
}

#[derive(Debug, Clone)]
struct Arrival {
    delay_us: u64,
    prompt: usize,
    decode: usize,
    priority: u8,
    poison: bool,
    /// Cancel (drop the handle) after this many microseconds.
    cancel_after_us: Option<u64>,
    /// A deadline this many microseconds after joining.
    deadline_us: Option<u64>,
    room: usize,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (
        0u64..300,
        0usize..300,
        1usize..12,
        1u8..4,
        prop::bool::weighted(0.1),
        prop::option::weighted(0.2, 0u64..3000),
        prop::option::weighted(0.15, 0u64..3000),
        1usize..6,
    )
        .prop_map(
            |(delay_us, prompt, decode, priority, poison, cancel_after_us, deadline_us, room)| {
                Arrival {
                    delay_us,
                    prompt,
                    decode,
                    priority,
                    poison,
                    cancel_after_us,
                    deadline_us,
                    room,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_joined_sequence_leaves_exactly_once(
        arrivals in prop::collection::vec(arrival(), 1..24),
        max_step_tokens in 8usize..96,
        max_running in 1usize..8,
        chunk in 1usize..64,
        room in 4usize..12,
        preempt_every in prop::sample::select(vec![0usize, 0, 3, 7]),
    ) {
        let config = ContinuousConfig {
            max_step_tokens,
            max_running: max_running.min(max_step_tokens),
            max_prefill_chunk: chunk,
            max_queued: 16,
            max_queue_wait: Duration::from_secs(20),
            ..ContinuousConfig::default()
        };
        let (eng, seen, rx) = engine_preempting(config, room, preempt_every);
        let mut accepted = Vec::new();
        let mut handles = Vec::new();
        let start = Instant::now();
        for (id, a) in arrivals.iter().enumerate() {
            std::thread::sleep(Duration::from_micros(a.delay_us));
            let seq = Seq { id, prompt: a.prompt, decode: a.decode, poison: a.poison, room: a.room, held: 0 };
            let options = JoinOptions {
                priority: Priority(a.priority),
                deadline: a.deadline_us.map(|us| Instant::now() + Duration::from_micros(us)),
            };
            match eng.join(seq, options) {
                Ok(h) => {
                    accepted.push(id);
                    handles.push((a.cancel_after_us.map(|us| Instant::now() + Duration::from_micros(us)), Some(h)));
                }
                Err(Error::QueueFull { queued, max_queued }) => prop_assert!(queued >= max_queued),
                Err(e) => prop_assert!(false, "unexpected refusal {e}"),
            }
            for (at, h) in &mut handles {
                if at.is_some_and(|t| Instant::now() >= t) {
                    h.take();
                }
            }
        }
        // Cancel the rest on time, keep the others until they leave.
        let mut left = 0;
        while left < accepted.len() {
            for (at, h) in &mut handles {
                if at.is_some_and(|t| Instant::now() >= t) {
                    h.take();
                }
            }
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(_) => left += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    prop_assert!(start.elapsed() < Duration::from_secs(30), "sequences never left");
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
        drop(handles);
        eng.shutdown();
        let seen = seen.lock();
        let panicked = arrivals.iter().any(|a| a.poison);
        prop_assert!(!seen.overdrawn, "a step ran more tokens than a sequence had pending");
        prop_assert!(seen.max_step_tokens <= max_step_tokens);
        prop_assert!(seen.max_batch <= max_running);
        prop_assert_eq!(seen.exits.len(), accepted.len());
        for id in &accepted {
            let exits = &seen.exits[id];
            prop_assert_eq!(exits.len(), 1, "sequence {} left {:?}", id, exits);
            let a = &arrivals[*id];
            let exit = &exits[0];
            if a.room > room {
                // Refused at admission, unless it was cancelled or expired first.
                let ok = matches!(exit, Exit::Refused { .. })
                    || (a.cancel_after_us.is_some() && *exit == Exit::Cancelled)
                    || (a.deadline_us.is_some() && *exit == Exit::Deadline);
                prop_assert!(ok, "{:?}", exit);
            } else if a.cancel_after_us.is_none() && a.deadline_us.is_none() && !panicked {
                prop_assert_eq!(exit, &Exit::Done, "sequence {} of {:?}", id, seen.exits);
            }
            if *exit == Exit::Done {
                // Preempted or not, every decode ran exactly once.
                prop_assert_eq!(seen.decoded.get(id).copied().unwrap_or(0), a.decode, "sequence {}", id);
            }
            if a.poison && a.cancel_after_us.is_none() && a.deadline_us.is_none() && a.room <= room {
                prop_assert!(matches!(exit, Exit::Failed { .. }), "{:?}", exit);
            }
        }
        let stats = eng.stats();
        prop_assert_eq!(stats.preempted as usize, seen.preempted.len());
        if preempt_every == 0 {
            prop_assert_eq!(stats.preempted, 0);
        }
        prop_assert_eq!(stats.finished as usize, accepted.len());
        prop_assert_eq!((stats.running, stats.queued), (0, 0));
    }
}

#[test]
fn prefill_is_chunked_beside_decodes() {
    let config = ContinuousConfig {
        max_step_tokens: 16,
        max_running: 4,
        max_prefill_chunk: 8,
        ..ContinuousConfig::default()
    };
    let (eng, seen, rx) = engine(config, 100);
    // `a` decodes until it is cancelled, so it is still running whatever the
    // threads' timing when `b` joins (with a fixed length it could finish
    // before `b` is admitted on a loaded machine).
    let a = eng
        .join(
            Seq {
                id: 0,
                prompt: 0,
                decode: usize::MAX,
                poison: false,
                room: 1,
                held: 0,
            },
            JoinOptions::default(),
        )
        .unwrap();
    let b = eng
        .join(
            Seq {
                id: 1,
                prompt: 400,
                decode: 1,
                poison: false,
                room: 1,
                held: 0,
            },
            JoinOptions::default(),
        )
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
    a.cancel();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 0);
    drop((a, b));
    let seen = seen.lock();
    assert_eq!(seen.exits[&0], vec![Exit::Cancelled]);
    assert_eq!(seen.exits[&1], vec![Exit::Done]);
    assert!(
        seen.steps_with_both > 0,
        "no step held a decode and a prefill chunk"
    );
    assert!(seen.max_step_tokens <= 16);
    assert_eq!(seen.decoded[&1], 1);
    let stats = eng.stats();
    assert_eq!(stats.prefill_tokens, 400);
    assert_eq!(stats.decode_tokens as usize, seen.decoded[&0] + 1);
}

#[test]
fn a_lowered_step_budget_bounds_every_later_step_and_the_sequences_admitted() {
    let config = ContinuousConfig {
        max_step_tokens: 64,
        max_running: 8,
        max_prefill_chunk: 64,
        ..ContinuousConfig::default()
    };
    let (eng, seen, rx) = engine(config, 100);
    assert_eq!(eng.max_step_tokens(), 64);
    assert!(matches!(
        eng.set_max_step_tokens(0),
        Err(Error::InvalidConfig {
            field: "max_step_tokens",
            ..
        })
    ));
    assert!(matches!(
        eng.set_max_step_tokens(65),
        Err(Error::InvalidConfig {
            field: "max_step_tokens",
            ..
        })
    ));
    assert_eq!(eng.set_max_step_tokens(4).unwrap(), 64);
    assert_eq!(eng.stats().step_tokens, 4);
    let seq = |id| Seq {
        id,
        prompt: 50,
        decode: 6,
        poison: false,
        room: 1,
        held: 0,
    };
    let handles: Vec<_> = (0..6)
        .map(|id| eng.join(seq(id), JoinOptions::default()).unwrap())
        .collect();
    for _ in 0..6 {
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    {
        let mut s = seen.lock();
        assert!(
            s.exits.values().all(|e| e == &vec![Exit::Done]),
            "{:?}",
            s.exits
        );
        assert_eq!(
            s.max_step_tokens, 4,
            "a step held more than the lowered budget"
        );
        assert!(
            s.max_batch <= 4,
            "{} sequences ran in one step",
            s.max_batch
        );
        s.max_step_tokens = 0;
    }
    drop(handles);
    // Raised again, a long prompt is read in steps of the whole budget.
    assert_eq!(eng.set_max_step_tokens(64).unwrap(), 4);
    let h = eng.join(seq(10), JoinOptions::default()).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 10);
    drop(h);
    assert_eq!(seen.lock().max_step_tokens, 50);
    assert_eq!(eng.stats().prefill_tokens, 6 * 50 + 50);
}

#[test]
fn a_sequence_without_room_waits_then_leaves_with_no_room() {
    let config = ContinuousConfig {
        max_queue_wait: Duration::from_millis(100),
        ..ContinuousConfig::default()
    };
    let (eng, seen, rx) = engine(config, 4);
    // The first takes all the room for a long time; the second waits.
    let long = eng
        .join(
            Seq {
                id: 0,
                prompt: 0,
                decode: usize::MAX,
                poison: false,
                room: 4,
                held: 0,
            },
            JoinOptions::default(),
        )
        .unwrap();
    let waiting = eng
        .join(
            Seq {
                id: 1,
                prompt: 3,
                decode: 1,
                poison: false,
                room: 2,
                held: 0,
            },
            JoinOptions::default(),
        )
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
    assert!(matches!(
        seen.lock().exits[&1][0],
        Exit::NoRoom { waited_ms } if waited_ms >= 100
    ));
    // Cancelling the long one frees its room at once.
    drop(long);
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 0);
    assert_eq!(seen.lock().exits[&0], vec![Exit::Cancelled]);
    drop(waiting);
}

#[test]
fn deadline_applies_while_running() {
    let (eng, seen, rx) = engine(ContinuousConfig::default(), 4);
    let h = eng
        .join(
            Seq {
                id: 0,
                prompt: 0,
                decode: usize::MAX,
                poison: false,
                room: 1,
                held: 0,
            },
            JoinOptions {
                deadline: Some(Instant::now() + Duration::from_millis(30)),
                ..JoinOptions::default()
            },
        )
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 0);
    assert_eq!(seen.lock().exits[&0], vec![Exit::Deadline]);
    assert!(eng.stats().steps > 0, "it ran before its deadline");
    drop(h);
}

#[test]
fn shutdown_finishes_everything_left() {
    let (eng, seen, _rx) = engine(ContinuousConfig::default(), 1);
    let handles: Vec<_> = (0..3)
        .map(|id| {
            eng.join(
                Seq {
                    id,
                    prompt: 0,
                    decode: usize::MAX,
                    poison: false,
                    room: 1,
                    held: 0,
                },
                JoinOptions::default(),
            )
            .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    eng.shutdown();
    let seen = seen.lock();
    for id in 0..3 {
        assert_eq!(seen.exits[&id], vec![Exit::Shutdown]);
    }
    assert!(matches!(
        eng.join(
            Seq {
                id: 9,
                prompt: 0,
                decode: 1,
                poison: false,
                room: 1,
                held: 0,
            },
            JoinOptions::default()
        ),
        Err(Error::ShutDown)
    ));
    drop(handles);
}

#[test]
fn invalid_config_is_refused() {
    let config = ContinuousConfig {
        max_running: 10,
        max_step_tokens: 4,
        ..ContinuousConfig::default()
    };
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (tx, _rx) = mpsc::channel();
    let h = Handler {
        seen,
        done: tx,
        room: 1,
        used: HashMap::new(),
        preempt_every: 0,
        turns: 0,
        preempt_once_at: 0,
    };
    let e = ContinuousBatcher::new(config, h).unwrap_err();
    assert!(e.to_string().contains("max_running"), "{e}");
}

#[test]
fn preempted_sequences_go_back_to_the_queue_recompute_and_finish() {
    // Every second loop turn all running sequences but one are preempted.
    let config = ContinuousConfig {
        max_step_tokens: 64,
        max_running: 4,
        max_prefill_chunk: 16,
        ..ContinuousConfig::default()
    };
    let (eng, seen, rx) = engine_preempting(config, 100, 2);
    let priorities = [1u8, 3, 2, 1];
    let handles: Vec<_> = priorities
        .iter()
        .enumerate()
        .map(|(id, &p)| {
            eng.join(
                Seq {
                    id,
                    prompt: 40,
                    decode: 30,
                    poison: false,
                    room: 1,
                    held: 0,
                },
                JoinOptions {
                    priority: Priority(p),
                    deadline: None,
                },
            )
            .unwrap()
        })
        .collect();
    for _ in 0..4 {
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
    }
    let stats = eng.stats();
    let seen = seen.lock();
    for id in 0..4 {
        assert_eq!(seen.exits[&id], vec![Exit::Done], "sequence {id}");
        assert_eq!(
            seen.decoded[&id], 30,
            "sequence {id} decoded each token once"
        );
    }
    assert!(stats.preempted > 0, "{stats:?}");
    assert_eq!(stats.preempted as usize, seen.preempted.len());
    // The highest priority (sequence 1) is always the one kept.
    assert!(!seen.preempted.contains(&1), "{:?}", seen.preempted);
    drop(handles);
}

#[test]
fn preemption_picks_the_lowest_priority_latest_joined_first() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (tx, rx) = mpsc::channel();
    let h = Handler {
        seen: Arc::clone(&seen),
        done: tx,
        room: 100,
        used: HashMap::new(),
        preempt_every: 0,
        turns: 0,
        preempt_once_at: 4,
    };
    let eng = ContinuousBatcher::new(ContinuousConfig::default(), h).unwrap();
    // Priorities 1, 3, 2, 1: once all four run, three are preempted,
    // sequence 3 (lowest, latest) first, then 0, then 2; 1 is kept.
    let handles: Vec<_> = [1u8, 3, 2, 1]
        .iter()
        .enumerate()
        .map(|(id, &p)| {
            eng.join(
                Seq {
                    id,
                    prompt: 8,
                    decode: 400,
                    poison: false,
                    room: 1,
                    held: 0,
                },
                JoinOptions {
                    priority: Priority(p),
                    deadline: None,
                },
            )
            .unwrap()
        })
        .collect();
    for _ in 0..4 {
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
    }
    let seen = seen.lock();
    assert_eq!(seen.preempted, vec![3, 0, 2]);
    for id in 0..4 {
        assert_eq!(seen.exits[&id], vec![Exit::Done], "sequence {id}");
        assert_eq!(seen.decoded[&id], 400, "sequence {id}");
    }
    drop(handles);
}
