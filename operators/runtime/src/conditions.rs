//! `metav1.Condition` bookkeeping: one condition per type, `lastTransitionTime`
//! moving only when the status flips, `observedGeneration` always current.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition to set, without the bookkeeping fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired<'a> {
    pub type_: &'a str,
    pub status: bool,
    pub reason: &'a str,
    pub message: String,
}

impl<'a> Desired<'a> {
    pub fn new(type_: &'a str, status: bool, reason: &'a str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Sets `desired` in `conditions`, keeping the old `lastTransitionTime` when the
/// status is unchanged. `now` is passed in so callers and tests control time.
pub fn upsert(
    conditions: &mut Vec<Condition>,
    desired: Desired<'_>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if desired.status { "True" } else { "False" };
    let transition = conditions
        .iter()
        .find(|c| c.type_ == desired.type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    let condition = Condition {
        type_: desired.type_.to_string(),
        status: status.to_string(),
        reason: desired.reason.to_string(),
        message: desired.message,
        observed_generation: generation,
        last_transition_time: transition,
    };
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => *existing = condition,
        None => conditions.push(condition),
    }
}

/// The condition of `type_`, if present.
pub fn find<'c>(conditions: &'c [Condition], type_: &str) -> Option<&'c Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = Vec::new();
        upsert(
            &mut conds,
            Desired::new("Ready", false, "Waiting", "not yet"),
            Some(1),
            at(10),
        );
        upsert(
            &mut conds,
            Desired::new("Ready", false, "StillWaiting", "still"),
            Some(2),
            at(20),
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(
            conds[0].last_transition_time,
            Time(at(10)),
            "same status keeps the time"
        );
        assert_eq!(conds[0].reason, "StillWaiting");
        assert_eq!(conds[0].observed_generation, Some(2));
        upsert(
            &mut conds,
            Desired::new("Ready", true, "Ready", "done"),
            Some(2),
            at(30),
        );
        assert_eq!(
            conds[0].last_transition_time,
            Time(at(30)),
            "a flip moves the time"
        );
        assert!(is_true(&conds, "Ready"));
    }

    #[test]
    fn conditions_of_other_types_are_kept() {
        let mut conds = Vec::new();
        upsert(&mut conds, Desired::new("A", true, "Ok", ""), None, at(1));
        upsert(&mut conds, Desired::new("B", false, "No", ""), None, at(2));
        assert_eq!(conds.len(), 2);
        assert!(is_true(&conds, "A") && !is_true(&conds, "B"));
    }
}
