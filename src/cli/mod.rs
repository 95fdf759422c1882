//! Client subcommands whose output is more than one call and a print
//! (`shoal gossip`, `shoal cluster`, the progress of `shoal publish` and
//! `shoal create --wait`), kept out of `main.rs`. Formatting is pure
//! (data in, text out) and unit-tested; only the `run` functions do I/O.
//! Part of the binary, so `anyhow` is fine here.

pub mod cluster;
pub mod gossip;
pub mod progress;

/// Rows as an aligned table, one line per row (header first).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        out.push_str(s.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// Prints rows as an aligned table.
pub fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    print!("{}", table(header, &rows));
}

/// Seconds as `0.4s`, `12s`, `3m5s`; `-` for none.
pub fn age(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 10.0 => format!("{s:.1}s"),
        Some(s) => shoal::units::format_duration(std::time::Duration::from_secs_f64(s.max(0.0))),
    }
}

/// Phi to one decimal; `-` for none.
pub fn phi(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |p| format!("{p:.1}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_the_widest_cell() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["x".into(), "1".into()],
                vec!["long".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A     BB\nx     1\nlong  22\n");
    }

    #[test]
    fn ages_and_phi() {
        for (input, want) in [
            (None, "-"),
            (Some(0.0), "0.0s"),
            (Some(0.44), "0.4s"),
            (Some(12.7), "12s"),
            (Some(185.0), "3m5s"),
        ] {
            assert_eq!(age(input), want, "{input:?}");
        }
        assert_eq!(phi(None), "-");
        assert_eq!(phi(Some(0.456)), "0.5");
    }
}
