//! A linearizability checker (Wing & Gong's search, with memoisation of visited states as in
//! Lowe's refinement): is there one order of the recorded operations that respects real time
//! (an operation that answered before another was invoked comes first) and in which every
//! answer is what the sequential [`Model`] gives?

use std::collections::HashSet;

use super::model::{Call, Model, Out};

/// One operation of the history: when it was invoked and answered (ticks of one counter that
/// every thread's invocations and answers draw from), what it was, what it answered, and the
/// clock when it was invoked.
#[derive(Clone, Debug)]
pub struct Event {
    pub thread: usize,
    pub inv: u64,
    pub resp: u64,
    pub call: Call,
    pub out: Out,
    pub clock_inv: u64,
}

/// `Ok` if the history is linearizable; otherwise the history, sorted by invocation, and the
/// longest prefix order the search could build.
pub fn linearizable(history: &[Event]) -> Result<(), String> {
    let mut events: Vec<&Event> = history.iter().collect();
    events.sort_by_key(|e| e.inv);
    assert!(
        events.len() <= 128,
        "history too long for the checker: {}",
        events.len()
    );
    let mut search = Search {
        events: &events,
        seen: HashSet::new(),
        best: Vec::new(),
    };
    let mut order = Vec::new();
    if search.dfs(&Model::new(), 0, &mut order) {
        return Ok(());
    }
    let mut report = String::from("no linearization; history (by invocation):\n");
    for (i, e) in events.iter().enumerate() {
        report.push_str(&format!(
            "  #{i:<3} t{} [{:>3}..{:>3}] clock>={} {:?} -> {:?}\n",
            e.thread, e.inv, e.resp, e.clock_inv, e.call, e.out
        ));
    }
    report.push_str(&format!("longest valid prefix: {:?}\n", search.best));
    Err(report)
}

struct Search<'a> {
    events: &'a [&'a Event],
    seen: HashSet<(u128, Model)>,
    best: Vec<usize>,
}

impl Search<'_> {
    fn dfs(&mut self, state: &Model, done: u128, order: &mut Vec<usize>) -> bool {
        let n = self.events.len();
        if order.len() == n {
            return true;
        }
        if order.len() > self.best.len() {
            self.best = order.clone();
        }
        if !self.seen.insert((done, state.clone())) {
            return false;
        }
        // Only an operation invoked before every pending one's answer can go next.
        let first_resp = (0..n)
            .filter(|&i| done & (1 << i) == 0)
            .map(|i| self.events[i].resp)
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..n {
            let e = self.events[i];
            if done & (1 << i) != 0 {
                continue;
            }
            if e.inv > first_resp {
                break; // sorted by invocation: no later one qualifies either
            }
            for next in state.step(&e.call, &e.out, e.clock_inv) {
                order.push(i);
                if self.dfs(&next, done | (1 << i), order) {
                    return true;
                }
                order.pop();
            }
        }
        false
    }
}
