//! Chat templates: Hugging Face Jinja templates rendered with `minijinja`, compiled once at load.
//!
//! The environment mirrors what `transformers` sets up for `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks`, Python string/dict methods (`.strip()`, `.items()`, via minijinja-contrib's pycompat), loop
//! controls, `raise_exception(msg)`, `strftime_now(fmt)`, and a `tojson` that writes JSON the way Python's
//! `json.dumps` does (`", "`/`": "` separators, no HTML escaping, `indent=`), so tool schemas render as they do
//! in Python. Not here: finding the template in the model directory (see `lib.rs`) or flattening OpenAI content
//! parts (the caller does that).

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};

use crate::ModelError;

/// The name the template is stored under in its environment.
const NAME: &str = "chat_template";

/// A compiled chat template.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names where it came from, for error messages.
    pub(crate) fn compile(source: String, origin: &str) -> Result<ChatTemplate, ModelError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source)
            .map_err(|source| ModelError::CompileChatTemplate {
                origin: origin.to_owned(),
                line: source.line(),
                source,
            })?;
        Ok(ChatTemplate { env })
    }

    /// Renders the template with `ctx`.
    pub(crate) fn render(&self, ctx: Value) -> Result<String, ModelError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|source| ModelError::RenderChatTemplate { line: None, source })?;
        template.render(ctx).map_err(|source| {
            match std::error::Error::source(&source)
                .and_then(|s| s.downcast_ref::<TemplateException>())
            {
                Some(TemplateException(message)) => ModelError::ChatTemplateRejected {
                    message: message.clone(),
                },
                None => ModelError::RenderChatTemplate {
                    line: source.line(),
                    source,
                },
            }
        })
    }
}

// === template functions ===

/// The message a template passed to `raise_exception`, attached to the render error as its source.
#[derive(Debug)]
struct TemplateException(String);

impl std::fmt::Display for TemplateException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateException {}

/// `raise_exception(msg)`: aborts rendering with `msg` (templates use it to reject bad conversations).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(TemplateException(message)))
}

/// `strftime_now(fmt)`: the current UTC time formatted like Python's `datetime.now().strftime(fmt)`.
fn strftime_now(format: &str) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(strftime(format, secs))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats a UNIX time (UTC) with the common `strftime` directives; unknown directives are kept verbatim.
fn strftime(format: &str, unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60,
    );
    let weekday = ((days + 3) % 7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // Writing to a String cannot fail.
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:>2}"),
            Some('-') if chars.clone().next() == Some('d') => {
                chars.next();
                write!(out, "{day}")
            }
            Some('B') => write!(out, "{month_name}"),
            Some('b') | Some('h') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{}", WEEKDAYS[weekday]),
            Some('a') => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            Some('j') => write!(out, "{yday:03}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{hour12:02}"),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('F') => write!(out, "{year}-{month:02}-{day:02}"),
            Some('T') => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Day count since 1970-01-01 of a civil date (inverse of [`civil_from_days`], for years >= 1970).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// === tojson ===

/// Options of Python's `json.dumps` that `transformers`' `tojson` filter exposes.
struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// `tojson(indent=None, ensure_ascii=False, separators=None, sort_keys=False)`, as in `transformers`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            None => Some(v.as_str().map(str::to_owned).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                )
            })?),
        },
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(seps) => match <[String; 2]>::try_from(seps) {
            Ok([item, key]) => (item, key),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair (item_separator, key_separator)",
                ));
            }
        },
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else if let Ok(f) = f64::try_from(value.clone()) {
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    let _ = write!(out, "{f:?}");
                }
            } else {
                let _ = write!(out, "{value}");
            }
        }
        ValueKind::String => {
            write_json_str(out, value.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort();
            }
            write_container(out, '{', '}', keys.len(), style, depth, |out, i| {
                let key = &keys[i];
                match key.as_str() {
                    Some(s) => write_json_str(out, s, style.ensure_ascii),
                    None => write_json_str(out, &key.to_string(), style.ensure_ascii),
                }
                out.push_str(&style.key_sep);
                write_json(out, &value.get_item(key)?, style, depth + 1)
            })?;
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), style, depth, |out, i| {
                write_json(out, &items[i], style, depth + 1)
            })?;
        }
        _ => write_json_str(out, &value.to_string(), style.ensure_ascii),
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    style: &JsonStyle,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..=depth {
                out.push_str(indent);
            }
        }
        item(out, i)?;
    }
    if let Some(indent) = &style.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
    out.push(close);
    Ok(())
}

