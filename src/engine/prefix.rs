//! Prefix caching: the KV cache of recent prompts, so a new prompt that starts the same way (an
//! agent's system prompt and tool definitions, a conversation's earlier turns) prefills only what
//! is new. Entries are keyed by the adapter a prompt ran with (the adapter itself is held, so a
//! reloaded adapter never matches an old entry), bounded in bytes, least recently used evicted.
//! A reused prefix gives bit-identical keys and values: every op of the forward pass computes a
//! row independently of the others in its batch.

use std::sync::Arc;

use super::lora::LoraAdapter;
use super::model::KvCache;

/// Prefixes shorter than this are not worth a lookup.
const MIN_REUSE: usize = 16;

struct Entry {
    adapter: Option<Arc<LoraAdapter>>,
    tokens: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

pub struct PrefixCache {
    budget: usize,
    used: usize,
    clock: u64,
    entries: Vec<Entry>,
}

fn same_adapter(a: &Option<Arc<LoraAdapter>>, b: &Option<Arc<LoraAdapter>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of keys and values (0 turns it off).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            clock: 0,
            entries: Vec::new(),
        }
    }

    /// The longest cached prefix of `prompt` for this adapter, leaving at least one token to
    /// prefill (the last token's logits are needed): a copy of its cache.
    pub fn lookup(
        &mut self,
        prompt: &[u32],
        adapter: &Option<Arc<LoraAdapter>>,
    ) -> Option<KvCache> {
        let limit = prompt.len().saturating_sub(1);
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| same_adapter(&e.adapter, adapter))
            .map(|(i, e)| {
                let common = e
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, common.min(limit))
            })
            .max_by_key(|&(_, n)| n)?;
        if len < MIN_REUSE {
            return None;
        }
        self.clock += 1;
        let e = &mut self.entries[best];
        e.last_used = self.clock;
        Some(e.cache.prefix(len))
    }

    /// Keeps the cache of a freshly prefilled prompt (it must hold exactly the prompt).
    pub fn insert(&mut self, prompt: &[u32], adapter: &Option<Arc<LoraAdapter>>, cache: &KvCache) {
        if self.budget == 0 || prompt.len() < MIN_REUSE || cache.len() != prompt.len() {
            return;
        }
        let bytes = cache.bytes();
        if bytes > self.budget {
            return;
        }
        // A prompt already covered by an entry adds nothing; entries it covers are replaced.
        let covered = |e: &Entry| {
            same_adapter(&e.adapter, adapter)
                && e.tokens.len() >= prompt.len()
                && e.tokens[..prompt.len()] == *prompt
        };
        if self.entries.iter().any(covered) {
            return;
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let shorter = same_adapter(&e.adapter, adapter)
                && e.tokens.len() < prompt.len()
                && prompt[..e.tokens.len()] == e.tokens[..];
            if shorter {
                freed += e.cache.bytes();
            }
            !shorter
        });
        self.used -= freed;
        while self.used + bytes > self.budget && !self.entries.is_empty() {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
                .unwrap_or(0);
            let e = self.entries.swap_remove(oldest);
            self.used -= e.cache.bytes();
        }
        self.clock += 1;
        self.used += bytes;
        self.entries.push(Entry {
            adapter: adapter.clone(),
            tokens: prompt.to_vec(),
            cache: cache.prefix(prompt.len()),
            last_used: self.clock,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(n: usize, tail: u32) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32 - 1).collect();
        p.push(tail);
        p
    }

    #[test]
    fn longest_shared_prefix_leaving_a_token_to_prefill() {
        let mut c = PrefixCache::new(1 << 20);
        let a = prompt(40, 1000);
        c.insert(&a, &None, &KvCache::filled(2, 40, 4));
        // The same prompt again reuses all but its last token.
        assert_eq!(c.lookup(&a, &None).map(|k| k.len()), Some(39));
        // A prompt that diverges at token 39 reuses 39.
        let b = prompt(50, 7);
        assert_eq!(c.lookup(&b, &None).map(|k| k.len()), Some(39));
        // Too short a match is not worth it.
        assert!(c.lookup(&[0, 1, 2, 99], &None).is_none());
        // A prompt with nothing in common matches nothing.
        assert!(c.lookup(&[5; 40], &None).is_none());
    }

    #[test]
    fn the_byte_budget_evicts_the_least_recently_used() {
        let entry = KvCache::filled(2, 20, 4).bytes();
        let mut c = PrefixCache::new(2 * entry);
        let (p1, p2, p3) = (prompt(20, 501), vec![7u32; 20], vec![9u32; 20]);
        c.insert(&p1, &None, &KvCache::filled(2, 20, 4));
        c.insert(&p2, &None, &KvCache::filled(2, 20, 4));
        assert!(c.lookup(&p1, &None).is_some()); // p1 is now the most recent
        c.insert(&p3, &None, &KvCache::filled(2, 20, 4));
        assert!(
            c.lookup(&p2, &None).is_none(),
            "p2 was the least recently used"
        );
        assert!(c.lookup(&p1, &None).is_some() && c.lookup(&p3, &None).is_some());
        assert!(c.used <= c.budget);
        // Off means off.
        let mut off = PrefixCache::new(0);
        off.insert(&p1, &None, &KvCache::filled(2, 20, 4));
        assert!(off.lookup(&p1, &None).is_none());
    }
}
