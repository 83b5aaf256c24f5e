//! What the client knows of each origin's HTTP/3 (`tcp` feature): the `Alt-Svc` field it
//! was told (RFC 7838), and whether HTTP/3 recently failed there.
//!
//! The server side writes `Alt-Svc` ([`crate::alt_svc`], with the `server` feature); reading
//! it is the client's business, so the parser lives here, beside the cache it feeds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::HeaderValue;

use super::Origin;

/// How long an alternative is fresh without `ma` (RFC 7838 §3.1: 24 hours).
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// A cap on `ma`, so that no value overflows a deadline.
const MAX_MAX_AGE: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// How long HTTP/3 stays off for an origin after its first failure, by default
/// (`Builder::http3_broken_backoff`); each failure after a retry doubles it (as Chromium
/// does), up to [`MAX_BROKEN`].
pub(crate) const FIRST_BROKEN: Duration = Duration::from_secs(5 * 60);
const MAX_BROKEN: Duration = Duration::from_secs(2 * 24 * 60 * 60);

/// One field value of `Alt-Svc`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AltSvc {
    /// `clear`: forget every alternative of the origin.
    Clear,
    /// The alternatives, in the server's order of preference.
    Alternatives(Vec<Alternative>),
}

/// One alternative service: `protocol="host:port"; ma=…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Alternative {
    /// The ALPN protocol ID, percent-decoded (`h3`, `h3-29`, `h2`; RFC 7838 §3).
    pub(crate) protocol: String,
    /// The host, when another one is named; `None` for the origin's own host.
    pub(crate) host: Option<String>,
    pub(crate) port: u16,
    pub(crate) max_age: Duration,
}

/// Parses one `Alt-Svc` field value. `None` when it is malformed as a whole; an alternative
/// that is malformed alone is left out.
pub(crate) fn parse(value: &[u8]) -> Option<AltSvc> {
    let value = std::str::from_utf8(value).ok()?.trim();
    if value == "clear" {
        return Some(AltSvc::Clear);
    }
    let mut alternatives = Vec::new();
    for item in split_outside_quotes(value, ',')? {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if let Some(alternative) = parse_alternative(item) {
            alternatives.push(alternative);
        }
    }
    Some(AltSvc::Alternatives(alternatives))
}

fn parse_alternative(item: &str) -> Option<Alternative> {
    let mut parts = split_outside_quotes(item, ';')?.into_iter();
    let (protocol, authority) = parts.next()?.split_once('=')?;
    let protocol = protocol.trim();
    if protocol.is_empty() || !protocol.bytes().all(is_tchar) {
        return None;
    }
    let protocol = percent_decode(protocol)?;
    // RFC 7838 requires a quoted alt-authority; a token is accepted as leniently as browsers.
    let authority = unquote(authority.trim())?;
    let (host, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host = (!host.is_empty()).then(|| host.to_ascii_lowercase());
    let mut max_age = DEFAULT_MAX_AGE;
    for parameter in parts {
        let Some((name, value)) = parameter.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("ma") {
            let seconds: u64 = unquote(value.trim())?.parse().ok()?;
            max_age = Duration::from_secs(seconds).min(MAX_MAX_AGE);
        }
    }
    Some(Alternative {
        protocol,
        host,
        port,
        max_age,
    })
}

/// A protocol ID with its `%XX` escapes resolved (RFC 7838 §3: `h3%2D29` is `h3-29`, and
/// `%` itself is always escaped); `None` for a broken escape or bytes that are not UTF-8
/// (no ALPN ID this client knows is).
fn percent_decode(token: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(token.len());
    let mut rest = token.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Splits at `separator` outside quoted strings; `None` when a quoted string is unclosed.
fn split_outside_quotes(s: &str, separator: char) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return None;
    }
    parts.push(&s[start..]);
    Some(parts)
}

