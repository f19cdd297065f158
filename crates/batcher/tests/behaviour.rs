//! Behaviour of the batcher with real threads; every wait is bounded.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;

use batcher::{
    BatchOutcome, Batcher, BatcherBuilder, BatcherConfig, Error, Event, Priority, ShutdownMode,
    Submit, Ticket, WeightMode,
};

const BOUND: Duration = Duration::from_secs(10);
const LONG: Duration = Duration::from_secs(3600);

/// Waits for a ticket's answer, failing the test instead of hanging.
fn get<O, E>(mut t: Ticket<O, E>) -> Result<O, Error<E>> {
    t.wait_timeout(BOUND)
        .expect("an accepted request must be answered")
}

/// A latch the handler waits on, opened by the test.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
    fn wait(&self) {
        let (m, cv) = &*self.0;
        let g = cv
            .wait_timeout_while(m.lock().unwrap(), BOUND, |open| !*open)
            .unwrap();
        assert!(*g.0, "gate was never opened");
    }
}

type Log = Arc<Mutex<Vec<Vec<u32>>>>;

/// A batcher over `u32` whose handler logs each batch and answers `x * 10`.
/// When `gate` is given, a batch containing 0 blocks on it (after telling
/// `entered`), so the test can queue work behind a busy worker.
fn logging(
    builder: BatcherBuilder<u32>,
    gate: Option<(Gate, mpsc::Sender<()>)>,
) -> (Batcher<u32, u32>, Log) {
    let log: Log = Arc::default();
    let l = Arc::clone(&log);
    let b = builder
        .build(move |_| {
            let l = Arc::clone(&l);
            let gate = gate.clone();
            move |batch: Vec<u32>| -> Vec<Result<u32, Infallible>> {
                if let Some((g, entered)) = &gate {
                    if batch.contains(&0) {
                        entered.send(()).unwrap();
                        g.wait();
                    }
                }
                l.lock().unwrap().push(batch.clone());
                batch.iter().map(|x| Ok(x * 10)).collect()
            }
        })
        .unwrap();
    (b, log)
}

/// Starts a batcher whose worker is busy on request 0 until the gate opens.
/// The config's `max_delay` should be zero so that request 0 runs at once.
fn busy(config: BatcherConfig) -> (Batcher<u32, u32>, Log, Gate, Ticket<u32>) {
    busy_with(BatcherBuilder::new(config))
}

fn busy_with(builder: BatcherBuilder<u32>) -> (Batcher<u32, u32>, Log, Gate, Ticket<u32>) {
    let gate = Gate::default();
    let (tx, rx) = mpsc::channel();
    let (b, log) = logging(builder, Some((gate.clone(), tx)));
    let first = b.submit(0).unwrap();
    rx.recv_timeout(BOUND).expect("worker took request 0");
    (b, log, gate, first)
}

/// Batches are cut by size, by `max_delay` (an hour) or at shutdown only:
/// `wait_when_idle` keeps an idle worker waiting too, so a test can queue a
/// whole batch before anything runs.
fn cfg() -> BatcherConfig {
    BatcherConfig {
        max_delay: LONG,
        wait_when_idle: true,
        priority_aging: Duration::ZERO,
        ..BatcherConfig::default()
    }
}

/// An idle worker takes what is queued at once.
fn now() -> BatcherConfig {
    BatcherConfig {
        max_delay: Duration::ZERO,
        ..cfg()
    }
}

#[test]
fn an_idle_worker_runs_a_lone_request_at_once() {
    // max_delay is an hour, but nothing is in flight: the request runs now.
    let (b, log) = logging(
        BatcherBuilder::new(BatcherConfig {
            wait_when_idle: false,
            ..cfg()
        }),
        None,
    );
    assert_eq!(get(b.submit(7).unwrap()), Ok(70));
    assert_eq!(get(b.submit(8).unwrap()), Ok(80));
    assert_eq!(*log.lock().unwrap(), vec![vec![7], vec![8]]);
}

