//! Rules that need no model: deny patterns (regular expressions) and detectors of sensitive data
//! (email addresses, phone numbers, payment card numbers, IBANs, API keys and secrets). Detectors
//! pair a loose pattern with a check that real values pass (Luhn for cards, ISO 7064 mod 97 for
//! IBANs, digit counts for phone numbers), so order numbers, dates and versions stay untouched.

use std::ops::Range;
use std::sync::OnceLock;

use regex::Regex;

/// The kinds of sensitive data the detectors find, named as Presidio (and so NeMo Guardrails'
/// `sensitive_data_detection`) names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    EmailAddress,
    PhoneNumber,
    CreditCard,
    IbanCode,
    /// API keys, access tokens, private keys and `password=...`-style assignments.
    Secret,
}

impl Entity {
    pub const ALL: [Entity; 5] = [
        Entity::EmailAddress,
        Entity::PhoneNumber,
        Entity::CreditCard,
        Entity::IbanCode,
        Entity::Secret,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Entity::EmailAddress => "EMAIL_ADDRESS",
            Entity::PhoneNumber => "PHONE_NUMBER",
            Entity::CreditCard => "CREDIT_CARD",
            Entity::IbanCode => "IBAN_CODE",
            Entity::Secret => "SECRET",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name.trim().to_ascii_uppercase().as_str() {
            "EMAIL_ADDRESS" | "EMAIL" => Some(Entity::EmailAddress),
            "PHONE_NUMBER" | "PHONE" => Some(Entity::PhoneNumber),
            "CREDIT_CARD" | "CARD_NUMBER" => Some(Entity::CreditCard),
            "IBAN_CODE" | "IBAN" => Some(Entity::IbanCode),
            "SECRET" | "API_KEY" | "SECRETS" => Some(Entity::Secret),
            _ => None,
        }
    }

    /// Where this entity occurs in `text` (byte ranges, in order, not overlapping).
    pub fn find(self, text: &str) -> Vec<Range<usize>> {
        let p = patterns();
        let (res, check): (&[Regex], fn(&str) -> bool) = match self {
            Entity::EmailAddress => (&p.email, |_| true),
            Entity::PhoneNumber => (&p.phone, plausible_phone),
            Entity::CreditCard => (&p.card, valid_card),
            Entity::IbanCode => (&p.iban, valid_iban),
            Entity::Secret => (&p.secrets, |_| true),
        };
        let mut found: Vec<Range<usize>> = res
            .iter()
            .flat_map(|r| r.find_iter(text))
            .filter(|m| check(m.as_str()))
            .map(|m| m.range())
            .collect();
        found.sort_by_key(|r| r.start);
        merge(found)
    }
}

struct Patterns {
    email: Vec<Regex>,
    phone: Vec<Regex>,
    card: Vec<Regex>,
    iban: Vec<Regex>,
    secrets: Vec<Regex>,
}

const EMAIL: &[&str] = &[r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}\b"];
/// International (+CC ...) or national numbers written with separators or parentheses.
const PHONE: &[&str] = &[
    r"\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?)?(?:[\s.-]\d{2,6}){1,4}\b",
    r"(?:\(\d{2,4}\)[\s.-]?)?\b\d{2,4}(?:[\s.-]\d{2,4}){1,4}\b",
    r"\+\d{8,15}\b",
];
const CARD: &[&str] = &[r"\b\d(?:[ -]?\d){12,18}\b"];
const IBAN: &[&str] = &[r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"];
const SECRETS: &[&str] = &[
    r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",
    r"\bgithub_pat_[A-Za-z0-9_]{22,}\b",
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b",
    r"\bAIza[0-9A-Za-z_-]{35}\b",
    r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}\b",
    r"\bnvapi-[A-Za-z0-9_-]{20,}\b",
    r"\bhf_[A-Za-z0-9]{30,}\b",
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
    r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----",
    r#"(?i)\b(?:api[_-]?key|secret|password|passwd|access[_-]?token|auth[_-]?token)\b\s*[:=]\s*['"]?[^\s'"]{8,}"#,
];

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    // The patterns are constants; a unit test checks that every one compiles.
    let compile = |list: &[&str]| list.iter().filter_map(|s| Regex::new(s).ok()).collect();
    P.get_or_init(|| Patterns {
        email: compile(EMAIL),
        phone: compile(PHONE),
        card: compile(CARD),
        iban: compile(IBAN),
        secrets: compile(SECRETS),
    })
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

