//! How the report writes numbers.

/// A figure for people: thousands separated above 1,000, three
/// significant digits below (`1,234,567`, `56.8`, `0.123`), `-` for NaN.
pub fn number(value: f64) -> String {
    if !value.is_finite() {
        return "-".into();
    }
    let magnitude = value.abs();
    if magnitude >= 999.5 {
        let digits = format!("{:.0}", magnitude);
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(c);
        }
        let sign = if value < 0.0 { "-" } else { "" };
        format!("{sign}{grouped}")
    } else if magnitude >= 100.0 || magnitude == 0.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        // Three significant digits.
        let decimals = (2 - magnitude.log10().floor() as i32).clamp(3, 9) as usize;
        format!("{value:.decimals$}")
    }
}

/// A ratio: `2.35x`, `0.91x`, `324x`.
pub fn ratio(value: f64) -> String {
    if !value.is_finite() {
        "-".into()
    } else if value.abs() >= 100.0 {
        format!("{value:.0}x")
    } else if value.abs() >= 0.1 || value == 0.0 {
        format!("{value:.2}x")
    } else {
        format!("{}x", number(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped_or_keep_three_significant_digits() {
        assert_eq!(number(1_234_567.4), "1,234,567");
        assert_eq!(number(-4_096.0), "-4,096");
        assert_eq!(number(999.6), "1,000");
        assert_eq!(number(123.4), "123");
        assert_eq!(number(56.78), "56.8");
        assert_eq!(number(2.345), "2.35");
        assert_eq!(number(0.1234), "0.123");
        assert_eq!(number(0.003_21), "0.00321");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(f64::NAN), "-");
        assert_eq!(ratio(324.4), "324x");
        assert_eq!(ratio(0.914), "0.91x");
        assert_eq!(ratio(0.003_33), "0.00333x");
        assert_eq!(ratio(f64::INFINITY), "-");
    }
}
