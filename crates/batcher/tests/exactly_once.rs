//! Property: under random arrivals, sizes, priorities, deadlines,
//! cancellations, handler panics and wrong result counts, every accepted
//! request is answered exactly once, with its own result, and every error
//! it gets is one its history allows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use batcher::{
    BatcherBuilder, BatcherConfig, Error, Priority, ShutdownMode, Submit, Ticket, WeightMode,
};
use proptest::prelude::*;

const BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq)]
struct Item {
    id: u32,
    weight: u32,
    panic: bool,
    wrong: bool,
    warm: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct HandlerError(u32);

#[derive(Debug, Clone)]
enum Op {
    Submit {
        weight: u32,
        priority: u8,
        deadline_us: Option<u64>,
        panic: bool,
        wrong: bool,
        /// 0: keep, 1: cancel() right away, 2: drop the ticket.
        fate: u8,
    },
    Sleep(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            1u32..64,
            0u8..4,
            prop::option::weighted(0.3, 0u64..4000),
            prop::bool::weighted(0.08),
            prop::bool::weighted(0.05),
            prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        )
            .prop_map(|(weight, priority, deadline_us, panic, wrong, fate)| Op::Submit {
                weight,
                priority,
                deadline_us,
                panic,
                wrong,
                fate,
            }),
        1 => (0u64..1500).prop_map(Op::Sleep),
    ]
}

#[derive(Debug, Clone)]
struct Setup {
    max_batch_size: usize,
    max_batch_weight: u64,
    padded: bool,
    max_delay_us: u64,
    wait_when_idle: bool,
    workers: usize,
    max_queued: usize,
    buckets: bool,
    prepare: bool,
    fail_on_shutdown: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        1usize..8,
        64u64..256,
        any::<bool>(),
        0u64..2000,
        any::<bool>(),
        1usize..3,
        4usize..48,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                max_batch_size,
                max_batch_weight,
                padded,
                max_delay_us,
                wait_when_idle,
                workers,
                max_queued,
                buckets,
                prepare,
                fail_on_shutdown,
            )| Setup {
                max_batch_size,
                max_batch_weight,
                padded,
                max_delay_us,
                wait_when_idle,
                workers,
                max_queued,
                buckets,
                prepare,
                fail_on_shutdown,
            },
        )
}

type Batches = Arc<Mutex<Vec<Vec<Item>>>>;
/// An accepted request: what was sent, its deadline, whether `cancel()`
/// removed it, and its ticket.
type Kept = (Item, Option<u64>, bool, Ticket<u64, HandlerError>);

fn handle(log: &Batches, batch: Vec<Item>) -> Vec<Result<u64, HandlerError>> {
    log.lock().unwrap().push(batch.clone());
    if batch.iter().any(|i| i.panic) {
        panic!("test panic");
    }
    let mut out: Vec<_> = batch
        .iter()
        .map(|i| {
            if i.id % 11 == 5 {
                Err(HandlerError(i.id))
            } else {
                Ok(u64::from(i.id) * 3 + 1)
            }
        })
        .collect();
    if batch.iter().any(|i| i.wrong) {
        out.pop();
    }
    out
}

