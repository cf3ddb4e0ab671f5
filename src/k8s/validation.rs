//! Kubernetes' own value rules, for checking objects before they reach an
//! API server: `resource.Quantity` parsing (k8s.io/apimachinery
//! `pkg/api/resource/quantity.go`), qualified names
//! (`pkg/util/validation/validation.go` `IsQualifiedName`), and the
//! resource-name and value rules of ResourceQuota and LimitRange
//! (kubernetes `pkg/apis/core/validation/validation.go`
//! `validateResourceQuotaResourceName`, `validateContainerResourceName`,
//! `ValidateResourceQuantityValue`, and `pkg/apis/core/helper/helpers.go`
//! for the standard and integer resource sets).
//!
//! Must not talk to a cluster: pure functions of strings.

use std::cmp::Ordering;

/// A parsed quantity: `sign * digits / 10^frac * 10^exp10 * 2^exp2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    negative: bool,
    digits: u128,
    frac: u32,
    exp10: i32,
    exp2: u32,
    format: Format,
}

/// How a quantity was written, which decides how the API server writes it
/// back (apimachinery `Format`: the suffix family of the parsed string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `Ki` .. `Ei`
    BinarySi,
    /// `n` .. `E` or no suffix
    DecimalSi,
    /// `e3`, `E-2`
    DecimalExponent,
}

/// Why a string is not a quantity (apimachinery's message).
pub const QUANTITY_FORMAT: &str =
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$' (for example 16, 500m, 1.5Gi, 1e3)";

