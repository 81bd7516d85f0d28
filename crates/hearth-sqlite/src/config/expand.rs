//! Environment-variable expansion of the config text, exactly as Go's `os.Expand` does it for Litestream.
//!
//! Hand-written because the rules are Go's, not a shell's: `$VAR` and `${VAR}` expand, an unset variable
//! becomes the empty string, `${VAR:-default}` looks up a variable literally named `VAR:-default`,
//! `$$` and `$1` are "special" one-character names (so they usually vanish), and a lone `$` stays.

/// Expands `$NAME` and `${NAME}` in `text` using `lookup`; unknown names expand to "".
pub fn expand_env(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    // `copied` is the index up to which `text` has been copied to `out`.
    let mut copied = 0;
    let mut j = 0;
    while j < bytes.len() {
        if bytes[j] == b'$' && j + 1 < bytes.len() {
            out.push_str(&text[copied..j]);
            let (name, width) = shell_name(&text[j + 1..]);
            match name {
                Some(name) => out.push_str(&lookup(name).unwrap_or_default()),
                // Valid syntax, but `$` was not followed by a name: keep the dollar sign.
                None if width == 0 => out.push('$'),
                // Bad syntax (`${}` or an unclosed `${`): Go drops those characters.
                None => {}
            }
            j += width;
            copied = j + 1;
        }
        j += 1;
    }
    out.push_str(&text[copied.min(text.len())..]);
    out
}

fn is_special(c: u8) -> bool {
    matches!(
        c,
        b'*' | b'#' | b'$' | b'@' | b'!' | b'?' | b'-' | b'0'..=b'9'
    )
}

fn is_alnum(c: u8) -> bool {
    c == b'_' || c.is_ascii_alphanumeric()
}

/// Returns the variable name after a `$` and how many bytes it spans, as Go's `getShellName`.
fn shell_name(s: &str) -> (Option<&str>, usize) {
    let b = s.as_bytes();
    if b[0] == b'{' {
        if b.len() > 2 && is_special(b[1]) && b[2] == b'}' {
            return (Some(&s[1..2]), 3);
        }
        for i in 1..b.len() {
            if b[i] == b'}' {
                if i == 1 {
                    return (None, 2);
                }
                return (Some(&s[1..i]), i + 1);
            }
        }
        return (None, 1);
    }
    if is_special(b[0]) {
        return (Some(&s[0..1]), 1);
    }
    let n = b.iter().take_while(|c| is_alnum(**c)).count();
    if n == 0 {
        (None, 0)
    } else {
        (Some(&s[..n]), n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "BUCKET" => Some("my-bucket".into()),
            "A_1" => Some("x".into()),
            "VAR:-d" => Some("weird".into()),
            "$" => None,
            _ => None,
        }
    }

    #[test]
    fn expands_like_go_os_expand() {
        let cases: &[(&str, &str)] = &[
            ("s3://${BUCKET}/db", "s3://my-bucket/db"),
            ("s3://$BUCKET/db", "s3://my-bucket/db"),
            ("$BUCKET.x", "my-bucket.x"),
            ("$A_1-y", "x-y"),
            ("${MISSING}", ""),
            ("a$MISSING-b", "a-b"),
            ("${VAR:-d}", "weird"),
            ("${VAR:-default}", ""),
            ("pa$$word", "paword"),
            ("cost: 5$", "cost: 5$"),
            ("a $ b", "a $ b"),
            ("x${}y", "xy"),
            ("x${y", "xy"),
            ("$1abc", "abc"),
            ("${1}", ""),
            ("no dollars", "no dollars"),
            ("ünï$BUCKETcödé", "ünïödé"),
            ("ünï${BUCKET}cödé", "ünïmy-bucketcödé"),
        ];
        for (input, want) in cases {
            assert_eq!(expand_env(input, &env), *want, "{input}");
        }
    }
}