fn run(setup: Setup, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let config = BatcherConfig {
        max_batch_size: setup.max_batch_size,
        max_batch_weight: setup.max_batch_weight,
        weight_mode: if setup.padded {
            WeightMode::Padded
        } else {
            WeightMode::Sum
        },
        max_delay: Duration::from_micros(setup.max_delay_us),
        wait_when_idle: setup.wait_when_idle,
        max_queued: setup.max_queued,
        max_concurrent_batches: setup.workers,
        priority_aging: Duration::from_millis(1),
        on_shutdown: if setup.fail_on_shutdown {
            ShutdownMode::Fail
        } else {
            ShutdownMode::Drain
        },
        ..BatcherConfig::default()
    };
    let mut builder = BatcherBuilder::new(config).weigher(|i: &Item| u64::from(i.weight));
    if setup.buckets {
        builder = builder.bucket_by(|i: &Item| u64::from(i.weight / 16));
    }
    let log: Batches = Arc::default();
    let l = Arc::clone(&log);
    let batcher = if setup.prepare {
        builder.build_with_prepare(
            |items: Vec<Item>| items,
            move |_| {
                let l = Arc::clone(&l);
                move |batch: Vec<Item>| handle(&l, batch)
            },
        )
    } else {
        builder.build(move |_| {
            let l = Arc::clone(&l);
            move |batch: Vec<Item>| handle(&l, batch)
        })
    }
    .unwrap();

    let mut kept: Vec<Kept> = Vec::new();
    let mut removed: Vec<u32> = Vec::new();
    let mut rejected: Vec<u32> = Vec::new();
    let mut next_id = 0u32;
    for op in ops {
        match op {
            Op::Sleep(us) => thread::sleep(Duration::from_micros(us)),
            Op::Submit {
                weight,
                priority,
                deadline_us,
                panic,
                wrong,
                fate,
            } => {
                let item = Item {
                    id: next_id,
                    weight,
                    panic,
                    wrong,
                    warm: priority == 0,
                };
                next_id += 1;
                let mut opts = Submit::priority(Priority(priority));
                if let Some(us) = deadline_us {
                    opts = opts.timeout(Duration::from_micros(us));
                }
                match batcher.submit_with(item, opts) {
                    Ok(t) => match fate {
                        0 => kept.push((item, deadline_us, false, t)),
                        1 => {
                            let was_queued = t.cancel();
                            if was_queued {
                                removed.push(item.id);
                            }
                            kept.push((item, deadline_us, was_queued, t));
                        }
                        _ => drop(t),
                    },
                    Err(Error::Overloaded { .. }) => rejected.push(item.id),
                    Err(Error::TooHeavy { .. }) => {
                        prop_assert!(u64::from(weight) > setup.max_batch_weight);
                        rejected.push(item.id);
                    }
                    Err(e) => prop_assert!(false, "unexpected submit error {e:?}"),
                }
            }
        }
    }
    batcher.shutdown();

    // Which batch each request ran in; none may run twice.
    let batches = log.lock().unwrap().clone();
    let mut ran_in: HashMap<u32, usize> = HashMap::new();
    for (k, b) in batches.iter().enumerate() {
        prop_assert!(!b.is_empty() && b.len() <= setup.max_batch_size);
        for i in b {
            prop_assert!(
                ran_in.insert(i.id, k).is_none(),
                "request {} ran twice",
                i.id
            );
        }
        if setup.buckets {
            prop_assert!(b.iter().all(|i| i.weight / 16 == b[0].weight / 16));
        }
        // Warm-up requests never share a batch with user requests.
        prop_assert!(b.iter().all(|i| i.warm == b[0].warm));
    }
    for id in rejected.iter().chain(&removed) {
        prop_assert!(
            !ran_in.contains_key(id),
            "request {} should not have run",
            id
        );
    }

    for (item, deadline, cancelled, mut t) in kept {
        let answer = t.wait_timeout(BOUND);
        prop_assert!(answer.is_some(), "request {} never answered", item.id);
        let answer = answer.unwrap();
        // A second wait yields no second answer.
        prop_assert_eq!(
            t.wait_timeout(Duration::ZERO),
            Some(Err(Error::AnswerTaken))
        );
        let batch = ran_in.get(&item.id).map(|&k| &batches[k]);
        match answer {
            Ok(v) => {
                prop_assert_eq!(v, u64::from(item.id) * 3 + 1);
                let b = batch.expect("ran");
                prop_assert!(!b.iter().any(|i| i.panic || i.wrong));
            }
            Err(Error::Handler(HandlerError(id))) => {
                prop_assert_eq!(id, item.id);
                prop_assert_eq!(id % 11, 5);
            }
            Err(Error::HandlerPanicked { .. }) => {
                prop_assert!(batch.expect("ran").iter().any(|i| i.panic));
            }
            Err(Error::WrongResultCount { expected, got }) => {
                let b = batch.expect("ran");
                prop_assert_eq!((expected, got), (b.len(), b.len() - 1));
                prop_assert!(b.iter().any(|i| i.wrong) && !b.iter().any(|i| i.panic));
            }
            Err(Error::TimedOut { .. }) => {
                prop_assert!(deadline.is_some() && batch.is_none());
            }
            Err(Error::Cancelled) => prop_assert!(cancelled && batch.is_none()),
            Err(Error::ShutDown) => {
                prop_assert!(setup.fail_on_shutdown && batch.is_none());
            }
            Err(e) => prop_assert!(false, "unexpected answer {e:?}"),
        }
    }

    let s = batcher.stats();
    prop_assert_eq!(s.submitted as usize + rejected.len(), next_id as usize);
    prop_assert_eq!(s.items_batched as usize, ran_in.len());
    prop_assert_eq!(s.batches as usize, batches.len());
    prop_assert_eq!(s.queued, 0);
    prop_assert_eq!(s.in_flight, 0);
    prop_assert_eq!(
        s.submitted,
        s.items_batched + s.timed_out + s.cancelled + s.failed_on_shutdown
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_accepted_request_is_answered_once_with_its_own_result(
        setup in setup(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(setup, ops)?;
    }
}
