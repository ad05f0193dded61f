//! Control characters escaped for text output (log lines, operator tables). Producers choose `event_name`,
//! and `last_error` quotes it: written raw, a newline there forges a log line and an ESC drives the reader's
//! terminal. JSON output needs none of this: serde escapes control characters itself.

use std::fmt::{self, Write};

/// Shows a string with its control characters escaped: `\n`, `\r`, `\t`, otherwise `\x1b` and the like.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Escaping(f).write_str(self.0)
    }
}

/// A writer that escapes the control characters written through it.
pub struct Escaping<W>(pub W);

impl<W: Write> Write for Escaping<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // Write clean runs whole: most text has no control character at all.
        let mut rest = text;
        while let Some(at) = rest.find(char::is_control) {
            self.0.write_str(&rest[..at])?;
            let control = rest[at..].chars().next().expect("find returned a char boundary");
            match control {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                // Every control character (C0, DEL, C1) is below 0x100.
                other => write!(self.0, "\\x{:02x}", u32::from(other))?,
            }
            rest = &rest[at + control.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        let cases = [
            ("a\nforged line", "a\\nforged line"),
            ("\x1b[31mred", "\\x1b[31mred"),
            ("tab\there\r\0", "tab\\there\\r\\x00"),
            ("\u{7f}\u{85}\u{9b}", "\\x7f\\x85\\x9b"),
            ("order.placed", "order.placed"),
            ("commande.créée ✓ \\n", "commande.créée ✓ \\n"),
        ];
        for (raw, shown) in cases {
            assert_eq!(Escaped(raw).to_string(), shown, "{raw:?}");
        }
    }
}