/// A token as it is, or a quoted string's content with its escapes resolved.
fn unquote(s: &str) -> Option<String> {
    let Some(inner) = s.strip_prefix('"') else {
        return s.bytes().all(is_tchar).then(|| s.to_string());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Ports below this are privileged: only the superuser may listen on them (Unix).
const PRIVILEGED_PORTS_END: u16 = 1024;

/// Per origin: where its HTTP/3 is, until when, and whether it is broken. Bounded: past
/// `capacity` origins, the one touched longest ago is forgotten.
pub(crate) struct Cache {
    entries: HashMap<Origin, Entry>,
    capacity: usize,
    /// How long HTTP/3 stays off after a first failure.
    first_broken: Duration,
    /// Orders entries by when they were last written, for eviction.
    clock: u64,
}

#[derive(Debug, Default)]
struct Entry {
    /// The HTTP/3 port on the origin's host, and until when it may be used.
    h3: Option<(u16, Instant)>,
    /// HTTP/3 failed here: off until this instant.
    broken_until: Option<Instant>,
    /// How many times in a row it failed (the backoff's exponent).
    failures: u32,
    /// When the newest connection that carried an HTTP/3 response was opened: a failure of
    /// a connection opened before it is stale (the path has worked since) and not counted.
    /// A completed handshake does not count here: a path that passes handshakes and loses
    /// larger packets would otherwise have every failure taken for a stale one, as the pool
    /// opens a new connection once the old one's path goes silent.
    worked_since: Option<Instant>,
    touched: u64,
}

impl Entry {
    /// The advertised HTTP/3 port while it is fresh; a stale one is forgotten.
    fn fresh_port(&mut self, now: Instant) -> Option<u16> {
        if self.h3.is_some_and(|(_, until)| until <= now) {
            self.h3 = None;
        }
        self.h3.map(|(port, _)| port)
    }
}

impl Cache {
    pub(crate) fn new(capacity: usize, first_broken: Duration) -> Self {
        Cache {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            first_broken,
            clock: 0,
        }
    }

    /// Takes in the `Alt-Svc` fields of a response from `origin`: what parses replaces what
    /// was known (RFC 7838 §3.1), `clear` forgets it, an `h3` alternative on the same host
    /// (first in the server's order) is remembered for its `ma`. Alternatives on other hosts
    /// and other protocols (`h3-29`, `h2`) are ignored, and so is one that would move an
    /// origin on a privileged port (below 1024) to an unprivileged one: on a shared host any
    /// user may listen there, and a header that user slips into a response would take the
    /// origin's traffic (RFC 7838 §9.1; browsers refuse such moves too). Several field lines are one list
    /// (RFC 9110 §5.3): an `h3` on one line is not forgotten for an `h2` on the next, and a
    /// list that does not parse whole (a malformed line, or `clear` beside anything, which
    /// must stand alone, RFC 7838 §3) changes nothing.
    pub(crate) fn update<'a>(&mut self, origin: &Origin, fields: impl Iterator<Item = &'a HeaderValue>, now: Instant) {
        let (mut lines, mut clear) = (0, false);
        let mut h3 = None;
        for field in fields {
            let Some(parsed) = parse(field.as_bytes()) else {
                return;
            };
            lines += 1;
            match parsed {
                AltSvc::Clear => clear = true,
                AltSvc::Alternatives(alternatives) if h3.is_none() => {
                    h3 = alternatives
                        .into_iter()
                        .find(|a| {
                            a.protocol == "h3"
                                && a.host.as_deref().is_none_or(|h| h == origin.host)
                                && (origin.port >= PRIVILEGED_PORTS_END || a.port < PRIVILEGED_PORTS_END)
                        })
                        .and_then(|a| Some((a.port, now.checked_add(a.max_age)?)))
                        .filter(|(_, until)| *until > now);
                }
                AltSvc::Alternatives(_) => {}
            }
        }
        if lines == 0 || (clear && lines > 1) {
            return;
        }
        match (h3, self.entries.get_mut(origin)) {
            (None, Some(entry)) => {
                entry.h3 = None;
                // Its failures are kept for when HTTP/3 is advertised again.
                if entry.broken_until.is_none() && entry.failures == 0 {
                    self.entries.remove(origin);
                }
            }
            (None, None) => {}
            (Some(h3), _) => self.touch(origin).h3 = Some(h3),
        }
    }

    /// The port to reach `origin`'s HTTP/3 at, when it advertised one that is still fresh
    /// and HTTP/3 is not marked broken there.
    pub(crate) fn h3_port(&mut self, origin: &Origin, now: Instant) -> Option<u16> {
        let entry = self.entries.get_mut(origin)?;
        let port = entry.fresh_port(now)?;
        match entry.broken_until {
            Some(until) if until > now => None,
            _ => Some(port),
        }
    }

    /// The port `origin` advertised for HTTP/3, still fresh, whether or not HTTP/3 is
    /// marked broken there: where what must go over HTTP/3 all the same (a tunnel) goes.
    pub(crate) fn advertised_port(&mut self, origin: &Origin, now: Instant) -> Option<u16> {
        self.entries.get_mut(origin)?.fresh_port(now)
    }

    /// HTTP/3 failed for `origin` on a connection opened at `opened`: off for
    /// `first_broken`, doubled for each failure since it last worked. Failures while it is
    /// already off (other requests of the same attempt) do not count again, nor do those of
    /// a connection opened before one that has carried a response (an old connection
    /// losing its path while a newer one works says nothing of the path now).
    pub(crate) fn mark_broken(&mut self, origin: &Origin, opened: Instant, now: Instant) {
        let first_broken = self.first_broken;
        let entry = self.touch(origin);
        if entry.broken_until.is_some_and(|until| until > now) || entry.worked_since.is_some_and(|w| opened < w) {
            return;
        }
        let backoff = first_broken
            .checked_mul(1 << entry.failures.min(20))
            .unwrap_or(MAX_BROKEN)
            .min(MAX_BROKEN);
        entry.failures = entry.failures.saturating_add(1);
        entry.broken_until = now.checked_add(backoff);
        tracing::debug!(origin = %origin.authority(), ?backoff, "HTTP/3 marked broken; using TCP");
    }

    /// A connection to `origin` completed its handshake: HTTP/3 may be used at once, but
    /// its failures are kept until a response comes ([`confirm`](Self::confirm)). A path
    /// that passes handshakes and loses requests (a path MTU between QUIC's 1,200-byte
    /// handshake packets and its larger data packets) so backs off longer each time
    /// instead of being retried at the first backoff every time.
    pub(crate) fn handshake_worked(&mut self, origin: &Origin) {
        if let Some(entry) = self.entries.get_mut(origin) {
            entry.broken_until = None;
        }
    }

    /// HTTP/3 worked for `origin` (a response came, on a connection opened at `opened`):
    /// its failures are forgotten, and so will be those of connections opened before. An
    /// entry left with nothing to say (no advertised port, no failure) goes.
    pub(crate) fn confirm(&mut self, origin: &Origin, opened: Instant) {
        self.clock += 1;
        let clock = self.clock;
        let Some(entry) = self.entries.get_mut(origin) else {
            return;
        };
        if entry.h3.is_none() {
            self.entries.remove(origin);
            return;
        }
        entry.broken_until = None;
        entry.failures = 0;
        entry.worked_since = entry.worked_since.max(Some(opened));
        // In use: the last to be evicted.
        entry.touched = clock;
    }

    fn touch(&mut self, origin: &Origin) -> &mut Entry {
        if !self.entries.contains_key(origin) && self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.touched)
                .map(|(o, _)| o.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.clock += 1;
        let entry = self.entries.entry(origin.clone()).or_default();
        entry.touched = self.clock;
        entry
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alt(protocol: &str, host: Option<&str>, port: u16, max_age: u64) -> Alternative {
        Alternative {
            protocol: protocol.to_string(),
            host: host.map(str::to_string),
            port,
            max_age: Duration::from_secs(max_age),
        }
    }

    fn origin(host: &str) -> Origin {
        Origin {
            scheme: "https".to_string(),
            host: host.to_string(),
            port: 443,
        }
    }

    #[test]
    fn parses_alternatives_with_max_age_and_quoted_values() {
        assert_eq!(parse(b"clear"), Some(AltSvc::Clear));
        assert_eq!(
            parse(b"h3=\":443\"; ma=3600, h3-29=\":8443\""),
            Some(AltSvc::Alternatives(vec![
                alt("h3", None, 443, 3600),
                alt("h3-29", None, 8443, 86400),
            ]))
        );
        assert_eq!(
            parse(b"h2=\"alt.example.com:8000\", h3=\"[::1]:4433\";ma=\"60\";persist=1"),
            Some(AltSvc::Alternatives(vec![
                alt("h2", Some("alt.example.com"), 8000, 86400),
                alt("h3", Some("::1"), 4433, 60),
            ]))
        );
        // A quoted comma or semicolon does not split; an escape is resolved.
        assert_eq!(
            parse(b"h3=\":1\"; x=\"a,b;c\", h3=\":2\"; ma=\"\\5\""),
            Some(AltSvc::Alternatives(vec![
                alt("h3", None, 1, 86400),
                alt("h3", None, 2, 5)
            ]))
        );
        // Malformed alternatives are left out; an unclosed quote spoils the whole value.
        assert_eq!(
            parse(b"h3=\":0\", h3=\":x\", =\":1\", h3=\":2\"; ma=-1, h3=\":3\""),
            Some(AltSvc::Alternatives(vec![alt("h3", None, 3, 86400)]))
        );
        assert_eq!(parse(b"h3=\":443"), None);
        // Protocol IDs are percent-decoded (RFC 7838 §3); a broken escape drops the
        // alternative alone.
        assert_eq!(
            parse(b"h3%2D29=\":1\", %68%33=\":2\", h%3=\":3\", h%zz=\":4\", h3%ff=\":5\""),
            Some(AltSvc::Alternatives(vec![
                alt("h3-29", None, 1, 86400),
                alt("h3", None, 2, 86400)
            ]))
        );
        // A huge max age is capped, not overflowed.
        assert_eq!(
            parse(b"h3=\":1\"; ma=99999999999999999999"),
            Some(AltSvc::Alternatives(vec![]))
        );
        assert_eq!(
            parse(b"h3=\":1\"; ma=18446744073709551615"),
            Some(AltSvc::Alternatives(vec![Alternative {
                max_age: MAX_MAX_AGE,
                ..alt("h3", None, 1, 0)
            }]))
        );
    }

    #[test]
    fn a_privileged_origin_port_is_not_moved_to_an_unprivileged_one() {
        let mut cache = Cache::new(8, FIRST_BROKEN);
        let now = Instant::now();
        let on_port = |port| Origin {
            port,
            ..origin("example.com")
        };
        let update = |cache: &mut Cache, o: &Origin, value: &'static str| {
            cache.update(o, [HeaderValue::from_static(value)].iter(), now)
        };
        let (https, high) = (on_port(443), on_port(8443));
        update(&mut cache, &https, "h3=\":8443\"");
        assert_eq!(cache.h3_port(&https, now), None, "443 to 8443");
        update(&mut cache, &https, "h3=\":8443\", h3=\":443\"");
        assert_eq!(cache.h3_port(&https, now), Some(443), "the first alternative allowed");
        update(&mut cache, &https, "h3=\":1023\"");
        assert_eq!(cache.h3_port(&https, now), Some(1023), "privileged to privileged");
        update(&mut cache, &high, "h3=\":9443\"");
        assert_eq!(cache.h3_port(&high, now), Some(9443), "unprivileged to unprivileged");
        update(&mut cache, &high, "h3=\":443\"");
        assert_eq!(cache.h3_port(&high, now), Some(443), "unprivileged to privileged");
    }

    #[test]
    fn the_cache_keeps_h3_on_the_same_host_for_its_max_age() {
        let mut cache = Cache::new(8, FIRST_BROKEN);
        let o = origin("example.com");
        let now = Instant::now();
        let update = |cache: &mut Cache, value: &'static str, now| {
            cache.update(&o, [HeaderValue::from_static(value)].iter(), now)
        };
        // Other hosts and other versions are ignored.
        update(&mut cache, "h3-29=\":1\", h3=\"other.example.com:2\"", now);
        assert_eq!(cache.h3_port(&o, now), None);
        update(&mut cache, "h3-29=\":1\", h3=\"example.com:3\"; ma=60", now);
        assert_eq!(cache.h3_port(&o, now), Some(3));
        assert_eq!(cache.h3_port(&o, now + Duration::from_secs(61)), None);
        update(&mut cache, "h3=\":4\"", now);
        assert_eq!(cache.h3_port(&o, now + Duration::from_secs(23 * 3600)), Some(4));
        // A field without h3 replaces it; so does clear; ma=0 is already stale.
        update(&mut cache, "h2=\":5\"", now);
        assert_eq!(cache.h3_port(&o, now), None);
        update(&mut cache, "h3=\":4\"", now);
        update(&mut cache, "clear", now);
        assert_eq!(cache.h3_port(&o, now), None);
        update(&mut cache, "h3=\":4\"; ma=0", now);
        assert_eq!(cache.h3_port(&o, now), None);
        // A malformed field changes nothing.
        update(&mut cache, "h3=\":4\"", now);
        update(&mut cache, "h3=\"", now);
        assert_eq!(cache.h3_port(&o, now), Some(4));
        // The host compares without regard to case, however the URL spelled it.
        let upper = Origin::of(&"https://EXAMPLE.com/".parse().unwrap()).unwrap();
        cache.update(&upper, [HeaderValue::from_static("h3=\"Example.COM:5\"")].iter(), now);
        assert_eq!(cache.h3_port(&o, now), Some(5));
        // Several field lines are one list (RFC 9110 §5.3), in order.
        let lines = |values: [&'static str; 2]| values.map(HeaderValue::from_static);
        cache.update(&o, lines(["h3=\":6\"", "h2=\":7\""]).iter(), now);
        assert_eq!(cache.h3_port(&o, now), Some(6), "an h2 line after an h3 line");
        cache.update(&o, lines(["h2=\":7\"", "h3=\":8\", h3=\":9\""]).iter(), now);
        assert_eq!(cache.h3_port(&o, now), Some(8), "the first h3 of all lines");
        cache.update(&o, lines(["h3=\"", "h2=\":7\""]).iter(), now);
        assert_eq!(
            cache.h3_port(&o, now),
            Some(8),
            "a list with a malformed line changes nothing"
        );
        cache.update(&o, lines(["clear", "h2=\":7\""]).iter(), now);
        assert_eq!(
            cache.h3_port(&o, now),
            Some(8),
            "clear beside another line changes nothing"
        );
        cache.update(&o, lines(["h2=\":7\"", "h2=\":9\""]).iter(), now);
        assert_eq!(cache.h3_port(&o, now), None, "lines without h3 replace it");
    }

    #[test]
    fn broken_h3_backs_off_exponentially_until_confirmed() {
        let mut cache = Cache::new(8, FIRST_BROKEN);
        let o = origin("example.com");
        let t0 = Instant::now();
        cache.update(&o, [HeaderValue::from_static("h3=\":443\"")].iter(), t0);
        cache.mark_broken(&o, t0, t0);
        // Other failures of the same attempt do not extend it.
        cache.mark_broken(&o, t0 + Duration::from_secs(1), t0 + Duration::from_secs(1));
        assert_eq!(cache.h3_port(&o, t0 + Duration::from_secs(299)), None);
        assert_eq!(
            cache.advertised_port(&o, t0 + Duration::from_secs(299)),
            Some(443),
            "where a tunnel goes meanwhile, not the origin's own port"
        );
        let t1 = t0 + Duration::from_secs(300);
        assert_eq!(cache.h3_port(&o, t1), Some(443));
        cache.mark_broken(&o, t1, t1);
        assert_eq!(cache.h3_port(&o, t1 + Duration::from_secs(599)), None);
        assert_eq!(cache.h3_port(&o, t1 + Duration::from_secs(600)), Some(443));
        // A handshake that works clears the backoff but not the count: a path that
        // passes handshakes and loses requests backs off longer each time.
        cache.handshake_worked(&o);
        assert_eq!(
            cache.h3_port(&o, t1 + Duration::from_secs(1)),
            Some(443),
            "usable at once"
        );
        cache.mark_broken(&o, t1 + Duration::from_secs(1), t1 + Duration::from_secs(1));
        assert_eq!(
            cache.h3_port(&o, t1 + Duration::from_secs(1200)),
            None,
            "a third failure: 20 minutes"
        );
        // Once a response comes, the next failure starts again at 5 minutes.
        cache.confirm(&o, t1);
        let t2 = t1 + Duration::from_secs(600);
        cache.mark_broken(&o, t2, t2);
        assert_eq!(cache.h3_port(&o, t2 + Duration::from_secs(300)), Some(443));
        // The backoff is capped (and never overflows).
        for _ in 0..100 {
            cache.mark_broken(&o, t2 + MAX_BROKEN * 200, t2 + MAX_BROKEN * 200);
        }
    }

    /// A connection opened before one that has carried a response since may still lose its
    /// path (its NAT binding, its own PTOs): that failure says nothing of the path now and
    /// neither turns HTTP/3 off nor doubles its next backoff. A completed handshake is not
    /// enough: on a path that passes handshakes and loses larger packets, each connection
    /// goes silent and the pool opens a newer one, whose handshake works again.
    #[test]
    fn a_failure_of_a_connection_older_than_one_that_works_is_not_counted() {
        let mut cache = Cache::new(8, FIRST_BROKEN);
        let o = origin("example.com");
        let t0 = Instant::now();
        cache.update(&o, [HeaderValue::from_static("h3=\":443\"")].iter(), t0);
        let (older, newer) = (t0, t0 + Duration::from_secs(10));
        cache.handshake_worked(&o);
        let t1 = t0 + Duration::from_secs(20);
        cache.mark_broken(&o, older, t1);
        assert_eq!(cache.h3_port(&o, t1), None, "a handshake alone does not make it stale");
        let t2 = t1 + FIRST_BROKEN;
        cache.confirm(&o, newer);
        cache.confirm(&o, older);
        cache.mark_broken(&o, older, t2);
        assert_eq!(cache.h3_port(&o, t2), Some(443), "the newer connection works");
        cache.mark_broken(&o, newer, t2);
        assert_eq!(cache.h3_port(&o, t2), None, "the newer one's own failure counts");
        assert_eq!(
            cache.h3_port(&o, t2 + FIRST_BROKEN),
            Some(443),
            "a first backoff, not a doubled one"
        );
    }

    /// A response whose `Alt-Svc` takes HTTP/3 away, once it has confirmed HTTP/3
    /// worked, leaves no entry with nothing to say behind; one that keeps it keeps the
    /// entry and its record of what worked.
    #[test]
    fn a_confirmed_origin_without_http3_leaves_no_entry() {
        let mut cache = Cache::new(8, FIRST_BROKEN);
        let o = origin("example.com");
        let now = Instant::now();
        cache.update(&o, [HeaderValue::from_static("h3=\":443\"")].iter(), now);
        cache.mark_broken(&o, now, now);
        cache.update(&o, [HeaderValue::from_static("clear")].iter(), now);
        assert_eq!(cache.len(), 1, "its failures are kept");
        cache.confirm(&o, now);
        assert_eq!(cache.len(), 0);
        cache.update(&o, [HeaderValue::from_static("h3=\":443\"")].iter(), now);
        cache.confirm(&o, now);
        assert_eq!(cache.len(), 1);
        cache.mark_broken(&o, now - Duration::from_secs(1), now);
        assert_eq!(
            cache.h3_port(&o, now),
            Some(443),
            "the older connection's failure is stale"
        );
    }

    #[test]
    fn the_cache_is_bounded_and_forgets_the_oldest() {
        let mut cache = Cache::new(2, FIRST_BROKEN);
        let now = Instant::now();
        for host in ["a", "b", "c"] {
            cache.update(&origin(host), [HeaderValue::from_static("h3=\":1\"")].iter(), now);
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.h3_port(&origin("a"), now), None);
        assert_eq!(cache.h3_port(&origin("c"), now), Some(1));
    }

    proptest::proptest! {
        /// Any bytes: parsing and caching never panic.
        #[test]
        fn any_field_value_is_handled(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
                                      text in "[ -~]{0,48}") {
            let _ = parse(&value);
            let mut cache = Cache::new(4, FIRST_BROKEN);
            let now = Instant::now();
            for v in [HeaderValue::from_bytes(&value).ok(), HeaderValue::from_str(&text).ok()].into_iter().flatten() {
                cache.update(&origin("example.com"), [v].iter(), now);
            }
            let _ = cache.h3_port(&origin("example.com"), now);
        }

        /// Whatever surrounds it, a well-formed h3 alternative is found.
        #[test]
        fn a_well_formed_alternative_is_found(port in 1u16.., ma in proptest::prelude::any::<u32>(), noise in "x[a-z0-9]{0,8}") {
            let value = format!("{noise}=\":9\", h3=\":{port}\"; ma={ma}; {noise}=\"x,y\"");
            let parsed = parse(value.as_bytes());
            let found = match parsed {
                Some(AltSvc::Alternatives(list)) => list.into_iter().find(|a| a.protocol == "h3"),
                _ => None,
            };
            proptest::prop_assert_eq!(found.map(|a| (a.port, a.max_age)), Some((port, Duration::from_secs(ma.into()).min(MAX_MAX_AGE))));
        }
    }
}
