//! Where rescans start: a claim from the scope's oldest pending row need not walk again over the rows ahead
//! of it that are not the scope's (another shard's backlog, parked rows), when there are such rows. Every question takes `now`, so the
//! rules are tested without waiting.

use chrono::{DateTime, TimeDelta, Utc};
use tokio::time::Instant;

/// A rescan starts this long before where the scope's oldest pending row was at the last rescan that saw the
/// whole scope, for rows committed a little after rows that occurred later.
pub(super) const LATE_COMMIT_MARGIN: TimeDelta = TimeDelta::seconds(10);
/// This often a rescan starts from the very oldest row of the table instead: for rows committed later than
/// the margin, and rows requeued by an operator.
pub(super) const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The scope has no pending row older than `at`, but for rows committed late, rows requeued by an operator,
/// and the keys and event names claims leave out (while any are, the floor stays where it is).
#[derive(Debug)]
pub(super) struct Floor {
    /// `None`: from the oldest row.
    at: Option<DateTime<Utc>>,
    /// When a rescan last started from the oldest row.
    swept_at: Instant,
}

impl Floor {
    pub(super) fn new(now: Instant) -> Self {
        Self { at: None, swept_at: now }
    }

    /// Where a rescan starting at `now` starts: at the floor, or from the oldest row once every `SWEEP_EVERY`.
    pub(super) fn rescan_from(&mut self, now: Instant) -> Option<DateTime<Utc>> {
        if self.at.is_some() && now.duration_since(self.swept_at) < SWEEP_EVERY {
            return self.at;
        }
        self.swept_at = now;
        None
    }

    /// After a rescan that began at `claimed_at` and met `first_seen` first (its own row or one held
    /// elsewhere): when it left out none of the scope's rows, none is older than that (or than its start, when
    /// it met none), but for rows committed late. A sweep (a rescan from the oldest row, which also saw the
    /// table's `oldest` pending row) keeps a floor only when rows that are not the scope's wait ahead of it:
    /// otherwise there is nothing to skip, and rescans stay sweeps, which never miss a row committed late.
    pub(super) fn rescanned(
        &mut self,
        first_seen: Option<DateTime<Utc>>,
        claimed_at: DateTime<Utc>,
        saw_whole_scope: bool,
        sweep: Option<Option<DateTime<Utc>>>,
    ) {
        if !saw_whole_scope {
            return;
        }
        let floor = first_seen.unwrap_or(claimed_at) - LATE_COMMIT_MARGIN;
        self.at = match sweep {
            Some(oldest) => oldest.filter(|oldest| *oldest < floor).map(|_| floor),
            None => Some(floor),
        };
    }

    /// Where rescans start now; `None`: from the oldest row.
    pub(super) fn at(&self) -> Option<DateTime<Utc>> {
        self.at
    }

    /// The scope changed: its new rows may be anywhere.
    pub(super) fn reset(&mut self) {
        self.at = None;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A sweep that found other rows an hour ahead of the scope's.
    fn ahead(wall: DateTime<Utc>) -> Option<Option<DateTime<Utc>>> {
        Some(Some(wall - TimeDelta::hours(1)))
    }

    #[test]
    fn rescans_start_before_the_oldest_row_seen_and_sweep_now_and_then() {
        let (start, wall) = (Instant::now(), Utc::now());
        let mut floor = Floor::new(start);
        assert_eq!(floor.rescan_from(start), None, "from the oldest row until a rescan saw the scope");
        floor.rescanned(Some(wall), wall, true, ahead(wall));
        let at = Some(wall - LATE_COMMIT_MARGIN);
        assert_eq!(floor.rescan_from(start + Duration::from_secs(1)), at);
        let later = start + SWEEP_EVERY + Duration::from_secs(1);
        assert_eq!(floor.rescan_from(later), None, "a sweep");
        assert_eq!(floor.rescan_from(later + Duration::from_secs(1)), at, "then from the floor again");
    }

    #[test]
    fn no_floor_when_nothing_but_the_scopes_rows_waits_ahead() {
        let (start, wall) = (Instant::now(), Utc::now());
        let mut floor = Floor::new(start);
        floor.rescanned(Some(wall), wall, true, Some(Some(wall)));
        assert_eq!(floor.rescan_from(start), None, "the table's oldest row is the scope's: sweeps go on");
        floor.rescanned(None, wall, true, Some(None));
        assert_eq!(floor.rescan_from(start), None, "an empty table: a burst committed late is seen at once");
    }

    #[test]
    fn the_floor_stays_while_rows_are_left_out_and_goes_with_the_scope() {
        let (start, wall) = (Instant::now(), Utc::now());
        let mut floor = Floor::new(start);
        floor.rescanned(Some(wall), wall, true, ahead(wall));
        let at = Some(wall - LATE_COMMIT_MARGIN);
        floor.rescanned(Some(wall + TimeDelta::seconds(60)), wall, false, None);
        assert_eq!(floor.rescan_from(start), at, "a held key's rows may be older than what the rescan met");
        floor.rescanned(None, wall + TimeDelta::seconds(60), true, None);
        assert_eq!(floor.rescan_from(start), Some(wall + TimeDelta::seconds(50)), "nothing met: its start");
        floor.reset();
        assert_eq!(floor.rescan_from(start), None);
    }
}
