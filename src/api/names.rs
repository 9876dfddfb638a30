//! Names clients give: one rule for a new user's `username` and a face's `displayName`, so that
//! no two names that display alike can both exist and nothing invisible hides in one. A new
//! name must be 1 to MAX_NAME_CHARS characters, free of control, format and other invisible
//! characters (soft hyphen, word joiner, zero-width space, tag characters, line and paragraph
//! separators, bidirectional controls, variation selectors, fillers), already in Unicode NFC
//! and NFKC (a combining accent after its letter, fullwidth letters, ligatures and special
//! spaces are refused, with the form to send instead), written in one script (digits,
//! punctuation and spaces go with any; Japanese and Korean mixes with Han count as one), and
//! without white space around it. Nothing is trimmed or rewritten: a name is stored as sent
//! or refused with `invalid_username`. Names that already exist are only looked up with the
//! lighter [`check_existing`] (they may predate the rule).

use unicode_normalization::char::canonical_combining_class;
use unicode_normalization::{UnicodeNormalization, is_nfc, is_nfkc};
use unicode_script::{Script, UnicodeScript};
use unicode_security::general_security_profile::IdentifierType;
use unicode_security::{GeneralSecurityProfile, MixedScript};

use super::error::{ApiError, ErrorCode};
use super::extract::RequestLimits;

/// A name used to find something that exists: 1 to `max_name_chars` characters, no control
/// or format characters, no surrounding white space.
pub fn check_existing(field: &str, name: &str, limits: &RequestLimits) -> Result<(), ApiError> {
    if name.is_empty() {
        return refuse(field, "it is empty".into());
    }
    if name.chars().count() > limits.max_name_chars {
        return refuse(field, format!("it is longer than {} characters", limits.max_name_chars));
    }
    if name.chars().any(char::is_control) {
        return refuse(field, "it contains control characters".into());
    }
    if let Some(c) = invisible(name) {
        return refuse(field, format!("it contains the invisible character U+{:04X}", u32::from(c)));
    }
    if name.trim() != name {
        return refuse(field, "it starts or ends with white space".into());
    }
    Ok(())
}

/// A name for something new (a user, a face): [`check_existing`] and the rest of the rule
/// (see the module's first lines).
pub fn check_new(field: &str, name: &str, limits: &RequestLimits) -> Result<(), ApiError> {
    check_existing(field, name, limits)?;
    if !is_nfc(name) {
        let nfc: String = name.nfc().collect();
        return refuse(field, format!("it is not in Unicode NFC (an accent apart from its letter): send '{nfc}'"));
    }
    if !is_nfkc(name) {
        let nfkc: String = name.nfkc().collect();
        return refuse(
            field,
            format!(
                "it holds compatibility characters (fullwidth letters, ligatures, special spaces) that display like others: send '{nfkc}'"
            ),
        );
    }
    if !name.is_single_script() {
        let mut scripts: Vec<&str> = Vec::new();
        for s in name.chars().map(|c| c.script()).filter(|s| !matches!(s, Script::Common | Script::Inherited | Script::Unknown)) {
            if !scripts.contains(&s.full_name()) {
                scripts.push(s.full_name());
            }
        }
        return refuse(field, format!("it mixes scripts ({}): a letter of one may pass for a letter of another", scripts.join(", ")));
    }
    Ok(())
}

fn refuse(field: &str, why: String) -> Result<(), ApiError> {
    Err(ApiError::new(ErrorCode::InvalidUsername, format!("invalid {field}: {why}")))
}

/// The first character of `name` that shows nothing or changes how the others show: format
/// characters (Unicode category Cf), line and paragraph separators, and every other default
/// ignorable code point. The joiners U+200C and U+200D are kept right after a virama, where
/// Indic scripts need them to choose a conjunct form.
fn invisible(name: &str) -> Option<char> {
    let mut previous = None;
    for c in name.chars() {
        let joiner_after_virama = matches!(c, '\u{200c}' | '\u{200d}') && previous.is_some_and(|p: char| canonical_combining_class(p) == 9);
        if !joiner_after_virama && (is_format_or_separator(c) || c.identifier_type() == Some(IdentifierType::Default_Ignorable)) {
            return Some(c);
        }
        previous = Some(c);
    }
    None
}

/// Unicode's format characters (Cf) and the line and paragraph separators (Zl, Zp).
fn is_format_or_separator(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{890}'..='\u{891}'
            | '\u{8e2}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(name: &str) -> Result<(), String> {
        check_new("username", name, &RequestLimits::default()).map_err(|e| e.message)
    }

    #[test]
    fn names_that_display_like_others_are_refused() {
        for (bad, why) in [
            ("bo\u{2060}b", "U+2060"),
            ("bo\u{ad}b", "U+00AD"),
            ("bob\u{e0041}", "U+E0041"),
            ("bob\u{2028}x", "U+2028"),
            ("a\u{200b}b", "U+200B"),
            ("eve\u{202e}gnp.exe", "U+202E"),
            ("bo\u{fe0f}b", "U+FE0F"),
            ("a\u{3164}b", "U+3164"),
            ("b\u{43e}b", "mixes scripts (Latin, Cyrillic)"),
            ("\u{ff41}lice", "send 'alice'"),
            ("Zoe\u{308}", "send 'Zoë'"),
            ("Al\u{a0}Martin", "send 'Al Martin'"),
            ("ﬁona", "send 'fiona'"),
            (" alice", "white space"),
            ("alice ", "white space"),
            ("a\tb", "control"),
            ("", "empty"),
        ] {
            let e = new(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(new(&"y".repeat(129)).is_err());
    }

    #[test]
    fn names_in_one_script_pass_as_sent() {
        for good in [
            "alice",
            "Zoë",
            "José García",
            "O'Brien",
            "Jean-Luc Picard 2",
            "李小龙",
            "山田たろう",
            "김민준",
            "Ἀθηνᾶ",
            "Анна",
            "क्षत्रिय",
            "क्\u{200d}ष",
            "../x",
            "Unknown Pleasures",
        ] {
            assert_eq!(new(good), Ok(()), "{good:?}");
        }
        // A joiner away from a virama hides nothing useful.
        assert!(new("a\u{200d}b").is_err());
    }

    #[test]
    fn existing_names_are_only_checked_for_what_breaks_logs() {
        let lim = RequestLimits::default();
        assert!(check_existing("username", "b\u{43e}b", &lim).is_ok(), "may predate the rule");
        assert!(check_existing("username", "Zoe\u{308}", &lim).is_ok());
        assert!(check_existing("username", "a\nb", &lim).is_err());
        assert!(check_existing("username", "a\u{2060}b", &lim).is_err());
    }
}
