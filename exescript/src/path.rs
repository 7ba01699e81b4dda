//! Where in a JSON document a deserialisation error happened, written the way a reader
//! looks things up (`batch[2].run.entrypoint`), so every error names the offending place.

use serde_path_to_error::{Path, Segment};

/// `root` followed by the path: `[i]` for array positions, `.name` for keys and variants.
pub(crate) fn describe(root: &str, path: &Path) -> String {
    let mut out = String::from(root);
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                out.push('[');
                out.push_str(&index.to_string());
                out.push(']');
            }
            Segment::Map { key } => {
                out.push('.');
                out.push_str(key);
            }
            Segment::Enum { variant } => {
                out.push('.');
                out.push_str(variant);
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    out
}
