//! A linearizability checker for one document used as a compare-and-set
//! register (Wing & Gong's search with Lowe's memoization, as Jepsen's
//! Knossos and Porcupine do it).
//!
//! Every write stores a value no other write stores, so a value names the
//! write that stored it. A history holds, per operation, when the client
//! sent it, when it got the answer (none when it never got a definite one),
//! and what it was:
//! - a read that saw a value;
//! - a compare-and-set from an expected value to a new one, answered
//!   written, conflict, or nothing definite (the client gave up).
//!
//! An indeterminate write either took effect or not. Because values are
//! unique, that is decided by the history itself: a write that took effect
//! stays the document's value until a write that expects it, and clients
//! only expect values they observed, and the check ends with reads of the
//! final value. So an indeterminate write whose value nobody observed never
//! took effect (it is dropped); one whose value was observed did, at some
//! point after it was sent (it never "returns").

use std::collections::HashSet;

/// A value, as a small number (the caller maps its strings to them).
pub type Value = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A read that returned `saw`.
    Read { saw: Value },
    /// A compare-and-set that was acknowledged.
    Written { expected: Value, new: Value },
    /// A compare-and-set refused because the value was not `expected`;
    /// `saw` is the value the refusal reported as current, if it did.
    Conflict { expected: Value, saw: Option<Value> },
    /// A compare-and-set with no definite answer.
    Indeterminate { expected: Value, new: Value },
}

#[derive(Clone, Copy, Debug)]
pub struct Op {
    /// When it was sent (any monotonic clock, e.g. nanoseconds).
    pub call: u64,
    /// When its answer arrived; `None` for `Indeterminate`.
    pub ret: Option<u64>,
    pub kind: Kind,
}

/// Why a history is not linearizable: the operation that could not be
/// placed, and the operations that were linearized at the deepest point
/// the search reached.
#[derive(Debug)]
pub struct NotLinearizable {
    pub stuck_at: Op,
    pub deepest_prefix: Vec<Op>,
}

/// The effect of `kind` on a register holding `state`: the new state, or
/// `None` if `kind` cannot happen there.
fn step(state: Value, kind: Kind) -> Option<Value> {
    match kind {
        Kind::Read { saw } => (saw == state).then_some(state),
        Kind::Written { expected, new } | Kind::Indeterminate { expected, new } => {
            (expected == state).then_some(new)
        }
        Kind::Conflict { expected, saw } => {
            (expected != state && saw.is_none_or(|saw| saw == state)).then_some(state)
        }
    }
}

/// One entry of the history in time order: an operation's call or return.
#[derive(Clone, Copy)]
struct Entry {
    op: usize,
    is_call: bool,
    prev: Option<usize>,
    next: Option<usize>,
    /// For a call: its return's entry index, if it has one.
    partner: Option<usize>,
}

