//! qemu's pretty JSON layout (qobject_to_json_pretty): four-space indents, `"key": value`, and empty
//! containers printed as an opening bracket, a newline and the closing bracket.

use serde_json::Value;

/// Renders `v` exactly as qemu-img prints JSON.
pub fn pretty(v: &Value) -> String {
    let mut s = String::new();
    write(&mut s, v, 0);
    s
}

fn indent(s: &mut String, level: usize) {
    for _ in 0..level {
        s.push_str("    ");
    }
}

fn write(s: &mut String, v: &Value, level: usize) {
    match v {
        Value::Object(m) => {
            s.push_str("{\n");
            let n = m.len();
            for (i, (k, v)) in m.iter().enumerate() {
                indent(s, level + 1);
                s.push_str(&Value::String(k.clone()).to_string());
                s.push_str(": ");
                write(s, v, level + 1);
                if i + 1 < n {
                    s.push(',');
                }
                s.push('\n');
            }
            if n == 0 {
                // qemu prints "{", newline, then the closing brace.
            }
            indent(s, level);
            s.push('}');
        }
        Value::Array(a) => {
            s.push_str("[\n");
            let n = a.len();
            for (i, v) in a.iter().enumerate() {
                indent(s, level + 1);
                write(s, v, level + 1);
                if i + 1 < n {
                    s.push(',');
                }
                s.push('\n');
            }
            indent(s, level);
            s.push(']');
        }
        other => s.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_qemu_layout() {
        let v = serde_json::json!({"a": 1, "b": [], "c": {"d": {}}});
        assert_eq!(
            pretty(&v),
            "{\n    \"a\": 1,\n    \"b\": [\n    ],\n    \"c\": {\n        \"d\": {\n        }\n    }\n}"
        );
    }
}