#[test]
fn requests_queued_behind_a_batch_in_flight_run_together_when_it_ends() {
    // Request 0 holds the only worker; 1, 2 and 3 wait (max_delay is an hour
    // and a batch is in flight), then run as one batch as soon as 0's ends.
    let (b, log, gate, first) = busy(BatcherConfig {
        wait_when_idle: false,
        max_batch_size: 8,
        ..cfg()
    });
    let tickets: Vec<_> = (1..=3).map(|i| b.submit(i).unwrap()).collect();
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        log.lock().unwrap().len(),
        0,
        "nothing else runs while 0 is in flight"
    );
    gate.open();
    assert_eq!(get(first), Ok(0));
    for (i, t) in (1..=3).zip(tickets) {
        assert_eq!(get(t), Ok(i * 10));
    }
    assert_eq!(*log.lock().unwrap(), vec![vec![0], vec![1, 2, 3]]);
}

#[test]
fn the_prepare_stage_runs_a_lone_request_at_once() {
    let b = BatcherBuilder::<u32>::new(BatcherConfig {
        wait_when_idle: false,
        ..cfg()
    })
    .build_with_prepare(
        |items: Vec<u32>| items,
        |_| {
            |xs: Vec<u32>| -> Vec<Result<u32, Infallible>> {
                xs.into_iter().map(|x| Ok(x + 1)).collect()
            }
        },
    )
    .unwrap();
    assert_eq!(get(b.submit(1).unwrap()), Ok(2));
    assert_eq!(get(b.submit(2).unwrap()), Ok(3));
}

#[test]
fn cuts_at_max_batch_size_and_drains_at_shutdown() {
    let (b, log) = logging(
        BatcherBuilder::new(BatcherConfig {
            max_batch_size: 4,
            ..cfg()
        }),
        None,
    );
    let mut tickets: Vec<_> = (1..=10).map(|i| b.submit(i).unwrap()).collect();
    let rest = tickets.split_off(8);
    // Two full batches run without waiting for max_delay (an hour).
    for t in tickets {
        assert!(get(t).unwrap() % 10 == 0);
    }
    assert_eq!(log.lock().unwrap().len(), 2);
    b.shutdown();
    for t in rest {
        assert!(get(t).unwrap() % 10 == 0);
    }
    let sizes: Vec<usize> = log.lock().unwrap().iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![4, 4, 2]);
    let s = b.stats();
    assert_eq!((s.submitted, s.batches, s.items_batched), (10, 3, 10));
    assert_eq!(s.batch_size_histogram, vec![(2, 1), (4, 2)]);
    assert!((s.mean_batch_size - 10.0 / 3.0).abs() < 1e-9);
}

#[test]
fn cuts_a_partial_batch_after_max_delay() {
    let (b, log) = logging(
        BatcherBuilder::new(BatcherConfig {
            max_batch_size: 100,
            max_delay: Duration::from_millis(20),
            ..BatcherConfig::default()
        }),
        None,
    );
    let ts: Vec<_> = (1..=3).map(|i| b.submit(i).unwrap()).collect();
    let got: Vec<u32> = ts.into_iter().map(|t| get(t).unwrap()).collect();
    assert_eq!(got, vec![10, 20, 30]);
    let total: usize = log.lock().unwrap().iter().map(Vec::len).sum();
    assert_eq!(total, 3);
}

#[test]
fn sum_and_padded_weight_cut_differently() {
    let run = |mode: WeightMode| {
        let (b, log) = logging(
            BatcherBuilder::new(BatcherConfig {
                max_batch_weight: 12,
                weight_mode: mode,
                ..cfg()
            })
            .weigher(|x: &u32| u64::from(*x)),
            None,
        );
        let ts: Vec<_> = [1, 5, 1, 1].iter().map(|&x| b.submit(x).unwrap()).collect();
        b.shutdown();
        for t in ts {
            get(t).unwrap();
        }
        let batches = log.lock().unwrap().clone();
        (batches, b.stats())
    };
    // Padded: 5 × 3 = 15 > 12, so the batch is cut after [1, 5] at once.
    let (padded, s) = run(WeightMode::Padded);
    assert_eq!(padded, vec![vec![1, 5], vec![1, 1]]);
    // real 6 + 2 = 8; padded 10 + 2 = 12.
    assert!((s.padding_efficiency - 8.0 / 12.0).abs() < 1e-9);
    // Summed: 8 ≤ 12, one batch at shutdown.
    let (sum, _) = run(WeightMode::Sum);
    assert_eq!(sum, vec![vec![1, 5, 1, 1]]);
}