impl Quantity {
    /// Parses a quantity as the API server does: a signed decimal number,
    /// then a binary-SI suffix (`Ki` .. `Ei`), a decimal-SI suffix (`n`,
    /// `u`, `m`, ``, `k`, `M`, `G`, `T`, `P`, `E`) or a decimal exponent
    /// (`e3`, `E-2`).
    ///
    /// # Errors
    /// [`QUANTITY_FORMAT`] for anything else.
    pub fn parse(s: &str) -> Result<Quantity, &'static str> {
        let (negative, rest) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, suffix) = rest.split_at(num_end);
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(QUANTITY_FORMAT);
        }
        let mut digits: u128 = 0;
        let mut frac_len = 0u32;
        let mut exp_extra = 0i32;
        for c in int.chars() {
            match digits
                .checked_mul(10)
                .and_then(|d| d.checked_add(c as u128 - '0' as u128))
            {
                Some(d) => digits = d,
                None => exp_extra += 1, // keep the magnitude, drop precision
            }
        }
        for c in frac.chars() {
            if let Some(d) = digits
                .checked_mul(10)
                .and_then(|d| d.checked_add(c as u128 - '0' as u128))
            {
                digits = d;
                frac_len += 1;
            }
        }
        let format = match suffix {
            "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => Format::BinarySi,
            s if s.starts_with(['e', 'E']) && s.len() > 1 => Format::DecimalExponent,
            _ => Format::DecimalSi,
        };
        let (exp10, exp2) = match suffix {
            "Ki" => (0, 10),
            "Mi" => (0, 20),
            "Gi" => (0, 30),
            "Ti" => (0, 40),
            "Pi" => (0, 50),
            "Ei" => (0, 60),
            "n" => (-9, 0),
            "u" => (-6, 0),
            "m" => (-3, 0),
            "" => (0, 0),
            "k" => (3, 0),
            "M" => (6, 0),
            "G" => (9, 0),
            "T" => (12, 0),
            "P" => (15, 0),
            "E" => (18, 0),
            s if s.starts_with(['e', 'E']) => {
                let e = &s[1..];
                let body = e.strip_prefix(['+', '-']).unwrap_or(e);
                if body.is_empty() || !body.chars().all(|c| c.is_ascii_digit()) {
                    return Err(QUANTITY_FORMAT);
                }
                (e.parse::<i32>().map_err(|_| QUANTITY_FORMAT)?, 0)
            }
            _ => return Err(QUANTITY_FORMAT),
        };
        Ok(Quantity {
            negative: negative && digits != 0,
            digits,
            frac: frac_len,
            exp10: exp10 + exp_extra,
            exp2,
            format,
        })
    }

    /// The string the API server stores for this quantity
    /// (apimachinery `Quantity.CanonicalizeBytes`): zero is `0`; a binary
    /// quantity that is a whole number of at least 1024 keeps a binary
    /// suffix with the largest power of 1024 that divides it (`1024Mi` →
    /// `1Gi`, `1.5Gi` → `1536Mi`), anything else is written in decimal with
    /// an exponent that is a multiple of three (`0.5` → `500m`, `1000` →
    /// `1k`, `1e4` → `10e3`, `1.5k` → `1500`). Values more precise than
    /// `1n` are rounded away from zero, as parsing does. `None` beyond what
    /// 128 bits of nano-units hold (about 10^29).
    pub fn canonical(&self) -> Option<String> {
        const NANO: i128 = 1_000_000_000;
        let mut nanos = i128::try_from(self.digits)
            .ok()?
            .checked_mul(1i128.checked_shl(self.exp2)?)?;
        let e = self.exp10 - self.frac as i32 + 9;
        if e >= 0 {
            nanos = nanos.checked_mul(10i128.checked_pow(e as u32)?)?;
        } else {
            nanos = match 10i128.checked_pow((-e) as u32) {
                Some(d) => (nanos + d - 1) / d,
                None => i128::from(nanos != 0),
            };
        }
        if nanos == 0 {
            return Some("0".into());
        }
        let sign = if self.negative { "-" } else { "" };
        let binary = self.format == Format::BinarySi && nanos >= 1024 * NANO && nanos % NANO == 0;
        if binary {
            let (mut units, mut exp) = (nanos / NANO, 0usize);
            while exp < 6 && units >= 1024 && units % 1024 == 0 {
                units /= 1024;
                exp += 1;
            }
            let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][exp];
            return Some(format!("{sign}{units}{suffix}"));
        }
        let (mut mantissa, mut exp) = (nanos, -9i32);
        while mantissa >= 10 && mantissa % 10 == 0 {
            mantissa /= 10;
            exp += 1;
        }
        match exp.rem_euclid(3) {
            1 => {
                mantissa *= 10;
                exp -= 1;
            }
            2 => {
                mantissa *= 100;
                exp -= 2;
            }
            _ => {}
        }
        let suffix = match (self.format, exp) {
            (_, 0) => String::new(),
            (Format::DecimalExponent, e) => format!("e{e}"),
            (_, -9) => "n".into(),
            (_, -6) => "u".into(),
            (_, -3) => "m".into(),
            (_, 3) => "k".into(),
            (_, 6) => "M".into(),
            (_, 9) => "G".into(),
            (_, 12) => "T".into(),
            (_, 15) => "P".into(),
            (_, 18) => "E".into(),
            (_, e) => format!("e{e}"),
        };
        Some(format!("{sign}{mantissa}{suffix}"))
    }

    /// Whether the value is below zero.
    pub fn is_negative(&self) -> bool {
        self.negative
    }

    /// The value in thousandths, rounded up as apimachinery's
    /// `MilliValue` does; `None` beyond ±2^127.
    pub fn milli_value(&self) -> Option<i128> {
        let mut num: i128 = i128::try_from(self.digits).ok()?;
        num = num
            .checked_mul(1000)?
            .checked_mul(1i128.checked_shl(self.exp2)?)?;
        let e = self.exp10 - self.frac as i32;
        let v = if e >= 0 {
            num.checked_mul(10i128.checked_pow(e as u32)?)?
        } else {
            let d = 10i128.checked_pow((-e) as u32);
            match d {
                Some(d) => (num + d - 1) / d, // ceiling for positive values
                None => i128::from(num != 0),
            }
        };
        Some(if self.negative { -v } else { v })
    }

    /// The value as a float (for ordering; exact enough for limits).
    pub fn as_f64(&self) -> f64 {
        let v = self.digits as f64
            * 10f64.powi(self.exp10 - self.frac as i32)
            * 2f64.powi(self.exp2 as i32);
        if self.negative {
            -v
        } else {
            v
        }
    }

    /// Compares two quantities by value.
    pub fn cmp_value(&self, other: &Quantity) -> Ordering {
        match (self.milli_value(), other.milli_value()) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => self
                .as_f64()
                .partial_cmp(&other.as_f64())
                .unwrap_or(Ordering::Equal),
        }
    }
}

/// A DNS-1123 label (a namespace name): at most 63 lowercase letters,
/// digits and '-', starting and ending with a letter or digit.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain (most object names): dot-separated labels, at
/// most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// The name part of a qualified name, and a non-empty label value
/// (`IsValidLabelValue`): at most 63 characters of `[A-Za-z0-9_.-]`,
/// starting and ending with an alphanumeric.
pub fn is_label_value(name: &str) -> bool {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !name.is_empty()
        && name.len() <= 63
        && ok_chars
        && ends(name.chars().next())
        && ends(name.chars().last())
}

