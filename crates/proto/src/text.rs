//! Text that came from elsewhere (an agent's report, a certificate's subject, a policy's error)
//! on its way to a terminal or a log line.
//!
//! A registered agent controls the strings it reports; printed raw, an ANSI or OSC sequence in
//! them could clear the operator's screen, forge table rows or alerts, or retitle the window, and
//! a bidirectional override could make text read differently from what it is. [`terminal_safe`]
//! is the one helper every such output goes through: it escapes control characters so they are
//! shown, not obeyed. [`bounded`] is what the management plane applies to free text it receives
//! before it stores it.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` must be escaped before it reaches a terminal: the C0 controls (tab and newline
/// included: they break the layout of a table row), DEL, the C1 controls (U+0080–U+009F, which
/// some terminals take as CSI/OSC introducers), and the Unicode bidirectional and zero-width
/// format characters that make text display differently from what it is.
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}'
        )
}

/// `s` with every character [`needs_escape`] names written as an escape (`\x1b`, `\n`, `\u{202e}`),
/// so what an agent or a file put there is shown, never executed by the terminal. Borrows when
/// nothing needed escaping (the common case).
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Free text received from a peer, made safe to store and show: escaped ([`terminal_safe`]) and
/// cut to at most `max_chars` characters (an ellipsis marks a cut). Escaping comes first, so a
/// cut can never leave half an escape sequence that a terminal would complete.
pub fn bounded(s: &str, max_chars: usize) -> String {
    let safe = terminal_safe(s);
    if safe.chars().count() <= max_chars {
        return safe.into_owned();
    }
    let mut out: String = safe.chars().take(max_chars.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_shown_not_obeyed() {
        let hostile = "\u{1b}[2J\u{1b}]0;owned\u{7}fake ALERT\r\n\u{9b}31m\u{202e}txt.exe";
        let safe = terminal_safe(hostile);
        assert_eq!(safe, "\\x1b[2J\\x1b]0;owned\\x07fake ALERT\\r\\n\\u{9b}31m\\u{202e}txt.exe");
        assert!(!safe.chars().any(needs_escape), "{safe}");
        assert!(matches!(terminal_safe("cluster-1: Ready · 5 m left"), Cow::Borrowed(_)));
    }

    #[test]
    fn bounded_text_is_escaped_first_then_cut_on_a_character() {
        assert_eq!(bounded("short", 10), "short");
        assert_eq!(bounded("ééééé", 3), "éé…");
        let cut = bounded(&"\u{1b}".repeat(100), 10);
        assert_eq!(cut.chars().count(), 10);
        assert!(!cut.contains('\u{1b}'), "{cut}");
    }

    proptest::proptest! {
        #[test]
        fn nothing_a_terminal_would_act_on_survives(s in ".*", max in 1usize..300) {
            proptest::prop_assert!(!terminal_safe(&s).chars().any(needs_escape));
            let b = bounded(&s, max);
            proptest::prop_assert!(!b.chars().any(needs_escape));
            proptest::prop_assert!(b.chars().count() <= max);
        }
    }
}
