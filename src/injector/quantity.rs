//! Kubernetes resource quantities (`10m`, `16Mi`, `1.5Gi`, `2e3`), read
//! as the API server reads them, so an annotation the injector accepts
//! never makes a pod the API server refuses.

/// A positive quantity, kept as written and as a number of base units.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    text: String,
    value: f64,
}

/// Why a text is not a quantity the injector accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantityError {
    /// Not a Kubernetes quantity (or signed, or over 32 characters).
    #[error("{text:?} is not a Kubernetes quantity (e.g. 10m, 16Mi, 1Gi)")]
    Malformed {
        /// As given (cut to 32 characters).
        text: String,
    },
    /// Zero.
    #[error("{text:?} must be more than zero")]
    Zero {
        /// As given.
        text: String,
    },
}

impl Quantity {
    /// The quantity as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its value in base units (cores, bytes).
    pub fn value(&self) -> f64 {
        self.value
    }
}

impl std::str::FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = || QuantityError::Malformed {
            text: text.chars().take(32).collect(),
        };
        if text.len() > 32 {
            return Err(malformed());
        }
        let digits_end = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(digits_end);
        // digits, digits.digits, digits. or .digits: one dot at most and
        // at least one digit.
        if number.matches('.').count() > 1 || !number.chars().any(|c| c.is_ascii_digit()) {
            return Err(malformed());
        }
        let base: f64 = number.parse().map_err(|_| malformed())?;
        let scale = match suffix {
            "" => 1.0,
            "n" => 1e-9,
            "u" => 1e-6,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024f64,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            exp if exp.starts_with(['e', 'E']) => {
                let power = &exp[1..];
                let unsigned = power.strip_prefix(['+', '-']).unwrap_or(power);
                if unsigned.is_empty() || !unsigned.chars().all(|c| c.is_ascii_digit()) {
                    return Err(malformed());
                }
                let power: i32 = power.parse().map_err(|_| malformed())?;
                10f64.powi(power)
            }
            _ => return Err(malformed()),
        };
        let value = base * scale;
        if !value.is_finite() {
            return Err(malformed());
        }
        if value == 0.0 {
            return Err(QuantityError::Zero {
                text: text.to_owned(),
            });
        }
        Ok(Self {
            text: text.to_owned(),
            value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_read_as_the_api_server_reads_them() {
        let q = |t: &str| t.parse::<Quantity>().map(|q| q.value());
        assert_eq!(q("10m"), Ok(0.01));
        assert_eq!(q("16Mi"), Ok(16.0 * 1024.0 * 1024.0));
        assert_eq!(q("1.5Gi"), Ok(1.5 * 1024f64.powi(3)));
        assert_eq!(q("2e3"), Ok(2000.0));
        assert_eq!(q(".5"), Ok(0.5));
        for bad in [
            "", "-1", "+1", "1.2.3", "1Mb", "Mi", "1e", "1e+", "ten", "1 Mi", "1e400",
        ] {
            assert!(bad.parse::<Quantity>().is_err(), "{bad}");
        }
        assert!(matches!(
            "0m".parse::<Quantity>(),
            Err(QuantityError::Zero { .. })
        ));
    }
}
