//! Feeds arbitrary bytes to every intake verifier and parser: none may panic, and a parse that
//! succeeds must yield an event whose ids are within the limits the parsers promise.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use secrecy::{SecretBox, SecretString};
use tether::domain::SystemId;
use tether::intake::parse::{self, Parsed};
use tether::intake::verify::{self, StandardHeaders};

fn check(parsed: Result<Parsed, parse::FormatError>) {
    if let Ok(Parsed::Event(e)) = parsed {
        assert!(!e.delivery_id.is_empty() && !e.delivery_id.contains('\0'));
        assert!(!e.record.record_id.is_empty() && !e.record.record_id.contains('\0'));
    }
}

fuzz_target!(|data: &[u8]| {
    // The first bytes choose header values; the rest is the body.
    let rest = data.get(1..).unwrap_or(&[]);
    let n = (data.first().copied().unwrap_or(0) as usize).min(rest.len());
    let (head, body) = rest.split_at(n);
    let header = std::str::from_utf8(head).ok();
    let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let tolerance = Duration::from_secs(300);

    let secrets = [SecretString::from("fuzz-secret")];
    let _ = verify::zendesk(&secrets, header, header, body, now, tolerance);
    let key = SecretBox::new(Box::new(b"fuzz-key".to_vec()));
    let headers = StandardHeaders { id: header, timestamp: header, signature: header };
    let _ = verify::standard(&key, headers, body, now, tolerance);
    if let Some(env) = parse::exact_envelope(body) {
        let _ = verify::exact(&secrets[0], env.content_raw, env.hash_code);
        check(parse::exact_content(env.content_raw));
    }
    check(parse::zendesk(body));
    check(parse::custom(SystemId::CustomErp, header.unwrap_or("id"), body));
    check(parse::custom(SystemId::CustomPms, header.unwrap_or("id"), body));
});