#[test]
fn buckets_never_mix() {
    let (b, log) = logging(
        BatcherBuilder::new(cfg()).bucket_by(|x: &u32| u64::from(*x / 32)),
        None,
    );
    let ts: Vec<_> = [1, 40, 2, 41, 3, 70]
        .iter()
        .map(|&x| b.submit(x).unwrap())
        .collect();
    b.shutdown();
    for t in ts {
        get(t).unwrap();
    }
    let mut batches = log.lock().unwrap().clone();
    batches.sort();
    assert_eq!(batches, vec![vec![1, 2, 3], vec![40, 41], vec![70]]);
}

#[test]
fn higher_priority_runs_first_fifo_within_a_level() {
    let (b, log, gate, first) = busy(BatcherConfig {
        max_batch_size: 1,
        max_delay: Duration::ZERO,
        ..cfg()
    });
    let order = [
        (1, Priority::LOW),
        (2, Priority::NORMAL),
        (3, Priority::HIGH),
        (4, Priority::HIGH),
        (5, Priority::NORMAL),
    ];
    let ts: Vec<_> = order
        .iter()
        .map(|&(x, p)| b.submit_with(x, Submit::priority(p)).unwrap())
        .collect();
    gate.open();
    get(first).unwrap();
    for t in ts {
        get(t).unwrap();
    }
    let ran: Vec<u32> = log.lock().unwrap().iter().map(|b| b[0]).collect();
    assert_eq!(ran, vec![0, 3, 4, 2, 5, 1]);
}

#[test]
fn aging_lets_old_low_priority_requests_through() {
    let (b, log, gate, first) = busy(BatcherConfig {
        max_batch_size: 1,
        max_delay: Duration::ZERO,
        priority_aging: Duration::from_millis(1),
        ..BatcherConfig::default()
    });
    let low = b.submit_with(1, Submit::priority(Priority::LOW)).unwrap();
    thread::sleep(Duration::from_millis(30));
    let high = b.submit_with(2, Submit::priority(Priority::HIGH)).unwrap();
    gate.open();
    get(first).unwrap();
    get(low).unwrap();
    get(high).unwrap();
    let ran: Vec<u32> = log.lock().unwrap().iter().map(|b| b[0]).collect();
    assert_eq!(ran, vec![0, 1, 2]);
}

#[test]
fn warmup_never_shares_a_batch_and_runs_last() {
    let (b, log, gate, first) = busy(BatcherConfig {
        max_batch_size: 10,
        max_delay: Duration::ZERO,
        priority_aging: Duration::from_millis(1),
        ..BatcherConfig::default()
    });
    // Warm-up never ages: w1 waits longer than anyone and still runs last.
    let w1 = b
        .submit_with(101, Submit::priority(Priority::WARMUP))
        .unwrap();
    thread::sleep(Duration::from_millis(5));
    let u1 = b.submit_with(1, Submit::priority(Priority::LOW)).unwrap();
    let w2 = b
        .submit_with(102, Submit::priority(Priority::WARMUP))
        .unwrap();
    let u2 = b.submit_with(2, Submit::priority(Priority::LOW)).unwrap();
    gate.open();
    for t in [first, w1, u1, w2, u2] {
        get(t).unwrap();
    }
    let batches = log.lock().unwrap().clone();
    assert_eq!(batches, vec![vec![0], vec![1, 2], vec![101, 102]]);
}