/// A JSON string literal with Python's escaping (`\n`, `\"`, `\uXXXX` for other controls, and for non-ASCII
/// when `ensure_ascii`).
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, ctx: Value) -> Result<String, ModelError> {
        ChatTemplate::compile(source.to_owned(), "test")?.render(ctx)
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 15:05:09 UTC, a Friday.
        let t = 1_722_006_309;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %Y %H:%M:%S %p %j %%", t),
            "Friday July 26, 2024 15:05:09 PM 208 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d %a", 951_782_400), "2000-02-29 Tue");
    }

    #[test]
    fn strftime_now_is_callable_from_templates() -> Result<(), ModelError> {
        let out = render("{{ strftime_now('%Y') }}", Value::UNDEFINED)?;
        assert_eq!(out.len(), 4);
        Ok(())
    }

    #[test]
    fn tojson_matches_python_json_dumps() -> Result<(), ModelError> {
        // serde_json maps iterate in key order here, so the input is written sorted; Python's output is the same.
        let tool = serde_json::json!({
            "description": "Weather <in> \"city\"\n",
            "name": "get_weather",
            "parameters": {"e": [], "n": 1.5, "none": null, "ok": true, "required": ["city"], "type": "object"}
        });
        let ctx = minijinja::context! { tool => Value::from_serialize(&tool) };
        // Expected strings from Python's json.dumps.
        assert_eq!(
            render("{{ tool | tojson }}", ctx.clone())?,
            r#"{"description": "Weather <in> \"city\"\n", "name": "get_weather", "parameters": {"e": [], "n": 1.5, "none": null, "ok": true, "required": ["city"], "type": "object"}}"#
        );
        // Dict literals keep insertion order, as Python dicts do.
        assert_eq!(
            render(
                "{{ {'name': 'x', 'arguments': {'b': 1, 'a': [1, 2.0]}} | tojson }}",
                Value::UNDEFINED
            )?,
            r#"{"name": "x", "arguments": {"b": 1, "a": [1, 2.0]}}"#
        );
        assert_eq!(
            render(
                "{{ tool.parameters.required | tojson(indent=2) }}",
                ctx.clone()
            )?,
            "[\n  \"city\"\n]"
        );
        assert_eq!(
            render(
                "{{ {'b': 'é', 'a': 1} | tojson(ensure_ascii=true, sort_keys=true) }}",
                ctx
            )?,
            r#"{"a": 1, "b": "\u00e9"}"#
        );
        Ok(())
    }

    #[test]
    fn tojson_indent_nests_like_python() -> Result<(), ModelError> {
        let ctx = minijinja::context! { v => Value::from_serialize(serde_json::json!({"a": {"b": [1, 2]}, "c": {}})) };
        assert_eq!(
            render("{{ v | tojson(indent=4) }}", ctx)?,
            "{\n    \"a\": {\n        \"b\": [\n            1,\n            2\n        ]\n    },\n    \"c\": {}\n}"
        );
        Ok(())
    }

    #[test]
    fn compile_error_reports_the_line() {
        let err = ChatTemplate::compile("ok\n{% if %}".to_owned(), "test").err();
        assert!(
            matches!(
                err,
                Some(ModelError::CompileChatTemplate { line: Some(2), .. })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn loop_controls_are_available() -> Result<(), ModelError> {
        let out = render(
            "{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}",
            Value::UNDEFINED,
        )?;
        assert_eq!(out, "1");
        Ok(())
    }
}