fn plausible_phone(s: &str) -> bool {
    let n = digits(s).len();
    // E.164 allows at most 15 digits; fewer than 7 is a date or a small number.
    if !(7..=15).contains(&n) {
        return false;
    }
    // A date (2024-01-15, 15.01.2024) or a version (1.2.3.4) is not a phone number.
    let groups: Vec<&str> = s
        .split(|c: char| !c.is_ascii_digit())
        .filter(|g| !g.is_empty())
        .collect();
    let looks_like_date = groups.len() == 3
        && !s.starts_with('+')
        && !s.contains('(')
        && groups.iter().any(|g| g.len() == 4)
        && groups.iter().filter(|g| g.len() <= 2).count() == 2;
    !looks_like_date && !valid_card(s)
}

/// A payment card number: 13 to 19 digits, a known issuer prefix, and the Luhn checksum.
pub fn valid_card(s: &str) -> bool {
    let d = digits(s);
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let prefix = |p: &[u32]| d.starts_with(p);
    let two = d[0] * 10 + d[1];
    let four = two * 100 + d[2] * 10 + d[3];
    let issuer = d[0] == 4
        || (51..=55).contains(&two)
        || (2221..=2720).contains(&four)
        || two == 34
        || two == 37
        || prefix(&[6, 0, 1, 1])
        || two == 65
        || two == 35
        || two == 36
        || two == 38
        || two == 30
        || two == 62;
    issuer && luhn(&d)
}

