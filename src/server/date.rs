//! The `Date` of responses (RFC 9110 §6.6.1), formatted as IMF-fixdate at most once a
//! second per thread and shared by every response of that second, as hyper does: a clock
//! read per response, no formatting.

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;

struct Cached {
    value: HeaderValue,
    /// The start of the next second, when `value` is stale (the second `value` names
    /// starts one second before).
    next_update: SystemTime,
}

impl Cached {
    fn at(now: SystemTime) -> Self {
        let into_second =
            Duration::from_nanos(now.duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos().into());
        let second = now - into_second;
        Cached {
            value: render(now),
            next_update: second + Duration::from_secs(1),
        }
    }

    /// The value for `now`, formatted again once `now` is outside the cached second: past
    /// it, or before it after the clock was set back (which would otherwise freeze the
    /// date until the clock caught up again).
    fn value_at(&mut self, now: SystemTime) -> HeaderValue {
        if now >= self.next_update || now < self.next_update - Duration::from_secs(1) {
            *self = Cached::at(now);
        }
        self.value.clone()
    }
}

thread_local! {
    static CACHED: RefCell<Cached> = RefCell::new(Cached::at(SystemTime::now()));
}

fn render(time: SystemTime) -> HeaderValue {
    HeaderValue::try_from(httpdate::fmt_http_date(time)).expect("an IMF-fixdate is a valid header value")
}

/// The current date as a `Date` header value (a clone of the cached one: a reference count).
pub(crate) fn now() -> HeaderValue {
    CACHED.with_borrow_mut(|cached| cached.value_at(SystemTime::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_imf_fixdate_and_refresh_at_the_next_second_or_when_the_clock_goes_back() {
        // RFC 9110 §5.6.7's example.
        let time = UNIX_EPOCH + Duration::from_secs(784_111_777) + Duration::from_millis(250);
        let cached = Cached::at(time);
        assert_eq!(cached.value, "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(cached.next_update, UNIX_EPOCH + Duration::from_secs(784_111_778));
        let mut cached = cached;
        let same_second = time + Duration::from_millis(700);
        assert_eq!(cached.value_at(same_second), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            cached.value_at(same_second + Duration::from_millis(100)),
            "Sun, 06 Nov 1994 08:49:38 GMT"
        );
        let set_back = time - Duration::from_secs(3600);
        assert_eq!(
            cached.value_at(set_back),
            "Sun, 06 Nov 1994 07:49:37 GMT",
            "a clock set back is followed"
        );
        let value = now();
        let parsed = httpdate::parse_http_date(value.to_str().unwrap());
        assert!(parsed.is_ok(), "{value:?}");
    }
}