#[test]
fn expired_requests_time_out_without_running() {
    let (b, log, gate, first) = busy(now());
    let t = b
        .submit_with(7, Submit::default().timeout(Duration::from_millis(20)))
        .unwrap();
    let r = get(t);
    assert!(matches!(r, Err(Error::TimedOut { .. })), "{r:?}");
    gate.open();
    get(first).unwrap();
    b.shutdown();
    assert!(!log.lock().unwrap().iter().flatten().any(|&x| x == 7));
    assert_eq!(b.stats().timed_out, 1);
}

#[test]
fn cancel_and_drop_remove_queued_requests() {
    let (b, log, gate, first) = busy(now());
    let a = b.submit(1).unwrap();
    let c = b.submit(2).unwrap();
    let kept = b.submit(3).unwrap();
    assert!(a.cancel());
    assert!(!a.cancel(), "a request is removed once");
    assert_eq!(get(a), Err(Error::Cancelled));
    drop(c);
    assert_eq!(b.stats().queued, 1);
    gate.open();
    assert_eq!(get(first), Ok(0));
    b.shutdown();
    assert_eq!(get(kept), Ok(30));
    let ran: Vec<u32> = log.lock().unwrap().iter().flatten().copied().collect();
    assert_eq!(ran, vec![0, 3]);
    assert_eq!(b.stats().cancelled, 2);
}

#[test]
fn a_running_request_cannot_be_cancelled() {
    let (b, _log, gate, first) = busy(now());
    assert!(!first.cancel());
    gate.open();
    assert_eq!(get(first), Ok(0));
    drop(b);
}

#[test]
fn full_queue_rejects_fast_and_submit_timeout_waits() {
    let (b, _log, gate, first) = busy(BatcherConfig {
        max_queued: 2,
        max_delay: Duration::ZERO,
        ..cfg()
    });
    let b = Arc::new(b);
    let t1 = b.submit(1).unwrap();
    let t2 = b.submit(2).unwrap();
    let r = b.submit(3);
    assert!(
        matches!(
            r,
            Err(Error::Overloaded {
                queued: 2,
                max_queued: 2,
                ..
            })
        ),
        "{r:?}"
    );
    let r = b.submit_timeout(3, Submit::default(), Duration::from_millis(30));
    assert!(matches!(r, Err(Error::Overloaded { .. })));
    let b2 = Arc::clone(&b);
    let waiter = thread::spawn(move || b2.submit_timeout(4, Submit::default(), BOUND).map(get));
    thread::sleep(Duration::from_millis(10));
    gate.open();
    assert_eq!(waiter.join().unwrap().unwrap(), Ok(40));
    for t in [first, t1, t2] {
        get(t).unwrap();
    }
    assert_eq!(b.stats().rejected, 2);
}

#[test]
fn max_batch_weight_can_be_lowered_at_run_time() {
    let (b, log, gate, first) = busy_with(
        BatcherBuilder::new(BatcherConfig {
            max_batch_weight: 1000,
            max_delay: Duration::ZERO,
            ..cfg()
        })
        .weigher(|x: &u32| u64::from(*x)),
    );
    let ts: Vec<_> = (0..6).map(|_| b.submit(10).unwrap()).collect();
    b.set_max_batch_weight(30).unwrap();
    assert_eq!(b.max_batch_weight(), 30);
    assert!(matches!(
        b.submit(50),
        Err(Error::TooHeavy {
            weight: 50,
            max_batch_weight: 30
        })
    ));
    assert!(b.set_max_batch_weight(0).is_err());
    gate.open();
    get(first).unwrap();
    for t in ts {
        assert_eq!(get(t), Ok(100));
    }
    let batches = log.lock().unwrap().clone();
    assert_eq!(batches, vec![vec![0], vec![10, 10, 10], vec![10, 10, 10]]);
}

