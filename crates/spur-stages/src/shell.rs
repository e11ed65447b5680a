//! Turning a command template into a bash script without ever placing a
//! value in the script's text.
//!
//! Each `${name}` becomes a reference to an environment variable that holds
//! the value (`SPUR_VAR_0`, `SPUR_VAR_1`, …), written for where it stands:
//! `"${SPUR_VAR_0}"` outside quotes, `${SPUR_VAR_0}` inside double quotes,
//! `'"${SPUR_VAR_0}"'` inside single quotes, and so on. bash never parses
//! the result of a variable expansion as code, and a quoted expansion is
//! neither split nor globbed, so a value arrives as exactly one word (or as
//! exactly that text inside the user's quotes), whatever it contains. The
//! template is read once; nothing in a value is substituted again.

use std::ffi::OsString;

/// Where the scanner stands in the script.
enum State {
    /// Outside quotes at the top level.
    Top,
    /// Inside `$(…)`; `depth` counts the parentheses opened within.
    Command { depth: u32 },
    /// Inside `` `…` ``.
    Backtick,
    /// Inside `"…"`.
    Double,
    /// Inside `'…'`.
    Single,
    /// Inside `$'…'`.
    AnsiC,
    /// Inside `$((…))`; `depth` counts the parentheses opened within.
    Arith { depth: u32 },
    /// From a word-initial `#` to the end of the line.
    Comment,
    /// A here-document's body; `expand` unless its delimiter was quoted.
    Heredoc {
        delimiter: String,
        expand: bool,
        strip_tabs: bool,
    },
}