/// `IsQualifiedName`: `[prefix/]name`, the prefix a DNS subdomain, the name
/// at most 63 characters of `[A-Za-z0-9_.-]` starting and ending with an
/// alphanumeric.
///
/// # Errors
/// What is wrong, in apimachinery's words.
pub fn qualified_name_problem(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                return Some("prefix part must be non-empty".into());
            }
            if !is_dns1123_subdomain(prefix) {
                return Some(format!("prefix part '{prefix}' must be a lowercase DNS-1123 subdomain (like example.com)"));
            }
            name
        }
        _ => {
            return Some(
                "a qualified name must be a name with an optional DNS subdomain prefix and '/' (like example.com/MyName)".into(),
            )
        }
    };
    if !is_label_value(name) {
        return Some(format!(
            "name part '{name}' must be at most 63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    None
}

/// helpers.go `standardQuotaResources`.
const STANDARD_QUOTA: [&str; 19] = [
    "cpu",
    "memory",
    "ephemeral-storage",
    "requests.cpu",
    "requests.memory",
    "requests.storage",
    "requests.ephemeral-storage",
    "limits.cpu",
    "limits.memory",
    "limits.ephemeral-storage",
    "pods",
    "resourcequotas",
    "services",
    "replicationcontrollers",
    "secrets",
    "persistentvolumeclaims",
    "configmaps",
    "services.nodeports",
    "services.loadbalancers",
];

/// helpers.go `integerResources`.
const INTEGER: [&str; 9] = [
    "pods",
    "resourcequotas",
    "services",
    "replicationcontrollers",
    "secrets",
    "configmaps",
    "persistentvolumeclaims",
    "services.nodeports",
    "services.loadbalancers",
];

fn is_native(name: &str) -> bool {
    !name.contains('/') || name.contains("kubernetes.io/")
}

/// helpers.go `IsExtendedResourceName`.
pub fn is_extended_resource(name: &str) -> bool {
    !is_native(name)
        && !name.starts_with("requests.")
        && qualified_name_problem(&format!("requests.{name}")).is_none()
}

fn is_integer_resource(name: &str) -> bool {
    INTEGER.contains(&name) || is_extended_resource(name)
}

/// `validateResourceQuotaResourceName`: a ResourceQuota `spec.hard` key.
///
/// # Errors
/// Why the API server would refuse it.
pub fn quota_resource_problem(key: &str) -> Option<String> {
    if let Some(e) = qualified_name_problem(key) {
        return Some(format!("'{key}' is not a resource name: {e}"));
    }
    if !key.contains('/')
        && !STANDARD_QUOTA.contains(&key)
        && !key.starts_with("hugepages-")
        && !key.starts_with("requests.hugepages-")
    {
        return Some(format!(
            "'{key}' is not a ResourceQuota resource (requests.cpu, limits.memory, pods, secrets, services.loadbalancers, requests.hugepages-2Mi, requests.nvidia.com/gpu, count/<resource>, ...)"
        ));
    }
    None
}

/// `validateContainerResourceName`: a LimitRange (type Container) key.
///
/// # Errors
/// Why the API server would refuse it.
pub fn container_resource_problem(key: &str) -> Option<String> {
    if let Some(e) = qualified_name_problem(key) {
        return Some(format!("'{key}' is not a resource name: {e}"));
    }
    if !key.contains('/') {
        if !["cpu", "memory", "ephemeral-storage"].contains(&key) && !key.starts_with("hugepages-")
        {
            return Some(format!(
                "'{key}' is not a container resource (cpu, memory, ephemeral-storage, hugepages-<size>, or an extended resource like nvidia.com/gpu)"
            ));
        }
    } else if !is_native(key) && !is_extended_resource(key) {
        return Some(format!("'{key}' is not an extended resource name"));
    }
    None
}

/// `ValidateResourceQuantityValue`: the value parses, is not negative, and
/// is whole for integer resources (pods, secrets, extended resources, ...).
///
/// # Errors
/// Why the API server would refuse it.
pub fn quantity_problem(resource: &str, value: &str) -> Option<String> {
    let q = match Quantity::parse(value) {
        Ok(q) => q,
        Err(e) => return Some(format!("'{value}' is not a quantity: {e}")),
    };
    if q.is_negative() {
        return Some(format!("'{value}' must be greater than or equal to 0"));
    }
    if is_integer_resource(resource) && q.milli_value().is_some_and(|m| m % 1000 != 0) {
        return Some(format!("'{value}' must be an integer for {resource}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milli(s: &str) -> i128 {
        Quantity::parse(s).unwrap().milli_value().unwrap()
    }

    /// Expected strings as apimachinery writes them
    /// (`pkg/api/resource/quantity_test.go` TestQuantityParse and
    /// TestQuantityString cases, and what `kubectl get -o yaml` shows for
    /// the written form).
    #[test]
    fn quantities_are_written_back_as_the_api_server_does() {
        for (written, stored) in [
            ("0", "0"),
            ("0m", "0"),
            ("0Gi", "0"),
            ("1", "1"),
            ("100", "100"),
            ("1000", "1k"),
            ("1500", "1500"),
            ("1.5k", "1500"),
            ("0.5", "500m"),
            ("0.1", "100m"),
            ("1000m", "1"),
            ("2000m", "2"),
            ("1500m", "1500m"),
            ("1000n", "1u"),
            ("0.0000000001", "1n"),
            ("1e3", "1e3"),
            ("1E3", "1e3"),
            ("1e4", "10e3"),
            ("1.5e3", "1500"),
            ("1024Mi", "1Gi"),
            ("1.5Gi", "1536Mi"),
            ("0.5Gi", "512Mi"),
            ("0.5Ki", "512"),
            ("1023Ki", "1023Ki"),
            ("1024Ki", "1Mi"),
            ("1025", "1025"),
            ("1Ei", "1Ei"),
            ("1024Ei", "1024Ei"),
            ("96Gi", "96Gi"),
            ("64G", "64G"),
            ("-1", "-1"),
            ("-0.5", "-500m"),
        ] {
            assert_eq!(
                Quantity::parse(written).unwrap().canonical().as_deref(),
                Some(stored),
                "{written}"
            );
        }
    }

    #[test]
    fn quantities_parse_as_apimachinery_does() {
        assert_eq!(milli("1"), 1000);
        assert_eq!(milli("500m"), 500);
        assert_eq!(milli("0.5"), 500);
        assert_eq!(milli("1e3"), 1_000_000);
        assert_eq!(milli("1E3"), 1_000_000);
        assert_eq!(milli("2E"), 2_000_000_000_000_000_000_000);
        assert_eq!(milli("1Ki"), 1_024_000);
        assert_eq!(milli("1Ei"), 1000 * (1i128 << 60));
        assert_eq!(milli("1.5Gi"), 1500 * (1i128 << 30));
        assert_eq!(milli(".5"), 500);
        assert_eq!(milli("5."), 5000);
        assert_eq!(milli("+3"), 3000);
        assert_eq!(milli("-1"), -1000);
        assert_eq!(milli("1n"), 1); // rounded up
        assert_eq!(milli("1e-3"), 1);
        for bad in [
            "", ".", "8GB", "1.2.3", "1e", "1e+", "Gi", "1 Gi", "1iB", "1KiB", "--1", "0x10",
        ] {
            assert!(Quantity::parse(bad).is_err(), "{bad}");
        }
        let (a, b) = (
            Quantity::parse("1Gi").unwrap(),
            Quantity::parse("1000M").unwrap(),
        );
        assert_eq!(a.cmp_value(&b), Ordering::Greater);
    }

    #[test]
    fn resource_names_and_values_follow_the_api_server() {
        for ok in [
            "secrets",
            "configmaps",
            "services.loadbalancers",
            "ephemeral-storage",
            "requests.hugepages-2Mi",
            "requests.nvidia.com/gpu",
            "count/deployments.apps",
            "gold.storageclass.storage.k8s.io/requests.storage",
        ] {
            assert_eq!(quota_resource_problem(ok), None, "{ok}");
        }
        for bad in [
            "requests.nvidia.com/GPU_x!",
            "count/foo!",
            "gpu",
            "storage",
            "Requests.CPU",
        ] {
            assert!(quota_resource_problem(bad).is_some(), "{bad}");
        }
        assert!(quantity_problem("persistentvolumeclaims", "1.5").is_some());
        assert!(quantity_problem("pods", "500m").is_some());
        assert!(quantity_problem("pods", "1e3").is_none());
        assert!(quantity_problem("requests.memory", "1Ei").is_none());
        assert!(quantity_problem("cpu", "-1").is_some());
        assert!(quantity_problem("memory", "8GB").is_some());
        assert!(quantity_problem("nvidia.com/gpu", "0.5").is_some());
        assert!(container_resource_problem("gpu").is_some());
        assert!(container_resource_problem("nvidia.com/gpu").is_none());
        assert!(container_resource_problem("hugepages-1Gi").is_none());
        assert!(container_resource_problem("cpu").is_none());
    }
}