#[test]
fn handler_panic_fails_its_batch_and_serving_continues() {
    let b = BatcherBuilder::new(BatcherConfig {
        max_batch_size: 1,
        max_delay: Duration::ZERO,
        ..BatcherConfig::default()
    })
    .build(|_| {
        |batch: Vec<u32>| -> Vec<Result<u32, Infallible>> {
            assert!(!batch.contains(&13), "unlucky request");
            batch.into_iter().map(Ok).collect()
        }
    })
    .unwrap();
    let r = get(b.submit(13).unwrap());
    match r {
        Err(Error::HandlerPanicked {
            stage,
            message,
            batch_size,
        }) => {
            assert_eq!((stage, batch_size), ("handler", 1));
            assert!(message.contains("unlucky request"), "{message}");
        }
        other => panic!("expected HandlerPanicked, got {other:?}"),
    }
    assert_eq!(get(b.submit(14).unwrap()), Ok(14));
    assert_eq!(b.stats().handler_panics, 1);
}

#[test]
fn wrong_result_count_fails_the_batch() {
    let b = BatcherBuilder::new(BatcherConfig {
        max_batch_size: 1,
        max_delay: Duration::ZERO,
        ..BatcherConfig::default()
    })
    .build(|_| {
        |batch: Vec<u32>| -> Vec<Result<u32, Infallible>> {
            if batch.contains(&7) {
                Vec::new()
            } else {
                batch.into_iter().map(Ok).collect()
            }
        }
    })
    .unwrap();
    assert_eq!(
        get(b.submit(7).unwrap()),
        Err(Error::WrongResultCount {
            expected: 1,
            got: 0
        })
    );
    assert_eq!(get(b.submit(8).unwrap()), Ok(8));
    assert_eq!(b.stats().wrong_result_counts, 1);
}

#[test]
fn handler_errors_reach_their_own_request() {
    #[derive(Debug, PartialEq)]
    struct Odd(u32);
    let b = BatcherBuilder::new(BatcherConfig::default())
        .build(|_| {
            |batch: Vec<u32>| {
                batch
                    .into_iter()
                    .map(|x| if x % 2 == 1 { Err(Odd(x)) } else { Ok(x) })
                    .collect()
            }
        })
        .unwrap();
    let ts: Vec<_> = (0..4).map(|x| b.submit(x).unwrap()).collect();
    let got: Vec<_> = ts.into_iter().map(get).collect();
    assert_eq!(
        got,
        vec![
            Ok(0),
            Err(Error::Handler(Odd(1))),
            Ok(2),
            Err(Error::Handler(Odd(3)))
        ]
    );
    assert_eq!(b.stats().handler_errors, 2);
}

#[test]
fn shutdown_fail_answers_queued_requests() {
    let (b, log) = logging(
        BatcherBuilder::new(BatcherConfig {
            on_shutdown: ShutdownMode::Fail,
            ..cfg()
        }),
        None,
    );
    let ts: Vec<_> = (1..=3).map(|x| b.submit(x).unwrap()).collect();
    b.shutdown();
    for t in ts {
        assert_eq!(get(t), Err(Error::ShutDown));
    }
    assert!(matches!(b.submit(9), Err(Error::ShutDown)));
    assert!(log.lock().unwrap().is_empty());
    assert_eq!(b.stats().failed_on_shutdown, 3);
}

struct Unpark(thread::Thread);
impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// A minimal executor: polls on this thread, parks between polls.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let deadline = std::time::Instant::now() + BOUND;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "future never woke");
        thread::park_timeout(Duration::from_millis(100));
    }
}

#[test]
fn a_ticket_is_a_future() {
    let (b, _log) = logging(
        BatcherBuilder::new(BatcherConfig {
            max_delay: Duration::from_millis(5),
            ..BatcherConfig::default()
        }),
        None,
    );
    let t = b.submit(4).unwrap();
    assert_eq!(block_on(t), Ok(40));
    let t2 = b.submit(5).unwrap();
    assert_eq!(block_on(async move { t2.await.map(|x| x + 1) }), Ok(51));
}

