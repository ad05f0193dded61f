//! An error and its causes on one line, for logs and operator output.

/// `outer: inner: …`, each link once. Some errors, async-nats' among them, print their source after their own
/// words (`authorization violation: nats: authorization violation`): the source is its own link. A link that
/// only says the one before again behind a prefix (`nats: authorization violation`) is left out.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = String::new();
    let mut last = String::new();
    let mut next = Some(err);
    while let Some(link) = next {
        let mut own = link.to_string();
        if let Some(source) = link.source() {
            let said_after = format!(": {source}");
            if own.len() > said_after.len() && own.ends_with(&said_after) {
                own.truncate(own.len() - said_after.len());
            }
        }
        if text.is_empty() {
            text.clone_from(&own);
        } else if !text.ends_with(&own) && !own.ends_with(&last) {
            text.push_str(": ");
            text.push_str(&own);
        }
        last = own;
        next = link.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Link {
        text: &'static str,
        #[source]
        source: Option<Box<Link>>,
    }

    fn chain(texts: &[&'static str]) -> Link {
        texts
            .iter()
            .rev()
            .fold(None, |source, text| Some(Link { text, source: source.map(Box::new) }))
            .unwrap()
    }

    #[test]
    fn each_link_is_said_once() {
        assert_eq!(error_chain(&chain(&["outer", "inner", "root"])), "outer: inner: root");
        assert_eq!(error_chain(&chain(&["connecting: refused", "refused"])), "connecting: refused");
        assert_eq!(
            error_chain(&chain(&[
                "credentials refused: NATS at 127.0.0.1:4222",
                "authorization violation: nats: authorization violation",
                "nats: authorization violation"
            ])),
            "credentials refused: NATS at 127.0.0.1:4222: authorization violation"
        );
        assert_eq!(
            error_chain(&chain(&[
                "credentials refused: NATS at 127.0.0.1:4222",
                "authorization violation",
                "nats: authorization violation"
            ])),
            "credentials refused: NATS at 127.0.0.1:4222: authorization violation"
        );
    }
}
