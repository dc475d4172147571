//! Logs: `MERIDIAN_LOG` filters, `MERIDIAN_LOG_FORMAT=json` for JSON lines, every line on stderr
//! with its control characters escaped.

pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MERIDIAN_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,aws=warn,hyper=warn"));
    let json = std::env::var("MERIDIAN_LOG_FORMAT").is_ok_and(|format| format == "json");
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(move || EscapingLine::new(ansi));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// One log line on stderr, with the control characters of its text escaped (a newline inside a
/// field — an admin-supplied string, an error from a peer — cannot forge a line of its own). The
/// formatter hands over each event whole; it is written when the line is dropped.
struct EscapingLine {
    buffer: Vec<u8>,
    /// The formatter's own colour codes are kept on a terminal.
    keep_escape_sequences: bool,
}

impl EscapingLine {
    fn new(keep_escape_sequences: bool) -> EscapingLine {
        EscapingLine {
            buffer: Vec::with_capacity(256),
            keep_escape_sequences,
        }
    }
}

impl std::io::Write for EscapingLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EscapingLine {
    fn drop(&mut self) {
        let escaped = escape_line(&self.buffer, self.keep_escape_sequences);
        use std::io::Write;
        let _ = std::io::stderr().lock().write_all(&escaped);
    }
}

/// A formatted event as one line: its control characters escaped, one newline at its end.
fn escape_line(formatted: &[u8], keep_escape_sequences: bool) -> Vec<u8> {
    let line = formatted.strip_suffix(b"\n").unwrap_or(formatted);
    let mut escaped = Vec::with_capacity(line.len() + 1);
    for &byte in line {
        match byte {
            b'\n' => escaped.extend_from_slice(b"\\n"),
            b'\r' => escaped.extend_from_slice(b"\\r"),
            b'\t' => escaped.push(byte),
            0x1b if keep_escape_sequences => escaped.push(byte),
            0x00..=0x1f | 0x7f => escaped.extend_from_slice(format!("\\x{byte:02x}").as_bytes()),
            _ => escaped.push(byte),
        }
    }
    escaped.push(b'\n');
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_keeps_its_control_characters_inside() {
        assert_eq!(
            escape_line(b"WARN role=arn:x\nERROR forged\r\x07 end\n", false),
            b"WARN role=arn:x\\nERROR forged\\r\\x07 end\n".to_vec()
        );
        assert_eq!(
            escape_line(b"\x1b[31mred\n", false),
            b"\\x1b[31mred\n".to_vec()
        );
        assert_eq!(
            escape_line(b"\x1b[31mred\ttab\n", true),
            b"\x1b[31mred\ttab\n".to_vec()
        );
    }
}