#[test]
fn prepare_runs_ahead_on_its_own_thread() {
    let (prepared_tx, prepared_rx) = mpsc::channel::<(u32, thread::ThreadId)>();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let prepared_rx = Arc::new(Mutex::new(prepared_rx));
    let b = BatcherBuilder::new(BatcherConfig {
        max_batch_size: 1,
        max_delay: Duration::ZERO,
        ..BatcherConfig::default()
    })
    .build_with_prepare(
        move |items: Vec<u32>| {
            prepared_tx
                .send((items[0], thread::current().id()))
                .unwrap();
            items.iter().map(|x| x.to_string()).collect::<Vec<_>>()
        },
        move |_| {
            let rx = Arc::clone(&prepared_rx);
            let entered = entered_tx.clone();
            move |texts: Vec<String>| -> Vec<Result<(String, bool), Infallible>> {
                let rx = rx.lock().unwrap();
                // Batch 0 is prepared before it runs.
                if let Ok((_, prep_thread)) = rx.try_recv() {
                    assert_ne!(prep_thread, thread::current().id());
                }
                let mut overlapped = false;
                if texts[0] == "0" {
                    entered.send(()).unwrap();
                    // While batch 0 computes, batch 1 is prepared.
                    overlapped = matches!(rx.recv_timeout(BOUND), Ok((1, _)));
                }
                texts.into_iter().map(|t| Ok((t, overlapped))).collect()
            }
        },
    )
    .unwrap();
    let t0 = b.submit(0).unwrap();
    entered_rx.recv_timeout(BOUND).unwrap();
    let t1 = b.submit(1).unwrap();
    assert_eq!(get(t0), Ok(("0".to_string(), true)));
    assert_eq!(get(t1).unwrap().0, "1");
}

#[test]
fn prepare_panic_fails_only_its_batch() {
    let b = BatcherBuilder::new(BatcherConfig {
        max_batch_size: 1,
        max_delay: Duration::ZERO,
        ..BatcherConfig::default()
    })
    .build_with_prepare(
        |items: Vec<u32>| {
            assert!(items[0] != 3, "cannot prepare 3");
            items
        },
        |_| |xs: Vec<u32>| -> Vec<Result<u32, Infallible>> { xs.into_iter().map(Ok).collect() },
    )
    .unwrap();
    assert!(matches!(
        get(b.submit(3).unwrap()),
        Err(Error::HandlerPanicked {
            stage: "prepare",
            ..
        })
    ));
    assert_eq!(get(b.submit(4).unwrap()), Ok(4));
}

#[test]
fn events_report_progress_in_order() {
    let (b, _log) = logging(
        BatcherBuilder::new(BatcherConfig {
            max_batch_size: 2,
            ..cfg()
        }),
        None,
    );
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = Arc::clone(&events);
    b.on_event(move |ev| e.lock().unwrap().push(ev.clone()));
    b.on_event(|_| panic!("a broken listener is ignored"));
    let t1 = b.submit(1).unwrap();
    let t2 = b.submit(2).unwrap();
    get(t1).unwrap();
    get(t2).unwrap();
    b.shutdown();
    let events = events.lock().unwrap().clone();
    // `Queued` comes from the submitting thread, the rest from the worker,
    // so only the order within each thread is fixed.
    let mut queued: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Queued { request, .. } => Some(*request),
            _ => None,
        })
        .collect();
    queued.sort_unstable();
    assert_eq!(queued, vec![0, 1]);
    let batch: Vec<&Event> = events
        .iter()
        .filter(|e| !matches!(e, Event::Queued { .. }))
        .collect();
    assert_eq!(batch.len(), 3, "{batch:?}");
    match batch[0] {
        Event::Batched {
            requests, weight, ..
        } => assert_eq!((requests.clone(), *weight), (vec![0, 1], 2)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(batch[1], Event::Started { size: 2, .. }));
    assert!(matches!(
        batch[2],
        Event::Finished {
            size: 2,
            outcome: BatchOutcome::Completed,
            ..
        }
    ));
}

