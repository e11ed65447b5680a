//! Where each key and value of a YAML document sits in its text.
//!
//! serde_yaml locates syntax and type errors itself but keeps no positions in
//! its values, so checks made after deserialisation (undefined names, ranges,
//! cycles) look positions up here by key path, e.g. `grid.reward[1]`.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Pos {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

#[derive(Debug, Default)]
pub struct Locations {
    keys: HashMap<String, Pos>,
    values: HashMap<String, Pos>,
    /// Keys written twice in one mapping (serde maps would keep the last silently).
    pub duplicates: Vec<(String, Pos)>,
}

impl Locations {
    /// Index a document. Text that fails to parse yields an empty index (the
    /// syntax error itself is reported by serde_yaml).
    pub fn index(text: &str) -> Locations {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut builder, false).is_err() {
            return Locations::default();
        }
        builder.locations
    }

    /// Position of a key (for "unknown key") or, for sequence items, the item.
    pub fn key(&self, path: &str) -> Option<Pos> {
        self.keys
            .get(path)
            .or_else(|| self.values.get(path))
            .copied()
    }

    /// Position of a value, falling back to its key, then to the nearest
    /// enclosing path that is known.
    pub fn value(&self, path: &str) -> Option<Pos> {
        let mut p = path;
        loop {
            if let Some(pos) = self.values.get(p).or_else(|| self.keys.get(p)) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

enum Frame {
    Map {
        path: String,
        pending_key: Option<String>,
        seen: std::collections::HashSet<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    locations: Locations,
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Builder {
    /// The path of the value that starts now, advancing the enclosing frame.
    /// Returns None when the event is a mapping key.
    fn value_path(&mut self, scalar_key: Option<&str>, pos: Pos) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map {
                path,
                pending_key,
                seen,
            }) => match pending_key.take() {
                Some(key) => Some(join(path, &key)),
                None => {
                    // This event is a key; complex keys get a placeholder name.
                    let key = scalar_key.unwrap_or("?").to_string();
                    let full = join(path, &key);
                    self.locations.keys.insert(full.clone(), pos);
                    if !seen.insert(key.clone()) {
                        self.locations.duplicates.push((full, pos));
                    }
                    *pending_key = Some(key);
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from(mark);
        match ev {
            Event::Scalar(value, ..) => {
                if let Some(p) = self.value_path(Some(&value), pos) {
                    self.locations.values.insert(p, pos);
                }
            }
            Event::Alias(_) => {
                if let Some(p) = self.value_path(None, pos) {
                    self.locations.values.insert(p, pos);
                }
            }
            Event::MappingStart(..) => {
                let path = self.value_path(None, pos).unwrap_or_default();
                self.locations.values.entry(path.clone()).or_insert(pos);
                self.stack.push(Frame::Map {
                    path,
                    pending_key: None,
                    seen: Default::default(),
                });
            }
            Event::SequenceStart(..) => {
                let path = self.value_path(None, pos).unwrap_or_default();
                self.locations.values.entry(path.clone()).or_insert(pos);
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_items() {
        let text = "a:\n  b: 1\n  c: [x, y]\nd:\n  - e: 2\n";
        let loc = Locations::index(text);
        assert_eq!(loc.key("a.b"), Some(Pos { line: 2, column: 3 }));
        assert_eq!(loc.value("a.b"), Some(Pos { line: 2, column: 6 }));
        assert_eq!(
            loc.value("a.c[1]"),
            Some(Pos {
                line: 3,
                column: 10
            })
        );
        assert_eq!(loc.key("d[0].e"), Some(Pos { line: 5, column: 5 }));
        // Unknown deeper paths fall back to the nearest known parent.
        assert_eq!(
            loc.value("a.c[1].z"),
            Some(Pos {
                line: 3,
                column: 10
            })
        );
    }

    #[test]
    fn reports_duplicate_keys() {
        let loc = Locations::index("a:\n  b: 1\n  b: 2\nc: {x: 1, x: 2}\n");
        let dups: Vec<&str> = loc.duplicates.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(dups, ["a.b", "c.x"]);
        assert_eq!(loc.duplicates[0].1, Pos { line: 3, column: 3 });
    }
}
