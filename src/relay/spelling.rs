//! "Did you mean": the known name closest to a mistyped one, for settings and their env variables. Pure.

/// The candidate `word` most likely mistypes, if one is close enough: within a third of its length in edits
/// (at least one; a swap of two neighbours counts once), or `word` cut short or run on (`max_reconnect` for
/// `max_reconnect_attempts`). Case is ignored; ties go to the first candidate.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        let lower = candidate.to_ascii_lowercase();
        let distance = edits(&word, &lower);
        let close = distance <= (word.len().max(lower.len()) / 3).max(1)
            || (word.len() >= 4 && (lower.starts_with(&word) || word.starts_with(&lower)));
        if close && best.is_none_or(|(shortest, _)| distance < shortest) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// Insertions, deletions, substitutions and swaps of neighbours that turn `a` into `b` (optimal string
/// alignment distance).
fn edits(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // Three rows of the table: two back for the swap.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let substitution = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (previous[j] + 1).min(current[j - 1] + 1).min(previous[j - 1] + substitution);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(before[j - 2] + 1);
            }
            current[j] = best;
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["servers", "max_reconnect_attempts", "name", "batch_size", "url", "user"];

    #[test]
    fn near_misses_find_their_key() {
        let cases = [
            ("server", "servers"),
            ("SERVER", "servers"),
            ("batchsize", "batch_size"),
            ("bacth_size", "batch_size"),
            ("max_reconnect", "max_reconnect_attempts"),
            ("uri", "url"),
            ("nmae", "name"),
        ];
        for (typo, key) in cases {
            assert_eq!(did_you_mean(typo, KEYS.iter().copied()), Some(key), "{typo}");
        }
    }

    #[test]
    fn far_words_find_nothing() {
        for word in ["pool_size", "token", "x", "subject_prefix"] {
            assert_eq!(did_you_mean(word, KEYS.iter().copied()), None, "{word}");
        }
    }

    #[test]
    fn edit_counts() {
        assert_eq!(edits("", "abc"), 3);
        assert_eq!(edits("abc", "abc"), 0);
        assert_eq!(edits("abcd", "abdc"), 1, "a swap is one edit");
        assert_eq!(edits("kitten", "sitting"), 3);
    }
}