#[test]
fn each_worker_gets_its_own_handler() {
    let made = Arc::new(AtomicUsize::new(0));
    let m = Arc::clone(&made);
    let b = BatcherBuilder::new(BatcherConfig {
        max_concurrent_batches: 3,
        max_batch_size: 1,
        max_delay: Duration::ZERO,
        ..BatcherConfig::default()
    })
    .build(move |worker| {
        m.fetch_add(1, Ordering::SeqCst);
        let mut calls = 0u32;
        move |xs: Vec<u32>| -> Vec<Result<(usize, u32), Infallible>> {
            calls += 1;
            xs.into_iter().map(|_| Ok((worker, calls))).collect()
        }
    })
    .unwrap();
    assert_eq!(made.load(Ordering::SeqCst), 3);
    let ts: Vec<_> = (0..30).map(|x| b.submit(x).unwrap()).collect();
    let answers: Vec<_> = ts.into_iter().map(|t| get(t).unwrap()).collect();
    // Per worker, its handler's call counter rises by one per batch.
    for w in 0..3 {
        let calls: Vec<u32> = answers
            .iter()
            .filter(|(id, _)| *id == w)
            .map(|a| a.1)
            .collect();
        let mut sorted = calls.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=calls.len() as u32).collect::<Vec<_>>());
    }
}

#[test]
fn config_defaults_and_validation() {
    let d = BatcherConfig::default();
    let json = serde_json::to_string(&d).unwrap();
    assert_eq!(serde_json::from_str::<BatcherConfig>(&json).unwrap(), d);
    let partial: BatcherConfig = serde_json::from_str(r#"{"max_batch_size": 8}"#).unwrap();
    assert_eq!(partial.max_batch_size, 8);
    assert_eq!(partial.max_queued, d.max_queued);
    let bad = BatcherConfig {
        max_batch_size: 0,
        ..d
    };
    let err = BatcherBuilder::new(bad)
        .build(|_| {
            |xs: Vec<u32>| -> Vec<Result<u32, Infallible>> { xs.into_iter().map(Ok).collect() }
        })
        .unwrap_err();
    assert!(err.to_string().contains("max_batch_size = 0"), "{err}");
}

#[test]
fn error_messages_name_value_limit_and_remedy() {
    let e: Error = Error::Overloaded {
        queued: 1024,
        queued_weight: 9000,
        max_queued: 1024,
        max_queued_weight: u64::MAX,
    };
    let m = e.to_string();
    assert!(m.contains("1024") && m.contains("submit_timeout"), "{m}");
    let e: Error = Error::TooHeavy {
        weight: 600,
        max_batch_weight: 512,
    };
    let m = e.to_string();
    assert!(
        m.contains("600") && m.contains("512") && m.contains("split"),
        "{m}"
    );
}

#[test]
fn submit_all_queues_a_caller_s_requests_as_one_batch_or_none_of_them() {
    // An idle worker with no delay: requests submitted one by one can be cut
    // as the first arrives; submitted together they are one batch.
    let (b, log) = logging(
        BatcherBuilder::new(BatcherConfig {
            wait_when_idle: false,
            max_batch_size: 8,
            ..now()
        }),
        None,
    );
    let tickets = b.submit_all_with([1, 2, 3, 4], Submit::default()).unwrap();
    let out: Vec<u32> = tickets.into_iter().map(|t| get(t).unwrap()).collect();
    assert_eq!(out, [10, 20, 30, 40]);
    assert_eq!(*log.lock().unwrap(), vec![vec![1, 2, 3, 4]]);

    // All or nothing: three requests do not fit a queue of two behind a busy
    // worker, so none is queued and the queue still takes two.
    let (b, log, gate, first) = busy(BatcherConfig {
        max_queued: 2,
        ..now()
    });
    let r = b.submit_all_with([1, 2, 3], Submit::default());
    assert!(
        matches!(
            r,
            Err(Error::Overloaded {
                queued: 0,
                max_queued: 2,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(b.stats().rejected, 3);
    let tickets = b.submit_all_with([5, 6], Submit::default()).unwrap();
    gate.open();
    assert_eq!(get(first), Ok(0));
    let out: Vec<u32> = tickets.into_iter().map(|t| get(t).unwrap()).collect();
    assert_eq!(out, [50, 60]);
    assert!(!log
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .any(|&x| x == 1 || x == 2 || x == 3));
}
