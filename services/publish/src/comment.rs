//! What a comment's text may hold: something a viewer can see, and nothing
//! that reorders the text around it.
//!
//! - After removing whitespace, control and invisible characters (format
//!   characters such as U+200B ZERO WIDTH SPACE and U+FEFF BYTE ORDER MARK,
//!   fillers that render as nothing such as U+3164 HANGUL FILLER, variation
//!   selectors), something must be left.
//! - Control characters other than tab and line breaks are refused.
//! - Bidirectional embeddings, overrides and isolates (U+202A..U+202E,
//!   U+2066..U+2069) are refused: an unterminated override reverses the
//!   display of whatever the client shows after the comment. The marks
//!   U+200E, U+200F and U+061C, which only set a direction, are allowed.

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};

use crate::error::TextError;

/// Checks a comment's text (see the module doc).
pub fn check(text: &str, max_chars: usize) -> Result<(), TextError> {
    let mut chars = 0;
    let mut visible = false;
    for (at, c) in text.chars().enumerate() {
        chars += 1;
        if is_bidi_control(c) {
            return Err(TextError::Bidi { code: c.into(), at });
        }
        if c.general_category() == GeneralCategory::Control && !matches!(c, '\t' | '\n' | '\r') {
            return Err(TextError::Control { code: c.into(), at });
        }
        visible |= !is_invisible(c);
    }
    if chars > max_chars {
        return Err(TextError::TooLong {
            chars,
            max: max_chars,
        });
    }
    if !visible {
        return Err(TextError::Blank);
    }
    Ok(())
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Characters that show nothing by themselves.
fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c.general_category(),
            GeneralCategory::Control
                | GeneralCategory::Format
                | GeneralCategory::SpaceSeparator
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
                | GeneralCategory::Unassigned
                | GeneralCategory::Surrogate
        )
        || matches!(
            c,
            // Letters and symbols that render as blank space.
            '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{2800}'
            // The combining grapheme joiner and variation selectors.
            | '\u{034F}' | '\u{FE00}'..='\u{FE0F}' | '\u{E0100}'..='\u{E01EF}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_texts_are_refused() {
        for text in [
            "",
            " ",
            "\t\n",
            "\u{200B}",
            "\u{FEFF}",
            "\u{0000}".trim_start_matches('\0'),
            "\u{3000}\u{00A0}",
            "\u{2060}\u{200D}\u{200C}",
            "\u{3164}\u{115F}",
            "\u{FE0F}",
        ] {
            assert_eq!(check(text, 100), Err(TextError::Blank), "{text:?}");
        }
    }

    #[test]
    fn controls_are_refused_with_their_position() {
        assert_eq!(
            check("\u{0}", 100),
            Err(TextError::Control { code: 0, at: 0 })
        );
        assert_eq!(
            check("hi\u{7}", 100),
            Err(TextError::Control { code: 7, at: 2 })
        );
        assert_eq!(
            check("a\u{85}", 100),
            Err(TextError::Control { code: 0x85, at: 1 })
        );
        assert!(check("line one\nline two\ttab\r\n", 100).is_ok());
    }

    #[test]
    fn bidi_overrides_and_isolates_are_refused_marks_are_not() {
        assert_eq!(
            check("abc\u{202E}def", 100),
            Err(TextError::Bidi {
                code: 0x202E,
                at: 3
            })
        );
        assert!(matches!(
            check("\u{2067}x", 100),
            Err(TextError::Bidi { code: 0x2067, .. })
        ));
        assert!(check("שלום \u{200F}!", 100).is_ok());
    }

    #[test]
    fn visible_text_passes_and_length_counts_characters() {
        assert!(check("hi", 100).is_ok());
        assert!(check("😀", 1).is_ok());
        assert!(check(" \u{200B}a", 100).is_ok());
        assert_eq!(
            check("ééé", 2),
            Err(TextError::TooLong { chars: 3, max: 2 })
        );
    }
}
