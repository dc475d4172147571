//! Realistic Segment messages with sizes drawn from a skewed distribution between 300 B and 8 KB.

use rand::Rng;
use serde_json::{Value, json};

const EVENTS: &[&str] = &[
    "Page Viewed",
    "Product Viewed",
    "Product Added",
    "Checkout Started",
    "Order Completed",
    "Signed Up",
    "Search",
];

/// A message size in bytes: mostly small (the median is under 1 KB), sometimes up to 8 KB.
pub fn draw_size(rng: &mut impl Rng) -> usize {
    let uniform: f64 = rng.random_range(0.0..1.0);
    // Log-uniform between 300 and 8192, skewed toward small sizes.
    let size = 300.0 * (8192.0f64 / 300.0).powf(uniform * uniform);
    size.round() as usize
}

/// A track/identify/page message of about `size` bytes, identified by `message_id`.
pub fn message(rng: &mut impl Rng, message_id: &str, size: usize) -> Value {
    let user = format!("user-{}", rng.random_range(0..100_000));
    let kind = match rng.random_range(0..10) {
        0 => "identify",
        1 | 2 => "page",
        _ => "track",
    };
    let mut message = json!({
        "type": kind,
        "userId": user,
        "anonymousId": format!("anon-{}", rng.random_range(0..1_000_000)),
        "messageId": message_id,
        "timestamp": "2026-11-24T05:12:26.678Z",
        "context": {
            "library": {"name": "meridian-loadgen", "version": "1.0"},
            "ip": "203.0.113.7",
            "locale": "en-US",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
        },
    });
    match kind {
        "track" => {
            message["event"] = json!(EVENTS[rng.random_range(0..EVENTS.len())]);
            message["properties"] = json!({"price": rng.random_range(1..500), "currency": "USD", "sku": format!("SKU-{}", rng.random_range(0..10_000))});
        }
        "identify" => {
            message["traits"] = json!({"plan": "pro", "email": format!("{user}@example.com")})
        }
        _ => message["name"] = json!("Home"),
    }
    let current = message.to_string().len();
    if size > current + 12 {
        let padding = "x".repeat(size - current - 12);
        let field = if message.get("traits").is_some() {
            "traits"
        } else {
            "properties"
        };
        if message.get(field).is_none() {
            message[field] = json!({});
        }
        message[field]["padding"] = json!(padding);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_stay_in_range_and_messages_match_them() {
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let size = draw_size(&mut rng);
            assert!((300..=8192).contains(&size), "{size}");
            let text = message(&mut rng, "m", size).to_string();
            assert!(
                text.len().abs_diff(size) < 64 || text.len() > size,
                "{} vs {size}",
                text.len()
            );
        }
    }
}