fn luhn(d: &[u32]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// An IBAN: country code, check digits, 11 to 30 alphanumerics, and ISO 7064 mod 97 = 1.
pub fn valid_iban(s: &str) -> bool {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u64 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c {
            '0'..='9' => u64::from(c as u8 - b'0'),
            'A'..='Z' => u64::from(c as u8 - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// Joins overlapping ranges (sorted by start).
fn merge(ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// One detection: which entity, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub entity: Entity,
    pub range: Range<usize>,
}

/// Every finding of `entities` in `text`, sorted, with overlaps resolved in favour of the earlier
/// (then longer) match.
pub fn detect(entities: &[Entity], text: &str) -> Vec<Finding> {
    let mut all: Vec<Finding> = entities
        .iter()
        .flat_map(|&e| {
            e.find(text)
                .into_iter()
                .map(move |range| Finding { entity: e, range })
        })
        .collect();
    all.sort_by(|a, b| {
        a.range
            .start
            .cmp(&b.range.start)
            .then(b.range.end.cmp(&a.range.end))
    });
    let mut kept: Vec<Finding> = Vec::with_capacity(all.len());
    for f in all {
        if kept.last().is_some_and(|k| f.range.start < k.range.end) {
            continue;
        }
        kept.push(f);
    }
    kept
}

/// `text` with each finding replaced by `<ENTITY_NAME>`.
pub fn mask(text: &str, findings: &[Finding]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in findings {
        out.push_str(&text[at..f.range.start]);
        out.push('<');
        out.push_str(f.entity.name());
        out.push('>');
        at = f.range.end;
    }
    out.push_str(&text[at..]);
    out
}

/// `text[from..]` with each finding that reaches past `from` replaced by `<ENTITY_NAME>`: what is
/// left to release of a streamed text whose first `from` bytes the client already has.
pub fn mask_after(text: &str, findings: &[Finding], from: usize) -> String {
    let mut out = String::with_capacity(text.len().saturating_sub(from));
    let mut at = from;
    for f in findings.iter().filter(|f| f.range.end > from) {
        let start = f.range.start.max(at);
        out.push_str(&text[at..start]);
        out.push('<');
        out.push_str(f.entity.name());
        out.push('>');
        at = f.range.end;
    }
    out.push_str(&text[at.min(text.len())..]);
    out
}

/// Longest tail a streamed text holds back so that no detector sees an entity cut in two.
pub const MAX_HELD_TAIL: usize = 256;

/// Where a streamed text may be cut for release: before its trailing word, and before digit groups
/// that may continue (`4111 1111 ...`, `(555) 123-...`), holding back at most [`MAX_HELD_TAIL`]
/// bytes. Entities contain no other whitespace, so none straddles the cut.
pub fn release_point(text: &str) -> usize {
    let floor = text.len().saturating_sub(MAX_HELD_TAIL);
    let mut cut = text.len();
    let mut chars = text[..cut].char_indices().rev().peekable();
    while let Some((i, c)) = chars.next() {
        if i < floor {
            break;
        }
        let continues = !c.is_whitespace()
            || (c == ' '
                && chars
                    .peek()
                    .is_some_and(|&(_, p)| p.is_ascii_digit() || p == ')'));
        if !continues {
            break;
        }
        cut = i;
    }
    if cut < floor {
        // Round up to a character boundary at or after the floor.
        (floor..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len())
    } else {
        cut
    }
}

/// Tool-call arguments (a JSON object as text) with sensitive data masked where it sits: inside
/// strings, and numbers that are an entity become the placeholder string, so the arguments stay
/// valid JSON. Arguments that are not JSON are masked as text. `None` when nothing was found.
pub fn mask_arguments(entities: &[Entity], arguments: &str) -> Option<(String, Vec<Entity>)> {
    let mut found = Vec::new();
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(arguments) else {
        let findings = detect(entities, arguments);
        if findings.is_empty() {
            return None;
        }
        found.extend(findings.iter().map(|f| f.entity));
        return Some((mask(arguments, &findings), found));
    };
    mask_value(entities, &mut v, &mut found);
    if found.is_empty() {
        return None;
    }
    Some((v.to_string(), found))
}

fn mask_value(entities: &[Entity], v: &mut serde_json::Value, found: &mut Vec<Entity>) {
    use serde_json::Value;
    match v {
        Value::String(s) => {
            let findings = detect(entities, s);
            if !findings.is_empty() {
                found.extend(findings.iter().map(|f| f.entity));
                *s = mask(s, &findings);
            }
        }
        Value::Number(n) => {
            let text = n.to_string();
            let findings = detect(entities, &text);
            if !findings.is_empty() {
                found.extend(findings.iter().map(|f| f.entity));
                *v = Value::String(mask(&text, &findings));
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|x| mask_value(entities, x, found)),
        Value::Object(map) => map
            .values_mut()
            .for_each(|x| mask_value(entities, x, found)),
        Value::Bool(_) | Value::Null => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> Vec<&'static str> {
        detect(&Entity::ALL, text)
            .iter()
            .map(|f| f.entity.name())
            .collect()
    }

    #[test]
    fn every_pattern_compiles() {
        let p = patterns();
        assert_eq!(p.email.len(), EMAIL.len());
        assert_eq!(p.phone.len(), PHONE.len());
        assert_eq!(p.card.len(), CARD.len());
        assert_eq!(p.iban.len(), IBAN.len());
        assert_eq!(p.secrets.len(), SECRETS.len());
    }

    #[test]
    fn checksums() {
        assert!(valid_card("4111 1111 1111 1111"));
        assert!(valid_card("5500-0000-0000-0004"));
        assert!(valid_card("378282246310005"));
        assert!(!valid_card("4111 1111 1111 1112"));
        assert!(!valid_card("1234567890123456"));
        assert!(valid_iban("GB82 WEST 1234 5698 7654 32"));
        assert!(valid_iban("DE89370400440532013000"));
        assert!(!valid_iban("DE89370400440532013001"));
    }

    /// Realistic samples with the entities each contains; the counts of true and false positives
    /// and misses over the whole set are asserted, and printed for the record.
    #[test]
    fn detectors_on_realistic_samples() {
        let samples: &[(&str, &[&str])] = &[
            (
                "Please email the invoice to jane.doe+billing@example.co.uk by Friday.",
                &["EMAIL_ADDRESS"],
            ),
            (
                "Contact support@acme.io or call +1 (415) 555-0132.",
                &["EMAIL_ADDRESS", "PHONE_NUMBER"],
            ),
            (
                "My number is 020 7946 0958, ring after six.",
                &["PHONE_NUMBER"],
            ),
            ("Call me on +44 7700 900123 tomorrow", &["PHONE_NUMBER"]),
            ("reach me at 415-555-0199", &["PHONE_NUMBER"]),
            (
                "Charge it to 4111 1111 1111 1111, exp 12/27.",
                &["CREDIT_CARD"],
            ),
            ("card: 5500-0000-0000-0004", &["CREDIT_CARD"]),
            ("Amex 378282246310005 please", &["CREDIT_CARD"]),
            (
                "Wire it to GB82 WEST 1234 5698 7654 32 today.",
                &["IBAN_CODE"],
            ),
            ("IBAN DE89370400440532013000", &["IBAN_CODE"]),
            (
                "use key sk-proj-Abcdefghijklmnopqrstuvwx123456 for the call",
                &["SECRET"],
            ),
            ("export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", &["SECRET"]),
            (
                "token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 leaked",
                &["SECRET"],
            ),
            ("db password = hunter2hunter2!", &["SECRET"]),
            ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow...", &["SECRET"]),
            // Nothing sensitive: dates, versions, order numbers, amounts, a failed Luhn, prose.
            ("The meeting is on 2024-01-15 at 10:30.", &[]),
            ("Upgrade from 1.2.3 to 1.10.0 before 15.01.2024", &[]),
            ("Order #123456789 shipped; total $1,234.56", &[]),
            ("The card 4111 1111 1111 1112 was declined", &[]),
            ("Find live giveaways for beta access and games", &[]),
            (
                "Compute the area of a triangle with base 10 and height 5.",
                &[],
            ),
            ("What is 2^31 - 1 = 2147483647?", &[]),
            ("Set the password policy to require 12 characters.", &[]),
            ("ISBN 978-0-306-40615-7 is in stock", &[]),
        ];
        let (mut tp, mut fp, mut missed) = (0, 0, 0);
        for (text, expected) in samples {
            let mut found = names(text);
            for e in expected.iter() {
                if let Some(i) = found.iter().position(|f| f == e) {
                    found.remove(i);
                    tp += 1;
                } else {
                    missed += 1;
                    eprintln!("missed {e} in {text:?}");
                }
            }
            for f in &found {
                eprintln!("false positive {f} in {text:?}");
            }
            fp += found.len();
        }
        eprintln!("PII detectors: {tp} true positives, {fp} false positives, {missed} missed");
        assert_eq!((fp, missed), (0, 0));
        assert_eq!(tp, 16);
    }

    #[test]
    fn masking_replaces_each_finding() {
        let text = "mail a@b.io, card 4111111111111111.";
        let f = detect(&Entity::ALL, text);
        assert_eq!(mask(text, &f), "mail <EMAIL_ADDRESS>, card <CREDIT_CARD>.");
        assert_eq!(mask("nothing here", &[]), "nothing here");
    }

    #[test]
    fn streamed_text_is_cut_only_where_no_entity_can_straddle() {
        let t = "Your card is 4111 1111";
        let cut = release_point(t);
        assert_eq!(&t[..cut], "Your card is ");
        assert_eq!(release_point("Call (555) 123-45"), "Call ".len());
        assert_eq!(release_point("done. "), "done. ".len());
        assert_eq!(release_point("write to bob@exa"), "write to ".len());
        let long = "x".repeat(1000);
        assert_eq!(release_point(&long), 1000 - MAX_HELD_TAIL);
        let wide = "é".repeat(300);
        assert!(wide.is_char_boundary(release_point(&wide)));
    }

    #[test]
    fn masking_after_a_released_prefix_and_inside_arguments() {
        let text = "card 4111 1111 1111 1111 ok";
        let findings = detect(&[Entity::CreditCard], text);
        assert_eq!(mask_after(text, &findings, 0), "card <CREDIT_CARD> ok");
        // The client has "card 4111": only the rest is masked and released.
        assert_eq!(mask_after(text, &findings, 9), "<CREDIT_CARD> ok");
        let (masked, found) = mask_arguments(
            &Entity::ALL,
            r#"{"card": "4111 1111 1111 1111", "n": 4111111111111111, "to": ["bob@example.com"]}"#,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&masked).unwrap();
        assert_eq!(v["card"], "<CREDIT_CARD>");
        assert_eq!(v["n"], "<CREDIT_CARD>");
        assert_eq!(v["to"][0], "<EMAIL_ADDRESS>");
        assert_eq!(found.len(), 3);
        assert!(mask_arguments(&Entity::ALL, r#"{"city": "Paris"}"#).is_none());
        let (raw, _) = mask_arguments(&Entity::ALL, "card=4111111111111111").unwrap();
        assert_eq!(raw, "card=<CREDIT_CARD>");
    }
}