/// Checks that `ops` on a register starting at `initial` are linearizable.
pub fn check(initial: Value, ops: &[Op]) -> Result<(), NotLinearizable> {
    // Indeterminate writes nobody observed never took effect.
    let observed: HashSet<Value> = ops
        .iter()
        .flat_map(|op| match op.kind {
            Kind::Read { saw } => vec![saw],
            Kind::Conflict { expected, saw } => {
                [Some(expected), saw].into_iter().flatten().collect()
            }
            Kind::Written { expected, .. } | Kind::Indeterminate { expected, .. } => vec![expected],
        })
        .collect();
    let ops: Vec<Op> = ops
        .iter()
        .copied()
        .filter(|op| match op.kind {
            Kind::Indeterminate { new, .. } => observed.contains(&new),
            _ => true,
        })
        .collect();

    // Calls and returns in time order; at equal times a call comes first
    // (the two operations count as concurrent).
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        order.push((op.call, true, i));
        if let Some(ret) = op.ret {
            assert!(ret >= op.call, "an operation returned before it was sent");
            order.push((ret, false, i));
        }
    }
    order.sort_by_key(|&(time, is_call, op)| (time, !is_call, op));
    let mut entries: Vec<Entry> = order
        .iter()
        .enumerate()
        .map(|(i, &(_, is_call, op))| Entry {
            op,
            is_call,
            prev: i.checked_sub(1),
            next: (i + 1 < order.len()).then_some(i + 1),
            partner: None,
        })
        .collect();
    let mut call_of = vec![0; ops.len()];
    for (i, e) in entries.iter().enumerate() {
        if e.is_call {
            call_of[e.op] = i;
        }
    }
    for i in 0..entries.len() {
        if !entries[i].is_call {
            let call = call_of[entries[i].op];
            entries[call].partner = Some(i);
        }
    }
    let mut head = (!entries.is_empty()).then_some(0);
    let mut returns_left = entries.iter().filter(|e| !e.is_call).count();

    // Unlinks a call and its return (Lowe's "lift"); `relink` undoes it, in
    // reverse order.
    fn unlink(entries: &mut [Entry], head: &mut Option<usize>, i: usize) {
        let (prev, next) = (entries[i].prev, entries[i].next);
        match prev {
            Some(p) => entries[p].next = next,
            None => *head = next,
        }
        if let Some(n) = next {
            entries[n].prev = prev;
        }
    }
    fn relink(entries: &mut [Entry], head: &mut Option<usize>, i: usize) {
        let (prev, next) = (entries[i].prev, entries[i].next);
        match prev {
            Some(p) => entries[p].next = Some(i),
            None => *head = Some(i),
        }
        if let Some(n) = next {
            entries[n].prev = Some(i);
        }
    }

    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Value)> = HashSet::new();
    // (call entry, state before it) for each linearized operation.
    let mut stack: Vec<(usize, Value)> = Vec::new();
    let mut deepest: Vec<usize> = Vec::new();
    let mut stuck = None;
    let mut state = initial;
    let mut entry = head;
    while returns_left > 0 {
        let Some(i) = entry else {
            // Only calls without returns are left, and they need not take
            // effect: linearizable.
            break;
        };
        let e = entries[i];
        if e.is_call {
            if let Some(next_state) = step(state, ops[e.op].kind) {
                linearized[e.op / 64] |= 1 << (e.op % 64);
                if seen.insert((linearized.clone(), next_state)) {
                    stack.push((i, state));
                    state = next_state;
                    unlink(&mut entries, &mut head, i);
                    if let Some(r) = e.partner {
                        unlink(&mut entries, &mut head, r);
                        returns_left -= 1;
                    }
                    entry = head;
                    continue;
                }
                linearized[e.op / 64] &= !(1 << (e.op % 64));
            }
            entry = e.next;
        } else {
            // An operation returned before it could be linearized: undo
            // the last choice and try the next candidate after it.
            if stack.len() >= deepest.len() {
                deepest = stack.iter().map(|&(c, _)| entries[c].op).collect();
                stuck = Some(e.op);
            }
            let Some((call, before)) = stack.pop() else {
                return Err(NotLinearizable {
                    stuck_at: ops[stuck.unwrap_or(e.op)],
                    deepest_prefix: deepest.iter().map(|&o| ops[o]).collect(),
                });
            };
            let op = entries[call].op;
            if let Some(r) = entries[call].partner {
                relink(&mut entries, &mut head, r);
                returns_left += 1;
            }
            relink(&mut entries, &mut head, call);
            linearized[op / 64] &= !(1 << (op % 64));
            state = before;
            entry = entries[call].next;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: u64, kind: Kind) -> Op {
        Op {
            call,
            ret: Some(ret),
            kind,
        }
    }
    fn read(saw: Value) -> Kind {
        Kind::Read { saw }
    }
    fn written(expected: Value, new: Value) -> Kind {
        Kind::Written { expected, new }
    }
    fn conflict(expected: Value) -> Kind {
        Kind::Conflict {
            expected,
            saw: None,
        }
    }
    fn conflict_seeing(expected: Value, saw: Value) -> Kind {
        Kind::Conflict {
            expected,
            saw: Some(saw),
        }
    }
    fn lost(call: u64, expected: Value, new: Value) -> Op {
        Op {
            call,
            ret: None,
            kind: Kind::Indeterminate { expected, new },
        }
    }

    #[test]
    fn sequential_histories() {
        let good = [
            op(0, 1, read(0)),
            op(2, 3, written(0, 1)),
            op(4, 5, conflict(0)),
            op(6, 7, read(1)),
        ];
        assert!(check(0, &good).is_ok());
        // A read of an overwritten value after the overwrite returned.
        let stale = [op(0, 1, written(0, 1)), op(2, 3, read(0))];
        assert!(check(0, &stale).is_err());
        // A conflict when the expected value was current all along.
        let false_conflict = [op(0, 1, conflict(0))];
        assert!(check(0, &false_conflict).is_err());
        // A conflict reports the current value: right, then stale.
        let reported = [op(0, 1, written(0, 1)), op(2, 3, conflict_seeing(0, 1))];
        assert!(check(0, &reported).is_ok());
        let stale_report = [
            op(0, 1, written(0, 1)),
            op(2, 3, written(1, 2)),
            op(4, 5, conflict_seeing(0, 1)),
        ];
        assert!(check(0, &stale_report).is_err());
        // Two writes that both replaced the same value: a lost update.
        let lost_update = [op(0, 1, written(0, 1)), op(2, 3, written(0, 2))];
        assert!(check(0, &lost_update).is_err());
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // Two CAS from 0 at once: one wins, the other conflicts.
        let ops = [op(0, 10, conflict(0)), op(1, 9, written(0, 1))];
        assert!(check(0, &ops).is_ok());
        // A read overlapping a write may see either value...
        assert!(check(0, &[op(0, 10, written(0, 1)), op(2, 3, read(0))]).is_ok());
        assert!(check(0, &[op(0, 10, written(0, 1)), op(2, 3, read(1))]).is_ok());
        // ...but two reads cannot see the new value, then the old one.
        let flicker = [
            op(0, 10, written(0, 1)),
            op(2, 3, read(1)),
            op(4, 5, read(0)),
        ];
        assert!(check(0, &flicker).is_err());
        // A chain where the search must backtrack: the read of 2 forces
        // 0→1→2 before it, though 0→1 returned last.
        let chain = [
            op(0, 20, written(0, 1)),
            op(1, 5, written(1, 2)),
            op(6, 7, read(2)),
        ];
        assert!(check(0, &chain).is_ok());
    }

    #[test]
    fn indeterminate_writes_take_effect_only_if_observed() {
        // Never observed: it did not happen, so 0 is still current.
        assert!(check(0, &[lost(0, 0, 1), op(5, 6, read(0))]).is_ok());
        // Observed later: it happened, after it was sent.
        assert!(check(0, &[lost(0, 0, 1), op(5, 6, read(1))]).is_ok());
        // Observed before it was sent: impossible.
        assert!(check(0, &[op(0, 1, read(1)), lost(5, 0, 1)]).is_err());
        // It happened, then a definite write built on it.
        let built_on = [lost(0, 0, 1), op(5, 6, read(1)), op(7, 8, written(1, 2))];
        assert!(check(0, &built_on).is_ok());
        // A write built on it, while a later read still sees the value it
        // replaced: not linearizable.
        let bad = [lost(0, 0, 1), op(5, 6, written(1, 2)), op(7, 8, read(0))];
        assert!(check(0, &bad).is_err());
    }

    #[test]
    fn a_long_history() {
        // 20,000 operations by 8 overlapping clients on one register.
        let mut ops = Vec::new();
        let mut value = 0;
        for i in 0..20_000u64 {
            let t = i * 10;
            if i % 3 == 0 {
                ops.push(op(t, t + 75, written(value, value + 1)));
                value += 1;
            } else if i % 3 == 1 {
                ops.push(op(t, t + 75, conflict(value + 7)));
            } else {
                ops.push(op(t + 1, t + 2, read(value)));
            }
        }
        assert!(check(0, &ops).is_ok());
        // The same with one read that went back in time, near the end.
        let last_read = ops.len() - 1;
        ops[last_read].kind = read(3);
        assert!(check(0, &ops).is_err());
    }
}
