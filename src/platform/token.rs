//! Access-token secrets: `cdl_<id>_<secret>`. The id is public (listed, logged, used to revoke);
//! the secret is 256 random bits of which only a SHA-256 hash is stored. Lookup is by id and the
//! hash comparison runs in constant time, so neither timing nor the database reveals a secret.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "cdl_";
const ID_HEX: usize = 12;
const SECRET_HEX: usize = 64;

/// A freshly made token; its full text is shown once and then dropped.
pub struct TokenSecret {
    text: String,
}

impl TokenSecret {
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut id = [0u8; ID_HEX / 2];
        let mut secret = [0u8; SECRET_HEX / 2];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        Self {
            text: format!("{PREFIX}{}_{}", hex::encode(id), hex::encode(secret)),
        }
    }

    pub fn id(&self) -> &str {
        &self.text[PREFIX.len()..PREFIX.len() + ID_HEX]
    }

    pub fn hash(&self) -> [u8; 32] {
        split(&self.text).map(|(_, h)| h).unwrap_or([0; 32])
    }

    /// The token's full text, for showing it to its owner once.
    pub fn expose(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSecret({}…)", self.id())
    }
}

/// Whether a presented key is meant as a candela token (well-formed or not).
pub fn looks_like_token(presented: &str) -> bool {
    presented.starts_with(PREFIX)
}

/// Splits a presented token into its id and the hash of its secret; `None` when it is not in
/// candela's format.
pub fn split(presented: &str) -> Option<(&str, [u8; 32])> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let well_formed = id.len() == ID_HEX
        && secret.len() == SECRET_HEX
        && id
            .bytes()
            .chain(secret.bytes())
            .all(|b| b.is_ascii_hexdigit());
    well_formed.then(|| (id, Sha256::digest(secret.as_bytes()).into()))
}

pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// A constant-time comparison of two secrets of any length (the admin token).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    let (ha, hb): ([u8; 32], [u8; 32]) = (
        Sha256::digest(a.as_bytes()).into(),
        Sha256::digest(b.as_bytes()).into(),
    );
    hashes_equal(&ha, &hb)
}

/// Parses a validity period such as `30d`, `12h`, `15m`, `90s` or `2w`.
pub fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30d, 12h, 15m or 90s"))?;
    let secs = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use s, m, h, d or w)"
            ))
        }
    };
    if n == 0 {
        return Err(format!("`{text}`: a validity period must be positive"));
    }
    Ok(std::time::Duration::from_secs(n.saturating_mul(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_splits_back_into_its_id_and_hash() {
        let t = TokenSecret::generate();
        let (id, hash) = split(t.expose()).unwrap();
        assert_eq!(id, t.id());
        assert!(hashes_equal(&hash, &t.hash()));
        assert!(!format!("{t:?}").contains(&t.expose()[PREFIX.len() + ID_HEX + 1..]));
        let other = TokenSecret::generate();
        assert!(!hashes_equal(&hash, &other.hash()));
    }

    #[test]
    fn malformed_tokens_do_not_split() {
        for bad in [
            "",
            "cdl_",
            "cdl_abc_def",
            "sk-123",
            "cdl_zzzzzzzzzzzz_00",
            "é",
        ] {
            assert!(split(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("30d").unwrap().as_secs(), 30 * 86_400);
        assert_eq!(parse_ttl("2s").unwrap().as_secs(), 2);
        assert_eq!(parse_ttl("1w").unwrap().as_secs(), 7 * 86_400);
        assert!(parse_ttl("0d").is_err());
        assert!(parse_ttl("3y").is_err());
        assert!(parse_ttl("d").is_err());
    }
}