/// A script ready for `bash -c`, and the environment it reads its values from.
#[derive(Debug)]
pub(crate) struct Script {
    pub text: String,
    pub env: Vec<(String, OsString)>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ScriptError {
    /// `lookup` knows no value for this name.
    Unknown(String),
    /// The value cannot be passed as it stands.
    Unusable { name: String, why: &'static str },
}

/// Renders `template`, taking each referenced value from `lookup` once.
pub(crate) fn render(
    template: &str,
    lookup: &mut dyn FnMut(&str) -> Option<OsString>,
) -> Result<Script, ScriptError> {
    let mut text = String::with_capacity(template.len() + 16);
    let mut names: Vec<String> = Vec::new();
    let mut env: Vec<(String, OsString)> = Vec::new();
    let mut stack = vec![State::Top];
    // Here-documents whose bodies begin after the current line.
    let mut pending: Vec<State> = Vec::new();
    let mut line_start = true;
    let mut prev: Option<char> = None;
    let mut i = 0;
    while i < template.len() {
        let rest = &template[i..];
        let state = stack.last_mut().expect("the top state is never popped");

        if let (
            State::Heredoc {
                delimiter,
                strip_tabs,
                ..
            },
            true,
        ) = (&*state, line_start)
        {
            let line = &rest[..rest.find('\n').unwrap_or(rest.len())];
            let bare = if *strip_tabs {
                line.trim_start_matches('\t')
            } else {
                line
            };
            if bare == delimiter.as_str() {
                text.push_str(line);
                i += line.len();
                line_start = false;
                stack.pop();
                continue;
            }
        }

        if let Some(body) = rest.strip_prefix("${") {
            let Some(end) = body.find('}') else {
                // Unterminated: not a reference (as in spur_spec::references).
                text.push_str(rest);
                break;
            };
            let name = body[..end].trim();
            let k = match names.iter().position(|n| n == name) {
                Some(k) => k,
                None => {
                    let value = lookup(name).ok_or_else(|| ScriptError::Unknown(name.into()))?;
                    if value.as_encoded_bytes().contains(&0) {
                        return Err(ScriptError::Unusable {
                            name: name.into(),
                            why: "it contains a NUL byte, which no shell variable can hold",
                        });
                    }
                    names.push(name.into());
                    env.push((format!("SPUR_VAR_{}", env.len()), value));
                    env.len() - 1
                }
            };
            let var = &env[k].0;
            match state {
                State::Top | State::Command { .. } | State::Backtick => {
                    text.push_str(&format!("\"${{{var}}}\""))
                }
                State::Double
                | State::Arith { .. }
                | State::Comment
                | State::Heredoc { expand: true, .. } => text.push_str(&format!("${{{var}}}")),
                // Close the quote, expand in double quotes, reopen.
                State::Single => text.push_str(&format!("'\"${{{var}}}\"'")),
                State::AnsiC => text.push_str(&format!("'\"${{{var}}}\"$'")),
                // Nothing expands in a quoted here-document: the text itself
                // goes in, on one line so that it cannot end the document.
                State::Heredoc { expand: false, .. } => {
                    let value = env[k].1.to_str().ok_or(ScriptError::Unusable {
                        name: name.into(),
                        why: "a quoted here-document needs UTF-8 text",
                    })?;
                    if value.contains('\n') {
                        return Err(ScriptError::Unusable {
                            name: name.into(),
                            why: "a quoted here-document cannot take a value with a newline",
                        });
                    }
                    text.push_str(value);
                }
            }
            i += 2 + end + 1;
            line_start = false;
            prev = Some('}');
            continue;
        }

        let c = rest.chars().next().expect("i is below the length");
        let next = rest[c.len_utf8()..].chars().next();
        // How many bytes this step copies verbatim.
        let mut take = c.len_utf8();
        let word_start = prev.is_none_or(|p| " \t\n;&|()".contains(p));
        match state {
            State::Top | State::Command { .. } | State::Backtick => match c {
                '\\' => take += next.map_or(0, char::len_utf8),
                '\'' => stack.push(State::Single),
                '"' => stack.push(State::Double),
                '$' if next == Some('\'') => {
                    take = 2;
                    stack.push(State::AnsiC);
                }
                '$' if next == Some('"') => {
                    take = 2;
                    stack.push(State::Double);
                }
                '$' if rest.starts_with("$((") => {
                    take = 3;
                    stack.push(State::Arith { depth: 0 });
                }
                '$' if next == Some('(') => {
                    take = 2;
                    stack.push(State::Command { depth: 0 });
                }
                '`' if matches!(state, State::Backtick) => {
                    stack.pop();
                }
                '`' => stack.push(State::Backtick),
                '(' => {
                    if let State::Command { depth } = state {
                        *depth += 1;
                    }
                }
                ')' => match state {
                    State::Command { depth: 0 } => {
                        stack.pop();
                    }
                    State::Command { depth } => *depth -= 1,
                    _ => {}
                },
                '#' if word_start => stack.push(State::Comment),
                '<' if rest.starts_with("<<<") => take = 3,
                '<' if rest.starts_with("<<") => {
                    let (len, heredoc) = heredoc_operator(rest);
                    take = len;
                    pending.extend(heredoc);
                }
                // Bodies are read in the order their operators appeared.
                '\n' if !pending.is_empty() => stack.push(pending.remove(0)),
                _ => {}
            },
            State::Double => match c {
                '\\' => take += next.map_or(0, char::len_utf8),
                '"' => {
                    stack.pop();
                }
                '$' if rest.starts_with("$((") => {
                    take = 3;
                    stack.push(State::Arith { depth: 0 });
                }
                '$' if next == Some('(') => {
                    take = 2;
                    stack.push(State::Command { depth: 0 });
                }
                '`' => stack.push(State::Backtick),
                _ => {}
            },
            State::Single => {
                if c == '\'' {
                    stack.pop();
                }
            }
            State::AnsiC => match c {
                '\\' => take += next.map_or(0, char::len_utf8),
                '\'' => {
                    stack.pop();
                }
                _ => {}
            },
            State::Arith { depth } => match c {
                '(' => *depth += 1,
                ')' if *depth == 0 && next == Some(')') => {
                    take = 2;
                    stack.pop();
                }
                ')' => *depth = depth.saturating_sub(1),
                '$' if next == Some('(') && !rest.starts_with("$((") => {
                    take = 2;
                    stack.push(State::Command { depth: 0 });
                }
                _ => {}
            },
            State::Comment => {
                if c == '\n' {
                    // The newline belongs to the code around the comment.
                    stack.pop();
                    continue;
                }
            }
            State::Heredoc { expand, .. } => match c {
                '\\' if *expand => take += next.map_or(0, char::len_utf8),
                '$' if *expand && rest.starts_with("$((") => {
                    take = 3;
                    stack.push(State::Arith { depth: 0 });
                }
                '$' if *expand && next == Some('(') => {
                    take = 2;
                    stack.push(State::Command { depth: 0 });
                }
                '`' if *expand => stack.push(State::Backtick),
                _ => {}
            },
        }
        let copied = &rest[..take];
        text.push_str(copied);
        i += take;
        line_start = copied.ends_with('\n');
        prev = copied.chars().next_back();
    }
    Ok(Script { text, env })
}

/// Reads a here-document operator at the start of `rest` (`<<WORD`,
/// `<<-WORD`, with WORD quoted or not): its length and the body it opens.
fn heredoc_operator(rest: &str) -> (usize, Option<State>) {
    let mut len = 2;
    let strip_tabs = rest[len..].starts_with('-');
    if strip_tabs {
        len += 1;
    }
    len += rest[len..].len() - rest[len..].trim_start_matches([' ', '\t']).len();
    let word_len = rest[len..]
        .find(|c: char| c.is_whitespace() || ";&|<>()".contains(c))
        .unwrap_or(rest.len() - len);
    let word = &rest[len..len + word_len];
    len += word_len;
    if word.is_empty() {
        return (len, None);
    }
    let quoted = word.contains(['\'', '"', '\\']);
    let delimiter: String = word.chars().filter(|c| !"'\"\\".contains(*c)).collect();
    (
        len,
        Some(State::Heredoc {
            delimiter,
            expand: !quoted,
            strip_tabs,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `template` with `${x}` = `value` and returns what it printed.
    fn run(template: &str, value: &str) -> String {
        let mut lookup = |n: &str| (n == "x").then(|| OsString::from(value));
        let script = render(template, &mut lookup).expect("renders");
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script.text)
            .current_dir(dir.path())
            .envs(script.env)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{template:?} with {value:?} failed: {}\nscript: {}",
            String::from_utf8_lossy(&out.stderr),
            script.text
        );
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(files.is_empty(), "{template:?} with {value:?} ran code");
        String::from_utf8(out.stdout).unwrap()
    }

    const NASTY: &[&str] = &[
        "plain",
        "a b  c",
        "",
        "$(touch X)",
        "x; touch X",
        "`touch X`",
        "it's",
        "${out}",
        "say \"hi\"",
        "back\\slash",
        "*",
        "two\nlines",
        "-n",
        "EOF",
        "'\"; touch X; echo \"'",
    ];

    #[test]
    fn a_value_is_one_word_outside_quotes() {
        for v in NASTY {
            assert_eq!(run("printf '[%s]' ${x}", v), format!("[{v}]"));
            assert_eq!(run("printf '[%s]' pre${x}post", v), format!("[pre{v}post]"));
            assert_eq!(run("y=${x}; printf '[%s]' \"$y\"", v), format!("[{v}]"));
        }
    }

    #[test]
    fn a_value_is_its_text_inside_the_users_quotes() {
        for v in NASTY {
            assert_eq!(run("printf '[%s]' \"${x}\"", v), format!("[{v}]"));
            assert_eq!(run("printf '[%s]' \"a ${x} b\"", v), format!("[a {v} b]"));
            assert_eq!(run("printf '[%s]' 'a ${x} b'", v), format!("[a {v} b]"));
            assert_eq!(run("printf '[%s]' $'\\t${x}'", v), format!("[\t{v}]"));
        }
    }

    #[test]
    fn a_value_is_one_word_in_command_substitutions_and_here_documents() {
        for v in NASTY {
            let want = format!("[{v}]");
            assert_eq!(run("printf '[%s]' \"$(printf %s ${x})\"", v), want);
            assert_eq!(run("printf '[%s]' \"$(printf %s \"${x}\")\"", v), want);
            assert_eq!(run("printf '[%s]' \"`printf %s ${x}`\"", v), want);
            assert_eq!(run("cat <<EOF\n[${x}]\nEOF\n", v), format!("{want}\n"));
            assert_eq!(run("cat <<-EOF\n\t[${x}]\n\tEOF\n", v), format!("{want}\n"));
        }
        // Bodies in order; a quoted one takes the text itself.
        assert_eq!(
            run("cat <<A; cat <<'B'\n${x}\nA\n'${x}'\nB\n", "one line"),
            "one line\n'one line'\n"
        );
    }

    #[test]
    fn comments_arithmetic_and_shell_variables_are_left_alone() {
        assert_eq!(run("# ${x}\necho ok # ${x}", "a\ntouch X"), "ok\n");
        assert_eq!(run("echo $(( ${x} + 1 ))", "41"), "42\n");
        assert_eq!(
            run("v=1; echo \"$v$HOME\" >/dev/null; echo ${x}", "ok"),
            "ok\n"
        );
        assert_eq!(run("echo '#' ${x}", "v"), "# v\n");
    }

    #[test]
    fn each_name_is_looked_up_once_and_unknown_names_are_errors() {
        let mut calls = 0;
        let mut lookup = |n: &str| {
            calls += 1;
            (n == "x").then(|| OsString::from("v"))
        };
        let script = render("${x} ${ x } ${x}", &mut lookup).unwrap();
        assert_eq!(calls, 1);
        assert_eq!(script.env.len(), 1);
        let err = render("${y}", &mut |_| None).unwrap_err();
        assert_eq!(err, ScriptError::Unknown("y".into()));
        let err = render("${x}", &mut |_| Some(OsString::from("a\0b"))).unwrap_err();
        assert!(matches!(err, ScriptError::Unusable { .. }));
    }
}
